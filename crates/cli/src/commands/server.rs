//! `fleetrun server`: runs the control plane in this process.
//!
//! Settings come from flags, env, an optional TOML file, then defaults, in that order.

use crate::config::project_dirs;
use anyhow::{Context, bail};
use fleetrun_server::sessions::recording::{OnFailure, Settings};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Listen address when none is given.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:8080";
/// Seconds between agent pings when none is given.
pub const HEARTBEAT_SECS_DEFAULT: u64 = 15;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the database, output and admin token live [default: ~/.local/share/fleetrun]
    #[arg(
        long,
        env = "FLEETRUN_DATA_DIR",
        hide_env_values = true,
        value_name = "DIR"
    )]
    data_dir: Option<PathBuf>,
    /// The database: postgres://USER:PASSWORD@HOST:PORT/DB (PostgreSQL) or sqlite:PATH
    /// [default: SQLite in the data dir]
    #[arg(
        long,
        env = "FLEETRUN_DATABASE",
        hide_env_values = true,
        value_name = "URL"
    )]
    database: Option<String>,
    /// The NATS server that several replicas on one PostgreSQL database share, e.g.
    /// nats://127.0.0.1:4222 (README: "Running several replicas") [default: none, one server]
    #[arg(
        long,
        env = "FLEETRUN_NATS_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    nats_url: Option<String>,
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(
        long,
        env = "FLEETRUN_LISTEN",
        hide_env_values = true,
        value_name = "ADDR"
    )]
    listen: Option<SocketAddr>,
    /// Seconds between agent pings [default: 15]
    #[arg(long, value_name = "N")]
    heartbeat_secs: Option<u64>,
    /// Purge commands and their output older than this, e.g. 30d, 12h, 90s [default: 30d]
    #[arg(
        long,
        env = "FLEETRUN_RETENTION",
        hide_env_values = true,
        value_name = "DURATION",
        value_parser = parse_duration
    )]
    retention: Option<Duration>,
    /// How often to look for commands past retention, e.g. 1h, 10m [default: 1h]
    #[arg(
        long,
        env = "FLEETRUN_PURGE_INTERVAL",
        hide_env_values = true,
        value_name = "DURATION",
        value_parser = parse_duration
    )]
    purge_interval: Option<Duration>,
    /// Most agent handshakes at once; more are told to retry later (503) [default: 128]
    #[arg(
        long,
        env = "FLEETRUN_MAX_HANDSHAKES",
        hide_env_values = true,
        value_name = "N"
    )]
    max_handshakes: Option<usize>,
    /// PEM certificate chain to serve instead of the server's own CA's certificate (with --tls-key)
    #[arg(
        long,
        env = "FLEETRUN_TLS_CERT",
        hide_env_values = true,
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(
        long,
        env = "FLEETRUN_TLS_KEY",
        hide_env_values = true,
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// Another DNS name or IP address for the server's own certificate (repeatable)
    #[arg(long = "tls-san", value_name = "NAME")]
    tls_sans: Vec<String>,
    /// Serve plain HTTP, without TLS: tokens, scripts and output cross the network in clear text
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_sans"])]
    insecure_http: bool,
    /// A TOML file with data_dir, database, nats_url, listen, heartbeat_secs, retention, purge_interval, max_handshakes,
    /// rate_limit, secrets_key_file, tls_cert, tls_key, tls_sans, insecure_http and the timeouts,
    /// connection caps and recording settings below
    #[arg(
        long,
        env = "FLEETRUN_SERVER_CONFIG",
        hide_env_values = true,
        value_name = "FILE"
    )]
    config: Option<PathBuf>,
    #[command(flatten)]
    object_store: super::object_store::ObjectStoreArgs,
    /// Requests per second each API principal may make (bursts of 4x); 0 turns the limit off [default: 50]
    #[arg(
        long,
        env = "FLEETRUN_RATE_LIMIT",
        hide_env_values = true,
        value_name = "N"
    )]
    rate_limit: Option<u32>,
    /// The 32-byte key that seals secrets (secure parameters, access keys) [default: DATA_DIR/secrets.key]
    #[arg(
        long,
        env = "FLEETRUN_SECRETS_KEY_FILE",
        hide_env_values = true,
        value_name = "FILE"
    )]
    secrets_key_file: Option<PathBuf>,
    /// CA certificates (PEM) to trust, besides the system's, for saved scripts' https:// inputs
    #[arg(long, value_name = "FILE")]
    script_input_ca: Option<PathBuf>,
    /// Largest output file a saved script run ships back into the object store, in bytes [default: 5 GiB]
    #[arg(long, value_name = "BYTES")]
    script_output_max: Option<u64>,
    /// Buckets (names, * globs; comma-separated) that output to S3 may go to and s3:// script
    /// inputs may come from [default: only the object store's own bucket]
    #[arg(
        long,
        env = "FLEETRUN_ALLOWED_BUCKETS",
        value_name = "PATTERN,...",
        value_delimiter = ','
    )]
    allowed_buckets: Option<Vec<String>>,
    /// Longest wait for a request head, also between requests on a kept-alive connection [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    header_read_timeout: Option<Duration>,
    /// Longest time a request body may take to arrive; then 408 [default: 60s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    body_read_timeout: Option<Duration>,
    /// Time an agent has from its WebSocket upgrade to a valid Hello or Register [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    agent_handshake_timeout: Option<Duration>,
    /// Most connections open at once, agents included [default: the open-file limit less 256]
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Most HTTP connections one address may hold open, at most half of --max-connections [default: 256]
    #[arg(long, value_name = "N")]
    max_connections_per_address: Option<usize>,
    /// Most agent handshakes in progress from one address; 0 = no limit [default: 32]
    #[arg(long, value_name = "N")]
    max_handshakes_per_address: Option<usize>,
    /// On SIGTERM or SIGINT, how long requests in progress and agent channels get to finish [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    shutdown_grace: Option<Duration>,
    /// A session (fleetrun exec) with no bytes either way for this long is ended [default: 20m]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    session_idle_timeout: Option<Duration>,
    /// A session running this long is ended; 0 = no limit [default: 0]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    session_max_duration: Option<Duration>,
    /// A replica silent this long (no heartbeat, every third of it) has its commands taken over by
    /// the others on the database [default: 6s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    replica_lease: Option<Duration>,
    /// Record interactive sessions as asciicast files in the object store: on or off [default: on]
    #[arg(
        long,
        env = "FLEETRUN_SESSION_RECORDING",
        hide_env_values = true,
        value_name = "on|off",
        value_parser = parse_on_off
    )]
    session_recording: Option<bool>,
    /// Record what is typed in sessions too (it holds typed passwords) [default: off]
    #[arg(long, env = "FLEETRUN_RECORD_INPUT", hide_env_values = true)]
    record_input: bool,
    /// When a session's recording cannot be written: close (refuse or end the session) or
    /// continue without a recording [default: close]
    #[arg(
        long,
        env = "FLEETRUN_RECORDING_FAILURE",
        hide_env_values = true,
        value_name = "close|continue"
    )]
    recording_failure: Option<OnFailure>,
}

/// `on` or `off`.
fn parse_on_off(s: &str) -> Result<bool, String> {
    match s.trim() {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("{other:?}: use on or off")),
    }
}

/// The server's config file. Unknown keys are an error, so a typo does not silently fall back.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    data_dir: Option<PathBuf>,
    database: Option<String>,
    nats_url: Option<String>,
    listen: Option<SocketAddr>,
    heartbeat_secs: Option<u64>,
    /// A duration such as "30d".
    retention: Option<String>,
    /// A duration such as "1h".
    purge_interval: Option<String>,
    max_handshakes: Option<usize>,
    rate_limit: Option<u32>,
    secrets_key_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_sans: Option<Vec<String>>,
    insecure_http: Option<bool>,
    /// Durations such as "30s".
    header_read_timeout: Option<String>,
    body_read_timeout: Option<String>,
    agent_handshake_timeout: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_address: Option<usize>,
    max_handshakes_per_address: Option<usize>,
    shutdown_grace: Option<String>,
    session_idle_timeout: Option<String>,
    /// "0" for no limit.
    session_max_duration: Option<String>,
    /// A duration such as "6s".
    replica_lease: Option<String>,
    object_store: Option<super::object_store::ObjectStoreFile>,
    script_input_ca: Option<PathBuf>,
    script_output_max: Option<u64>,
    allowed_buckets: Option<Vec<String>>,
    session_recording: Option<bool>,
    record_input: Option<bool>,
    /// "close" or "continue".
    recording_failure: Option<String>,
}

/// Parses a duration as humantime spells it: `30d`, `12h`, `90s`, `1h 30m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. 30d, 12h or 90s"))
}

/// A duration from the config file, named by its key in errors.
fn file_duration(key: &str, v: Option<String>) -> anyhow::Result<Option<Duration>> {
    v.map(|s| parse_duration(&s).map_err(|e| anyhow::anyhow!("bad {key} in server config: {e}")))
        .transpose()
}

/// Resolves the server's settings: flag > env (clap merges these two) > file > default.
fn resolve(args: Args) -> anyhow::Result<fleetrun_server::ServerConfig> {
    let file = match &args.config {
        Some(path) => load_file(path)?,
        None => ServerFile::default(),
    };
    let data_dir = match args.data_dir.or(file.data_dir) {
        Some(d) => d,
        None => default_data_dir()?,
    };
    let database = args
        .database
        .or(file.database)
        .map(|d| fleetrun_server::Database::parse(&d))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let nats_url = args.nats_url.or(file.nats_url).map(|u| u.trim().to_owned());
    if let Some(url) = &nats_url
        && !(url.starts_with("nats://") || url.starts_with("tls://"))
    {
        // Not echoed: it may hold a password.
        bail!("nats_url is not a nats:// or tls:// URL; use e.g. nats://127.0.0.1:4222");
    }
    let listen = match args.listen.or(file.listen) {
        Some(l) => l,
        None => LISTEN_DEFAULT
            .parse()
            .context("bad default listen address")?,
    };
    let heartbeat_secs = args
        .heartbeat_secs
        .or(file.heartbeat_secs)
        .unwrap_or(HEARTBEAT_SECS_DEFAULT);
    if !(1..=3600).contains(&heartbeat_secs) {
        bail!("heartbeat_secs must be 1 to 3600, not {heartbeat_secs}");
    }
    let retention = match args.retention {
        Some(r) => r,
        None => file_duration("retention", file.retention)?
            .unwrap_or(fleetrun_server::ServerConfig::DEFAULT_RETENTION),
    };
    if retention < Duration::from_secs(1) {
        bail!("retention must be at least 1s");
    }
    let purge_interval = match args.purge_interval {
        Some(p) => p,
        None => file_duration("purge_interval", file.purge_interval)?
            .unwrap_or(fleetrun_server::ServerConfig::DEFAULT_PURGE_INTERVAL),
    };
    if purge_interval < Duration::from_secs(1) {
        bail!("purge interval must be at least 1s");
    }
    let max_handshakes = args
        .max_handshakes
        .or(file.max_handshakes)
        .unwrap_or(fleetrun_server::ServerConfig::DEFAULT_MAX_HANDSHAKES);
    if max_handshakes == 0 {
        bail!("max handshakes must be at least 1");
    }
    let rate_limit = args
        .rate_limit
        .or(file.rate_limit)
        .unwrap_or(fleetrun_server::ServerConfig::DEFAULT_RATE_LIMIT);
    use fleetrun_server::ServerConfig as D;
    let timeout = |key: &str, flag: Option<Duration>, file: Option<String>, default: Duration| {
        let d = match flag {
            Some(d) => d,
            None => file_duration(key, file)?.unwrap_or(default),
        };
        if d.is_zero() {
            bail!("{key} must be more than 0");
        }
        Ok::<_, anyhow::Error>(d)
    };
    let header_read_timeout = timeout(
        "header_read_timeout",
        args.header_read_timeout,
        file.header_read_timeout,
        D::DEFAULT_HEADER_READ_TIMEOUT,
    )?;
    let body_read_timeout = timeout(
        "body_read_timeout",
        args.body_read_timeout,
        file.body_read_timeout,
        D::DEFAULT_BODY_READ_TIMEOUT,
    )?;
    let agent_handshake_timeout = timeout(
        "agent_handshake_timeout",
        args.agent_handshake_timeout,
        file.agent_handshake_timeout,
        D::DEFAULT_AGENT_HANDSHAKE_TIMEOUT,
    )?;
    let shutdown_grace = timeout(
        "shutdown_grace",
        args.shutdown_grace,
        file.shutdown_grace,
        D::DEFAULT_SHUTDOWN_GRACE,
    )?;
    let session_idle_timeout = timeout(
        "session_idle_timeout",
        args.session_idle_timeout,
        file.session_idle_timeout,
        D::DEFAULT_SESSION_IDLE_TIMEOUT,
    )?;
    let replica_lease = timeout(
        "replica_lease",
        args.replica_lease,
        file.replica_lease,
        D::DEFAULT_REPLICA_LEASE,
    )?;
    let session_max_duration = match args.session_max_duration {
        Some(d) => Some(d),
        None => file_duration("session_max_duration", file.session_max_duration)?,
    }
    .filter(|d| !d.is_zero());
    let max_connections = args.max_connections.or(file.max_connections).unwrap_or(0);
    let max_connections_per_address = args
        .max_connections_per_address
        .or(file.max_connections_per_address)
        .unwrap_or(D::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS);
    let max_handshakes_per_address = args
        .max_handshakes_per_address
        .or(file.max_handshakes_per_address)
        .unwrap_or(D::DEFAULT_MAX_HANDSHAKES_PER_ADDRESS);
    let tls = tls_mode(
        args.tls_cert.or(file.tls_cert),
        args.tls_key.or(file.tls_key),
        if args.tls_sans.is_empty() {
            file.tls_sans.unwrap_or_default()
        } else {
            args.tls_sans
        },
        args.insecure_http || file.insecure_http.unwrap_or(false),
    )?;
    let object_store = super::object_store::resolve(args.object_store, file.object_store)?;
    let on_failure = match args.recording_failure {
        Some(f) => f,
        None => file
            .recording_failure
            .map(|s| s.parse::<OnFailure>())
            .transpose()
            .map_err(|e| anyhow::anyhow!("bad recording_failure in server config: {e}"))?
            .unwrap_or_default(),
    };
    let recording = Settings {
        enabled: args
            .session_recording
            .or(file.session_recording)
            .unwrap_or(true),
        record_input: args.record_input || file.record_input.unwrap_or(false),
        on_failure,
    };
    Ok(fleetrun_server::ServerConfig {
        database,
        object_store,
        tls,
        recording,
        heartbeat_secs,
        retention,
        purge_interval,
        max_handshakes,
        rate_limit,
        secrets_key_file: args.secrets_key_file.or(file.secrets_key_file),
        script_input_ca: args.script_input_ca.or(file.script_input_ca),
        script_output_max: args
            .script_output_max
            .or(file.script_output_max)
            .unwrap_or(fleetrun_server::scripts::runner::OUTPUT_MAX_DEFAULT),
        allowed_buckets: args.allowed_buckets.or(file.allowed_buckets),
        header_read_timeout,
        body_read_timeout,
        agent_handshake_timeout,
        max_connections,
        max_connections_per_address,
        max_handshakes_per_address,
        shutdown_grace,
        session_idle_timeout,
        session_max_duration,
        replica_lease,
        nats_url,
        ..fleetrun_server::ServerConfig::new(data_dir, listen)
    })
}

/// The listener's TLS: the server's own CA unless the operator gives a certificate and key, or
/// asks for plain HTTP.
fn tls_mode(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    sans: Vec<String>,
    insecure_http: bool,
) -> anyhow::Result<fleetrun_server::net::tls::TlsMode> {
    use fleetrun_server::net::tls::TlsMode;
    if let Some(bad) = sans.iter().find(|s| s.trim().is_empty() || s.contains(',')) {
        bail!("--tls-san {bad:?} must be one DNS name or IP address");
    }
    match (cert, key, insecure_http) {
        (None, None, true) if sans.is_empty() => Ok(TlsMode::Insecure),
        (_, _, true) => {
            bail!("insecure_http cannot be combined with tls_cert, tls_key or tls_sans")
        }
        (Some(cert), Some(key), false) if sans.is_empty() => Ok(TlsMode::Files { cert, key }),
        (Some(_), Some(_), false) => bail!(
            "tls_sans apply to the server's own certificate; with tls_cert the names are in that certificate"
        ),
        (None, None, false) => Ok(TlsMode::Auto { extra_sans: sans }),
        _ => bail!("tls_cert and tls_key go together: give both or neither"),
    }
}

fn load_file(path: &Path) -> anyhow::Result<ServerFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read server config {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        // toml's message spans several lines with a source excerpt; keep the one naming the problem.
        let msg = e.message().to_owned();
        anyhow::anyhow!("bad server config {}: {msg}", path.display())
    })
}

/// `~/.local/share/fleetrun` on Linux.
pub fn default_data_dir() -> anyhow::Result<PathBuf> {
    Ok(project_dirs()
        .context("cannot find a home directory for the data dir: pass --data-dir")?
        .data_dir()
        .to_path_buf())
}

/// Logs to stderr; `RUST_LOG` overrides the level. Colours only on a terminal, so a log file (or a
/// journal) gets plain `key=value` text.
pub fn init_logging(default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    init_logging("info");
    let config = resolve(args)?;
    let data_dir = config.data_dir.clone();
    let stop = stop_signal()?;
    let server = fleetrun_server::start(config)
        .await
        .with_context(|| format!("cannot start the server (data dir {})", data_dir.display()))?;
    if let Some(token) = &server.admin_token {
        println!(
            "admin token: {token} (saved to {})",
            server.admin_token_path.display()
        );
    }
    if server.public_url.starts_with("http://") {
        eprintln!(
            "WARNING: TLS is OFF (--insecure-http): API tokens, access keys, scripts and output cross the network in clear text. Use this only on a network you trust completely."
        );
    }
    println!("listening on {} ({})", server.public_url, server.local_addr);
    if let (Some(ca), Some(fingerprint)) = (&server.ca_path, &server.ca_fingerprint) {
        println!(
            "CA certificate: {} (fingerprint {fingerprint})",
            ca.display()
        );
        println!("  the CLI trusts it with --ca-cert {}", ca.display());
    }
    let ended = server.serve_until(stop).await?;
    Ok(exit_code(ended))
}

/// Completes on the first SIGTERM or SIGINT (the handlers are installed before this returns, so a
/// signal that comes while the server starts is not lost).
pub fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{name}: stopping");
    })
}

/// The process's exit code after a shutdown: 0 only when everything finished within the grace.
pub fn exit_code(ended: fleetrun_server::Ended) -> ExitCode {
    match ended {
        fleetrun_server::Ended::Clean => ExitCode::SUCCESS,
        fleetrun_server::Ended::GraceExpired => {
            eprintln!(
                "error: the shutdown grace period ran out; what was still running was dropped"
            );
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_settings_fill_in_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:9\"\nheartbeat_secs = 3\n").unwrap();
        let args = |config: Option<PathBuf>| Args {
            data_dir: Some(dir.path().into()),
            database: None,
            nats_url: None,
            listen: None,
            heartbeat_secs: None,
            retention: None,
            purge_interval: None,
            max_handshakes: None,
            tls_cert: None,
            tls_key: None,
            tls_sans: Vec::new(),
            insecure_http: false,
            config,
            object_store: Default::default(),
            rate_limit: None,
            secrets_key_file: None,
            script_input_ca: None,
            script_output_max: None,
            allowed_buckets: None,
            header_read_timeout: None,
            body_read_timeout: None,
            agent_handshake_timeout: None,
            max_connections: None,
            max_connections_per_address: None,
            max_handshakes_per_address: None,
            shutdown_grace: None,
            session_idle_timeout: None,
            session_max_duration: None,
            replica_lease: None,
            session_recording: None,
            record_input: false,
            recording_failure: None,
        };
        let c = resolve(args(Some(path.clone()))).unwrap();
        assert_eq!(c.listen.port(), 9);
        assert_eq!(c.heartbeat_secs, 3);
        assert_eq!(c.data_dir, dir.path());
        assert_eq!(
            c.retention,
            fleetrun_server::ServerConfig::DEFAULT_RETENTION
        );
        assert_eq!(c.max_handshakes, 128);

        std::fs::write(
            &path,
            "retention = \"2d\"\npurge_interval = \"10m\"\nmax_handshakes = 4\n",
        )
        .unwrap();
        let c = resolve(args(Some(path.clone()))).unwrap();
        assert_eq!(c.retention, Duration::from_secs(2 * 86_400));
        assert_eq!(c.purge_interval, Duration::from_secs(600));
        assert_eq!(c.max_handshakes, 4);
        // Flags win over the file.
        let mut a = args(Some(path.clone()));
        a.retention = Some(Duration::from_secs(2));
        a.max_handshakes = Some(9);
        let c = resolve(a).unwrap();
        assert_eq!(c.retention, Duration::from_secs(2));
        assert_eq!(c.max_handshakes, 9);

        std::fs::write(
            &path,
            "header_read_timeout = \"3s\"\nmax_connections_per_address = 7\n",
        )
        .unwrap();
        let c = resolve(args(Some(path.clone()))).unwrap();
        assert_eq!(c.header_read_timeout, Duration::from_secs(3));
        assert_eq!(c.body_read_timeout, Duration::from_secs(60));
        assert_eq!(c.max_connections_per_address, 7);
        let mut a = args(None);
        a.agent_handshake_timeout = Some(Duration::ZERO);
        assert!(resolve(a).is_err());

        // Session timeouts: the idle one from the file, a max duration of 0 is no limit.
        assert_eq!(c.session_idle_timeout, Duration::from_secs(20 * 60));
        assert_eq!(c.session_max_duration, None);
        std::fs::write(
            &path,
            "session_idle_timeout = \"5m\"\nsession_max_duration = \"12h\"\n",
        )
        .unwrap();
        let c = resolve(args(Some(path.clone()))).unwrap();
        assert_eq!(c.session_idle_timeout, Duration::from_secs(300));
        assert_eq!(c.session_max_duration, Some(Duration::from_secs(12 * 3600)));
        let mut a = args(Some(path.clone()));
        a.session_max_duration = Some(Duration::ZERO);
        assert_eq!(resolve(a).unwrap().session_max_duration, None);
        let mut a = args(None);
        a.session_idle_timeout = Some(Duration::ZERO);
        assert!(resolve(a).is_err());

        // Recordings: on, without input, failing closed; the file or the flags change that.
        assert_eq!(c.recording, Settings::default());
        std::fs::write(
            &path,
            "session_recording = false\nrecord_input = true\nrecording_failure = \"continue\"\n",
        )
        .unwrap();
        let c = resolve(args(Some(path.clone()))).unwrap();
        assert_eq!(
            c.recording,
            Settings {
                enabled: false,
                record_input: true,
                on_failure: OnFailure::Continue
            }
        );
        let mut a = args(Some(path.clone()));
        a.session_recording = Some(true);
        a.recording_failure = Some(OnFailure::Close);
        let c = resolve(a).unwrap();
        assert!(c.recording.enabled);
        assert_eq!(c.recording.on_failure, OnFailure::Close);
        std::fs::write(&path, "recording_failure = \"ignore\"\n").unwrap();
        let err = format!("{:#}", resolve(args(Some(path.clone()))).unwrap_err());
        assert!(
            err.contains("recording_failure") && err.contains("close or continue"),
            "{err}"
        );

        std::fs::write(&path, "retention = \"soon\"\n").unwrap();
        let err = format!("{:#}", resolve(args(Some(path.clone()))).unwrap_err());
        assert!(err.contains("retention"), "{err}");
        let mut a = args(None);
        a.max_handshakes = Some(0);
        assert!(resolve(a).is_err());

        std::fs::write(&path, "insecure_http = true\ntls_sans = [\"a\"]\n").unwrap();
        let err = format!("{:#}", resolve(args(Some(path.clone()))).unwrap_err());
        assert!(err.contains("insecure_http"), "{err}");
        std::fs::write(&path, "tls_sans = [\"fleet.example\"]\n").unwrap();
        assert!(matches!(
            resolve(args(Some(path.clone()))).unwrap().tls,
            fleetrun_server::net::tls::TlsMode::Auto { ref extra_sans } if extra_sans == &["fleet.example"]
        ));
        std::fs::write(&path, "tls_cert = \"c.pem\"\n").unwrap();
        assert!(resolve(args(Some(path.clone()))).is_err());

        // The database: SQLite in the data dir unless the file or the flag names one.
        assert_eq!(c.database, None);
        std::fs::write(&path, "database = \"postgres://fleet:pw@db/fleetrun\"\n").unwrap();
        let c = resolve(args(Some(path.clone()))).unwrap();
        assert_eq!(
            c.database,
            Some(fleetrun_server::Database::Postgres(
                "postgres://fleet:pw@db/fleetrun".into()
            ))
        );
        let mut a = args(Some(path.clone()));
        a.database = Some("sqlite:/tmp/other.db".into());
        assert_eq!(
            resolve(a).unwrap().database,
            Some(fleetrun_server::Database::Sqlite("/tmp/other.db".into()))
        );
        std::fs::write(&path, "database = \"mysql://root:pw@db/x\"\n").unwrap();
        let err = format!("{:#}", resolve(args(Some(path.clone()))).unwrap_err());
        assert!(
            err.contains("postgres://") && !err.contains(":pw@"),
            "{err}"
        );

        std::fs::write(&path, "listn = \"127.0.0.1:9\"\n").unwrap();
        let err = load_file(&path).unwrap_err().to_string();
        assert!(err.contains("listn"), "{err}");
    }
}
