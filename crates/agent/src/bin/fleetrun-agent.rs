//! The `fleetrun-agent` binary: parses arguments, sets up logging, runs the agent library.

use clap::Parser;
use fleetrun_agent::AgentConfig;
use fleetrun_agent::config::{
    HEARTBEAT_SECS_DEFAULT, MAX_CONCURRENT_COMMANDS_DEFAULT, SPOOL_MAX_BYTES_DEFAULT, parse_tags,
};
use std::io::IsTerminal;
use std::path::PathBuf;

/// Connects this machine to a fleetrun server and runs the commands it sends.
#[derive(Debug, Parser)]
#[command(name = "fleetrun-agent", version)]
struct Args {
    /// The server's URL, e.g. https://fleet.example:8080; for server replicas, several,
    /// comma-separated (the next is dialled when the one in use cannot be reached)
    #[arg(long, env = "FLEETRUN_SERVER")]
    server: String,
    /// Directory for the node's identity and per-command files
    #[arg(long, env = "FLEETRUN_STATE_DIR")]
    state_dir: PathBuf,
    /// Activation code, needed on the first start only
    #[arg(long, env = "FLEETRUN_ACTIVATION_CODE", hide_env_values = true)]
    activation_code: Option<String>,
    /// The activation's id, as SSM's `CreateActivation` and the SSM agent's `-register` name it.
    /// Accepted so SSM set-up scripts run unchanged; the code alone identifies the activation
    #[arg(long, env = "FLEETRUN_ACTIVATION_ID", value_name = "ID")]
    activation_id: Option<String>,
    /// Display name of the node (default: the hostname)
    #[arg(long)]
    name: Option<String>,
    /// A tag KEY=VALUE to ask for at registration (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    tags: Vec<String>,
    /// Seconds between pings to the server
    #[arg(long, default_value_t = HEARTBEAT_SECS_DEFAULT)]
    heartbeat_secs: u64,
    /// Commands run at once; more wait in a queue
    #[arg(long, default_value_t = MAX_CONCURRENT_COMMANDS_DEFAULT)]
    max_concurrent_commands: usize,
    /// Session streams (e.g. live one-shot commands) open at once; more are refused
    #[arg(long, env = "FLEETRUN_MAX_STREAMS", default_value_t = fleetrun_agent::streams::MAX_STREAMS_DEFAULT)]
    max_streams: usize,
    /// Most bytes of unacknowledged output kept on disk (all commands); when full, commands
    /// block on output until the server catches up
    #[arg(long, env = "FLEETRUN_SPOOL_MAX_BYTES", default_value_t = SPOOL_MAX_BYTES_DEFAULT)]
    spool_max_bytes: u64,
    /// Age after which the node's key pair is replaced, without dropping the connection
    /// (e.g. 30d, 12h)
    #[arg(long, env = "FLEETRUN_KEY_ROTATION", default_value = "30d", value_parser = humantime::parse_duration)]
    key_rotation: std::time::Duration,
    /// How long a finished command's run directory is kept after the server stored its result;
    /// they are removed in batches, off the command path (e.g. 30s, 10m)
    #[arg(long, env = "FLEETRUN_SWEEP_AFTER", default_value = "30s", value_parser = humantime::parse_duration)]
    sweep_after: std::time::Duration,
    /// PEM file with the CA the server's certificate is signed by (its DATA_DIR/ca.pem)
    #[arg(long, env = "FLEETRUN_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Pin the server's CA on first contact by its SHA-256 fingerprint (printed with activation
    /// codes); the CA is then saved to the state dir
    #[arg(long, env = "FLEETRUN_CA_FINGERPRINT", value_name = "HEX")]
    ca_fingerprint: Option<String>,
    /// Allow a plain http:// server URL: commands, output and parameters cross the network in clear
    #[arg(long)]
    insecure_http: bool,
    /// Register under this EC2 instance id (i- and 17 hex digits) instead of a server-made mi- id,
    /// as SSM registers EC2 instances; used at registration only
    #[arg(long, env = "FLEETRUN_INSTANCE_ID", value_name = "ID")]
    instance_id: Option<String>,
    /// Do not ask the EC2 instance metadata service (IMDSv2) for the instance id at registration
    #[arg(long, env = "FLEETRUN_NO_IMDS")]
    no_imds: bool,
    /// Where the EC2 instance metadata service answers (asked at registration, within 1 s)
    #[arg(long, env = "FLEETRUN_IMDS_ENDPOINT", value_name = "URL", default_value = fleetrun_agent::imds::IMDS_ENDPOINT_DEFAULT)]
    imds_endpoint: String,
}

fn config(args: Args) -> anyhow::Result<AgentConfig> {
    let mut config = AgentConfig::new(args.server, args.state_dir);
    if let Some(id) = &args.activation_id
        && (id.is_empty()
            || id.len() > 64
            || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
    {
        anyhow::bail!("--activation-id {id:?} is not an activation id (a UUID)");
    }
    config.activation_code = args.activation_code;
    config.name = args.name;
    config.tags = parse_tags(&args.tags)?;
    config.heartbeat_secs = args.heartbeat_secs;
    config.max_concurrent_commands = args.max_concurrent_commands;
    config.max_streams = args.max_streams;
    config.spool_max_bytes = args.spool_max_bytes;
    config.key_rotation = args.key_rotation;
    config.sweep_after = args.sweep_after;
    config.ca_cert = args.ca_cert;
    config.ca_fingerprint = args.ca_fingerprint;
    config.insecure_http = args.insecure_http;
    config.instance_id = args.instance_id;
    config.imds_endpoint = (!args.no_imds).then_some(args.imds_endpoint);
    config.validate()?;
    Ok(config)
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = config(args).and_then(|config| {
        // One thread is plenty for one connection and a few pipes, and keeps the agent small;
        // `wait4` runs on tokio's blocking threads.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let r = rt.block_on(fleetrun_agent::run(config));
        // Do not wait for blocking threads (a `wait4` may still be running) on the way out.
        std::mem::forget(rt);
        r
    });
    if let Err(e) = result {
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("fleetrun-agent: {msg}");
        std::process::exit(1);
    }
}
