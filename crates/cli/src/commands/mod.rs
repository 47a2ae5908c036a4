//! The command tree (clap derive) and dispatch; one file per subcommand family.

mod access_key;
mod activation;
mod audit;
mod cancel;
mod command;
mod cp;
mod dev;
mod documents;
mod exec;
mod forward;
mod nodes;
mod object_store;
mod objects;
mod output;
mod params;
mod policies;
mod recording;
mod scripts;
mod send;
mod server;
mod sessions;
mod shell;
mod storage;
mod users;

use crate::client::Client;
use crate::config;
use crate::render::Format;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Run shell commands on a fleet of machines: a self-hosted take on AWS SSM Run Command.
#[derive(Debug, Parser)]
#[command(name = "fleetrun", version, propagate_version = true)]
pub struct Cli {
    /// Server URL, e.g. https://127.0.0.1:8080 (else the config file's `server`)
    #[arg(
        long,
        env = "FLEETRUN_SERVER",
        global = true,
        hide_env_values = true,
        value_name = "URL",
        help_heading = "Global options"
    )]
    server: Option<String>,
    /// API token (else the config file's `token`)
    #[arg(
        long,
        env = "FLEETRUN_TOKEN",
        global = true,
        hide_env_values = true,
        value_name = "TOKEN",
        help_heading = "Global options"
    )]
    token: Option<String>,
    /// CA certificate (PEM) to trust for the server, e.g. its DATA_DIR/ca.pem (else the config
    /// file's `ca_cert`, else the system's roots)
    #[arg(
        long,
        env = "FLEETRUN_CA_CERT",
        global = true,
        hide_env_values = true,
        value_name = "FILE",
        help_heading = "Global options"
    )]
    ca_cert: Option<std::path::PathBuf>,
    /// Output format
    #[arg(
        short = 'o',
        long = "output",
        value_enum,
        default_value_t = Format::Table,
        global = true,
        help_heading = "Global options"
    )]
    format: Format,
    #[command(subcommand)]
    command: Subcommands,
}

#[derive(Debug, Subcommand)]
enum Subcommands {
    /// Run the control plane
    Server(Box<server::Args>),
    /// Run a server and an agent in this process, and point the CLI at them
    Dev(dev::Args),
    /// Create or list activation codes that agents register with
    #[command(subcommand)]
    Activation(activation::Cmd),
    /// List managed nodes, or deregister one
    Nodes {
        #[command(subcommand)]
        cmd: Option<nodes::Cmd>,
    },
    /// Run a shell script, or a Command document, on nodes
    Send(Box<send::Args>),
    /// Run a command on one node live: its output streamed, stdin piped, its exit status ours
    Exec(exec::Args),
    /// Open an interactive shell on one node (a PTY there), or run a command with -c
    Shell(shell::Args),
    /// Forward local TCP ports to ports reached from a node (its own, or hosts it can reach)
    PortForward(forward::ForwardArgs),
    /// Copy a file to a node or from one (LOCAL NODE:PATH, NODE:PATH LOCAL), checked end to end
    Cp(cp::Args),
    /// Join stdin and stdout to one TCP connection made from a node (an ssh ProxyCommand)
    Proxy(forward::ProxyArgs),
    /// List sessions (exec, shell, port-forward), newest first; show or terminate one, get or play its recording
    Sessions(sessions::Args),
    /// List recent commands, newest first
    Commands(command::ListArgs),
    /// Show one command and its invocations
    Command(command::ShowArgs),
    /// List a command's invocations
    Invocations(command::ShowArgs),
    /// Print one invocation's output, byte for byte
    Output(output::Args),
    /// Cancel a command, or some of its invocations
    Cancel(cancel::Args),
    /// Show what the server stores and how long it keeps it
    Storage,
    /// Create, list, show, update and delete Command documents for `send --document`
    #[command(subcommand)]
    Documents(documents::Cmd),
    /// Create or list access keys for the SSM-compatible API (AWS CLI, boto3)
    #[command(subcommand)]
    AccessKey(access_key::Cmd),
    /// Query the audit trail, or verify its hash chain
    Audit(audit::Args),
    /// Create, list, change and delete users (principals that tokens and access keys act as)
    #[command(subcommand)]
    Users(users::UsersCmd),
    /// Create, list and revoke API tokens
    #[command(subcommand)]
    Tokens(users::TokensCmd),
    /// Check a token against a server and save both in the CLI config
    Login(users::LoginArgs),
    /// Show who the CLI's token acts as
    Whoami,
    /// Validate Cedar policy files; show the schema and the built-in roles
    #[command(subcommand)]
    Policies(policies::Cmd),
    /// Put, list, show and delete parameters that scripts reference as {{param:NAME}}
    #[command(subcommand)]
    Params(params::Cmd),
    /// Put, get, list and delete objects kept by the server (script inputs, results, files)
    #[command(subcommand)]
    Objects(objects::Cmd),
    /// Create, list, show, update and delete saved scripts (with an input and an output file)
    #[command(subcommand)]
    Scripts(Box<scripts::Cmd>),
}

/// What every API subcommand needs: the connection settings and the output format.
pub struct Ctx {
    server: Option<String>,
    token: Option<String>,
    ca_cert: Option<std::path::PathBuf>,
    format: Format,
}

impl Ctx {
    /// A client for the resolved server and token.
    fn client(&self) -> anyhow::Result<Client> {
        let conn = config::resolve(
            self.server.clone(),
            self.token.clone(),
            self.ca_cert.clone(),
        )?;
        Client::new(&conn)
    }

    /// A client for a session's stream URL (`ws://` or `wss://`, SSM StartSession's `StreamUrl`)
    /// and its token, trusting what `client` would; with the URL's path.
    fn stream_client(&self, url: &str, token: String) -> anyhow::Result<(Client, String)> {
        let (scheme, rest) = match url.split_once("://") {
            Some(("wss", rest)) => ("https", rest),
            Some(("ws", rest)) => ("http", rest),
            _ => anyhow::bail!("the stream URL {url} is not ws:// or wss://"),
        };
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if host.is_empty() || path.is_empty() {
            anyhow::bail!("the stream URL {url} has no host or no path");
        }
        let conn = config::resolve(
            Some(format!("{scheme}://{host}")),
            Some(token),
            self.ca_cert.clone(),
        )?;
        Ok((Client::new(&conn)?, path.to_owned()))
    }
}

/// Runs the parsed command line; the exit code tells success (0) from failure (1).
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ctx = Ctx {
        server: cli.server,
        token: cli.token,
        ca_cert: cli.ca_cert,
        format: cli.format,
    };
    match cli.command {
        Subcommands::Server(args) => server::run(*args).await,
        Subcommands::Dev(args) => dev::run(args).await,
        Subcommands::Activation(cmd) => activation::run(&ctx, cmd).await,
        Subcommands::Nodes { cmd } => nodes::run(&ctx, cmd).await,
        Subcommands::Send(args) => send::run(&ctx, *args).await,
        Subcommands::Exec(args) => exec::run(&ctx, args).await,
        Subcommands::Shell(args) => shell::run(&ctx, args).await,
        Subcommands::PortForward(args) => forward::port_forward(&ctx, args).await,
        Subcommands::Cp(args) => cp::run(&ctx, args).await,
        Subcommands::Proxy(args) => forward::proxy(&ctx, args).await,
        Subcommands::Sessions(args) => sessions::run(&ctx, args).await,
        Subcommands::Commands(args) => command::list(&ctx, args).await,
        Subcommands::Command(args) => command::show(&ctx, args).await,
        Subcommands::Invocations(args) => command::invocations(&ctx, args).await,
        Subcommands::Output(args) => output::run(&ctx, args).await,
        Subcommands::Cancel(args) => cancel::run(&ctx, args).await,
        Subcommands::Storage => storage::run(&ctx).await,
        Subcommands::Documents(cmd) => documents::run(&ctx, cmd).await,
        Subcommands::Scripts(cmd) => scripts::run(&ctx, *cmd).await,
        Subcommands::AccessKey(cmd) => access_key::run(&ctx, cmd).await,
        Subcommands::Audit(args) => audit::run(&ctx, args).await,
        Subcommands::Users(cmd) => users::users(&ctx, cmd).await,
        Subcommands::Tokens(cmd) => users::tokens(&ctx, cmd).await,
        Subcommands::Login(args) => users::login(&ctx, args).await,
        Subcommands::Whoami => users::whoami(&ctx).await,
        Subcommands::Policies(cmd) => policies::run(cmd),
        Subcommands::Params(cmd) => params::run(&ctx, cmd).await,
        Subcommands::Objects(cmd) => objects::run(&ctx, cmd).await,
    }
}

/// Parses a command id given on the command line.
fn parse_command_id(s: &str) -> anyhow::Result<fleetrun_proto::CommandId> {
    Ok(s.trim().parse()?)
}

/// Parses node ids given on the command line.
fn parse_node_ids(ids: &[String]) -> anyhow::Result<Vec<fleetrun_proto::NodeId>> {
    ids.iter()
        .map(|s| s.trim().parse().map_err(anyhow::Error::from))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_tree_is_consistent() {
        Cli::command().debug_assert();
    }
}
