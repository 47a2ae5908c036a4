//! `fleetrun scripts create|list|show|update|delete|run|results`: saved scripts (a name, a
//! description, a platform, an input URI, an output path and a body using `${INPUT}` and
//! `${OUTPUT}`), each update kept as a new version; a run is a send of the script (every send
//! flag), recorded with the version it ran.

use super::Ctx;
use crate::render::{self, Format};
use anyhow::{Context, bail};
use fleetrun_proto::api::{CreateScript, Script, UpdateScript};
use fleetrun_proto::limits::SCRIPT_MAX;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Save a script (version 1)
    Create(CreateArgs),
    /// List scripts at their latest versions
    List(ListArgs),
    /// Print a version's body (the latest unless --version); -o json adds its facts
    #[command(disable_version_flag = true)]
    Show(ShowArgs),
    /// Add a version: the latest with the members given replaced
    Update(UpdateArgs),
    /// Delete a script with all its versions
    Delete(NameArg),
    /// Run a script (its latest version unless --version) on nodes, as `send` runs a script; only
    /// nodes of its platform run it, the others fail with InvalidPlatform
    #[command(disable_version_flag = true)]
    Run(RunArgs),
    /// The script (and version) a command ran
    Results(ResultsArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The script's name
    #[arg(value_name = "NAME")]
    name: String,
    /// Which version [default: the latest]
    #[arg(long, value_name = "N")]
    version: Option<u64>,
    #[command(flatten)]
    rollout: super::send::Rollout,
}

#[derive(Debug, clap::Args)]
pub struct ResultsArgs {
    /// The command a `scripts run` made
    #[arg(value_name = "COMMAND_ID")]
    command_id: String,
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The script's name: 1 to 128 of a-z A-Z 0-9 - _ .
    #[arg(value_name = "NAME")]
    name: String,
    /// What it does (at most 1024 characters)
    #[arg(long, value_name = "TEXT", default_value = "")]
    description: String,
    /// The platform it runs on (linux)
    #[arg(long, value_name = "PLATFORM")]
    platform: String,
    /// The input file: s3://bucket/key, an object key in the store, or https://...
    #[arg(long, value_name = "URI")]
    input: Option<String>,
    /// The output file, relative to the run's temp dir (`--output` is the global output format)
    #[arg(long = "output-path", value_name = "PATH")]
    output: Option<String>,
    /// The body (`-` for stdin; at most 64 KiB); it may use ${INPUT} and ${OUTPUT}
    #[arg(long, value_name = "FILE")]
    file: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Most scripts to list
    #[arg(long, value_name = "N", default_value_t = 100)]
    limit: u32,
    /// The page after this name (the last name of the previous page)
    #[arg(long, value_name = "NAME")]
    after: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The script's name
    #[arg(value_name = "NAME")]
    name: String,
    /// Which version [default: the latest]
    #[arg(long, value_name = "N")]
    version: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    /// The script's name
    #[arg(value_name = "NAME")]
    name: String,
    /// A new description
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
    /// A new platform
    #[arg(long, value_name = "PLATFORM")]
    platform: Option<String>,
    /// A new input URI (`""` for none)
    #[arg(long, value_name = "URI")]
    input: Option<String>,
    /// A new output path (`""` for none)
    #[arg(long = "output-path", value_name = "PATH")]
    output: Option<String>,
    /// A new body (`-` for stdin)
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct NameArg {
    /// The script's name
    #[arg(value_name = "NAME")]
    name: String,
}

pub async fn run(ctx: &Ctx, cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Create(args) => create(ctx, args).await,
        Cmd::List(args) => list(ctx, args).await,
        Cmd::Show(args) => show(ctx, args).await,
        Cmd::Update(args) => update(ctx, args).await,
        Cmd::Delete(args) => delete(ctx, args).await,
        Cmd::Run(args) => run_script(ctx, args).await,
        Cmd::Results(args) => results(ctx, args).await,
    }
}

async fn run_script(ctx: &Ctx, args: RunArgs) -> anyhow::Result<ExitCode> {
    use super::send;
    let (key, wait) = (send::idempotency_key(&args.rollout)?, args.rollout.wait);
    // The script comes from the server; the rest is a send's, checked as a send's is.
    let body = send::checked(send::rollout_request(args.rollout)?)?;
    let client = ctx.client()?;
    let cmd = client
        .run_script(&args.name, args.version, &body, &key)
        .await?;
    send::report(ctx, &client, &cmd, wait).await
}

async fn results(ctx: &Ctx, args: ResultsArgs) -> anyhow::Result<ExitCode> {
    let id: fleetrun_proto::CommandId = args
        .command_id
        .parse()
        .map_err(|e| anyhow::anyhow!("bad command id {:?}: {e}", args.command_id))?;
    let ran = ctx.client()?.command_script(&id).await?;
    if ctx.format == Format::Json {
        render::print_json(&ran)?;
    } else {
        render::emit(&format!(
            "command {} ran script {} version {}\n",
            ran.command_id, ran.name, ran.version
        ))?;
        if !ran.results.is_empty() {
            let mut t = render::table(&["NODE", "KEY", "SIZE", "SHA-256"]);
            for r in &ran.results {
                t.add_row(vec![
                    r.node_id.to_string(),
                    r.key.clone(),
                    render::bytes(r.size),
                    r.sha256.clone(),
                ]);
            }
            render::print_table(&t)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn create(ctx: &Ctx, args: CreateArgs) -> anyhow::Result<ExitCode> {
    let body = read_body(&args.file)?;
    let s = ctx
        .client()?
        .create_script(&CreateScript {
            name: args.name,
            description: args.description,
            platform: args.platform,
            input: args.input,
            output: args.output,
            body,
        })
        .await?;
    print_version(ctx, &s)
}

async fn list(ctx: &Ctx, args: ListArgs) -> anyhow::Result<ExitCode> {
    let list = ctx
        .client()?
        .scripts(args.after.as_deref(), args.limit)
        .await?;
    if ctx.format == Format::Json {
        render::print_json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = render::table(&[
        "NAME",
        "VERSION",
        "PLATFORM",
        "INPUT",
        "OUTPUT",
        "UPDATED",
        "DESCRIPTION",
    ]);
    for s in &list {
        t.add_row(vec![
            s.name.clone(),
            s.latest_version.to_string(),
            s.platform.clone(),
            render::or_dash(s.input.as_deref().unwrap_or("")),
            render::or_dash(s.output.as_deref().unwrap_or("")),
            render::ago(&s.updated_at),
            render::first_line(&s.description, 60),
        ]);
    }
    render::print_table(&t)?;
    if let Some(last) = list.last()
        && list.len() == args.limit as usize
    {
        eprintln!("(more may follow: --after {})", last.name);
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(ctx: &Ctx, args: ShowArgs) -> anyhow::Result<ExitCode> {
    let s = ctx.client()?.script(&args.name, args.version).await?;
    if ctx.format == Format::Json {
        render::print_json(&s)?;
        return Ok(ExitCode::SUCCESS);
    }
    // The body alone, as stored: `fleetrun scripts show NAME > body.sh` gives a file to update.
    let Some(body) = s.body else {
        bail!("the server sent script {} without its body", s.name);
    };
    render::emit(&body)?;
    if !body.ends_with('\n') {
        render::emit("\n")?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn update(ctx: &Ctx, args: UpdateArgs) -> anyhow::Result<ExitCode> {
    let body = args.file.as_deref().map(read_body).transpose()?;
    let req = UpdateScript {
        description: args.description,
        platform: args.platform,
        input: args.input,
        output: args.output,
        body,
    };
    if req.description.is_none()
        && req.platform.is_none()
        && req.input.is_none()
        && req.output.is_none()
        && req.body.is_none()
    {
        bail!(
            "nothing to change: give --description, --platform, --input, --output-path or --file"
        );
    }
    let s = ctx.client()?.update_script(&args.name, &req).await?;
    print_version(ctx, &s)
}

async fn delete(ctx: &Ctx, args: NameArg) -> anyhow::Result<ExitCode> {
    ctx.client()?.delete_script(&args.name).await?;
    if ctx.format == Format::Table {
        render::emit(&format!("script {} deleted\n", args.name))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One script version as a table row, or the Script body with `-o json`.
fn print_version(ctx: &Ctx, s: &Script) -> anyhow::Result<ExitCode> {
    if ctx.format == Format::Json {
        render::print_json(s)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = render::table(&[
        "NAME", "VERSION", "PLATFORM", "INPUT", "OUTPUT", "SIZE", "SHA-256",
    ]);
    t.add_row(vec![
        s.name.clone(),
        s.version.to_string(),
        s.platform.clone(),
        render::or_dash(s.input.as_deref().unwrap_or("")),
        render::or_dash(s.output.as_deref().unwrap_or("")),
        render::bytes(s.size),
        s.sha256.clone(),
    ]);
    render::print_table(&t)?;
    Ok(ExitCode::SUCCESS)
}

/// A body file (`-` is stdin): UTF-8, at most [`SCRIPT_MAX`] bytes (read no further than that).
fn read_body(path: &Path) -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    let limit = SCRIPT_MAX as u64 + 1;
    if path.as_os_str() == "-" {
        std::io::stdin()
            .take(limit)
            .read_to_end(&mut bytes)
            .context("cannot read the script body from stdin")?;
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(limit).read_to_end(&mut bytes))
            .with_context(|| format!("cannot read script file {}", path.display()))?;
    }
    if bytes.len() > SCRIPT_MAX {
        bail!(
            "script file {} is over {SCRIPT_MAX} bytes (64 KiB, as SSM commands)",
            path.display()
        );
    }
    String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("script file {} is not UTF-8", path.display()))
}
