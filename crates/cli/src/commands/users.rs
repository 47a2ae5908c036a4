//! `fleetrun users ...`, `fleetrun tokens ...`, `fleetrun whoami`, `fleetrun login`: principals and
//! their credentials.

use super::Ctx;
use crate::client::Client;
use crate::config;
use crate::render::{self, Format};
use anyhow::{Context, bail};
use fleetrun_proto::api::{CreateToken, CreateUser, Role, UpdateUser, User};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum UsersCmd {
    /// Create a user (then give it a token: `fleetrun tokens create --user NAME`)
    Create(CreateArgs),
    /// List users with their roles and credential counts
    List,
    /// Show one user, with its policy
    Show {
        /// User name
        name: String,
    },
    /// Change a user's role or policy (takes effect on its next request)
    Update(UpdateArgs),
    /// Delete a user; its tokens and access keys stop working at once
    Delete {
        /// User name
        name: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// User name: 1 to 64 of A-Z a-z 0-9 _ . @ -
    name: String,
    /// Built-in role: admin, operator, viewer, or none (only what --policy permits)
    #[arg(long, value_parser = parse_role)]
    role: Role,
    /// Cedar policy file added to the role's (see `fleetrun policies validate`)
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    /// User name
    name: String,
    /// New role
    #[arg(long, value_parser = parse_role)]
    role: Option<Role>,
    /// New Cedar policy file (replaces the user's policy)
    #[arg(long, value_name = "FILE", conflicts_with = "no_policy")]
    policy: Option<PathBuf>,
    /// Remove the user's own policy (it keeps its role's)
    #[arg(long)]
    no_policy: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum TokensCmd {
    /// Create an API token (printed only this once; `-o json` gives it as `token`)
    Create(TokenArgs),
    /// List tokens (yours; every user's for admins), without secrets
    List {
        /// Only this user's
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke a token at once
    Delete {
        /// Token id (`tok_...`, from `tokens list`)
        id: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// The user the token acts as (default: you)
    #[arg(long)]
    user: Option<String>,
    /// A note saying what the token is for
    #[arg(long, value_name = "NOTE")]
    name: Option<String>,
    /// Lifetime, e.g. 30d or 12h (default: until revoked)
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    expires: Option<std::time::Duration>,
}

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// Read the token from standard input (else --token, FLEETRUN_TOKEN, or a prompt on the terminal)
    #[arg(long)]
    token_stdin: bool,
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

fn read_policy(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read policy file {}", path.display()))?;
    // Checked here too, so a typo is reported with the file's name before anything is sent.
    fleetrun_server::access::authz::validate(&text)
        .map_err(|e| anyhow::anyhow!("{}: invalid policy: {e}", path.display()))?;
    Ok(text)
}

pub async fn users(ctx: &Ctx, cmd: UsersCmd) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    match cmd {
        UsersCmd::Create(a) => {
            let policy = a.policy.as_deref().map(read_policy).transpose()?;
            let user = client
                .create_user(&CreateUser {
                    name: a.name,
                    role: a.role,
                    policy: policy.unwrap_or_default(),
                })
                .await?;
            show_user(ctx, &user)?;
            if ctx.format != Format::Json {
                eprintln!(
                    "\ngive it a token: fleetrun tokens create --user {}",
                    user.name
                );
            }
        }
        UsersCmd::List => {
            let users = client.users().await?;
            if ctx.format == Format::Json {
                render::print_json(&users)?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut t =
                render::table(&["NAME", "ROLE", "POLICY", "TOKENS", "ACCESS KEYS", "CREATED"]);
            for u in &users {
                t.add_row(vec![
                    u.name.clone(),
                    u.role.to_string(),
                    policy_summary(&u.policy),
                    u.tokens.to_string(),
                    u.access_keys.to_string(),
                    render::ago(&u.created_at),
                ]);
            }
            render::print_table(&t)?;
        }
        UsersCmd::Show { name } => show_user(ctx, &client.user(&name).await?)?,
        UsersCmd::Update(a) => {
            let policy = match (a.policy, a.no_policy) {
                (Some(p), _) => Some(read_policy(&p)?),
                (None, true) => Some(String::new()),
                (None, false) => None,
            };
            if a.role.is_none() && policy.is_none() {
                bail!("nothing to change: give --role, --policy FILE or --no-policy");
            }
            let user = client
                .update_user(
                    &a.name,
                    &UpdateUser {
                        role: a.role,
                        policy,
                    },
                )
                .await?;
            show_user(ctx, &user)?;
        }
        UsersCmd::Delete { name } => {
            client.delete_user(&name).await?;
            if ctx.format != Format::Json {
                println!("deleted user {name} (its tokens and access keys no longer work)");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn policy_summary(policy: &str) -> String {
    match policy.trim() {
        "" => "-".into(),
        p => format!("{} lines", p.lines().count()),
    }
}

fn show_user(ctx: &Ctx, u: &User) -> anyhow::Result<()> {
    if ctx.format == Format::Json {
        return render::print_json(u);
    }
    let mut t = render::table(&["NAME", "ROLE", "TOKENS", "ACCESS KEYS", "CREATED"]);
    t.add_row(vec![
        u.name.clone(),
        u.role.to_string(),
        u.tokens.to_string(),
        u.access_keys.to_string(),
        render::ago(&u.created_at),
    ]);
    render::print_table(&t)?;
    if !u.policy.trim().is_empty() {
        render::emit(&format!("\npolicy:\n{}\n", u.policy.trim_end()))?;
    }
    Ok(())
}

pub async fn tokens(ctx: &Ctx, cmd: TokensCmd) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    match cmd {
        TokensCmd::Create(a) => {
            let name = a.name.unwrap_or_default();
            if name.len() > 128 {
                bail!("--name is longer than 128 bytes");
            }
            let token = client
                .create_token(&CreateToken {
                    user: a.user,
                    name,
                    expires_in_secs: a.expires.map(|d| d.as_secs().max(1)),
                })
                .await?;
            if ctx.format == Format::Json {
                render::print_json(&token)?;
                return Ok(ExitCode::SUCCESS);
            }
            println!("{}", token.token.as_deref().unwrap_or_default());
            eprintln!(
                "token {} for user {} (shown only this once); use it with:\n  fleetrun login --server {} --token-stdin",
                token.id,
                token.user,
                client.base()
            );
        }
        TokensCmd::List { user } => {
            let tokens = client.tokens(user.as_deref()).await?;
            if ctx.format == Format::Json {
                render::print_json(&tokens)?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = render::table(&["ID", "USER", "NAME", "CREATED", "EXPIRES"]);
            for k in &tokens {
                t.add_row(vec![
                    k.id.clone(),
                    k.user.clone(),
                    render::or_dash(&k.name),
                    render::ago(&k.created_at),
                    k.expires_at.clone().unwrap_or_else(|| "never".into()),
                ]);
            }
            render::print_table(&t)?;
        }
        TokensCmd::Delete { id } => {
            client.delete_token(&id).await?;
            if ctx.format != Format::Json {
                println!("revoked token {id}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn whoami(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let me = ctx.client()?.whoami().await?;
    if ctx.format == Format::Json {
        render::print_json(&me)?;
    } else {
        println!(
            "{} (role {}, credential {})",
            me.user, me.role, me.credential
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Checks the token against the server (`whoami`), then stores server and token in the config file.
pub async fn login(ctx: &Ctx, args: LoginArgs) -> anyhow::Result<ExitCode> {
    let path = config::config_path()?;
    let mut file = config::load(&path)?;
    let Some(server) = ctx.server.clone().or(file.server.clone()) else {
        bail!("no server given: pass --server URL (or set FLEETRUN_SERVER)");
    };
    let token = match (&ctx.token, args.token_stdin) {
        (_, true) => read_token_line()?,
        (Some(t), false) => t.clone(),
        (None, false) => {
            eprint!("API token for {server}: ");
            read_token_line()?
        }
    };
    // The CA to trust: --ca-cert / FLEETRUN_CA_CERT, else what the config file already names. Kept
    // as an absolute path, so the saved config works from any directory.
    let ca_cert = match ctx.ca_cert.clone() {
        Some(p) => Some(
            std::path::absolute(&p)
                .with_context(|| format!("cannot resolve --ca-cert {}", p.display()))?,
        ),
        None => config::resolve(Some(server.clone()), Some(token.clone()), None)?.ca_cert,
    };
    let conn = config::Connection {
        server: config::normalize_server(&server)?,
        token: token.clone(),
        ca_cert: ca_cert.clone(),
    };
    let me = Client::new(&conn)?
        .whoami()
        .await
        .context("the server refused the token")?;
    file.server = Some(conn.server.clone());
    file.token = Some(token);
    if ca_cert.is_some() {
        file.ca_cert = ca_cert;
    }
    config::save(&path, &file)?;
    if ctx.format == Format::Json {
        render::print_json(&me)?;
    } else {
        println!(
            "logged in to {} as {} (role {}); saved in {}",
            conn.server,
            me.user,
            me.role,
            path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn read_token_line() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("cannot read the token from standard input")?;
    let t = line.trim().to_owned();
    if t.is_empty() {
        bail!("no token on standard input");
    }
    Ok(t)
}
