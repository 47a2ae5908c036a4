//! `fleetrun server`: runs the control plane in this process.
//!
//! Settings come from flags, env, an optional TOML file, then defaults, in that order.

use crate::config::project_dirs;
use anyhow::{Context, bail};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
    /// A TOML file with data_dir, listen and heartbeat_secs
    #[arg(
        long,
        env = "FLEETRUN_SERVER_CONFIG",
        hide_env_values = true,
        value_name = "FILE"
    )]
    config: Option<PathBuf>,
}

/// The server's config file. Unknown keys are an error, so a typo does not silently fall back.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    heartbeat_secs: Option<u64>,
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
    Ok(fleetrun_server::ServerConfig {
        heartbeat_secs,
        ..fleetrun_server::ServerConfig::new(data_dir, listen)
    })
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

/// Logs to stderr; `RUST_LOG` overrides the level.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    init_logging("info");
    let config = resolve(args)?;
    let data_dir = config.data_dir.clone();
    let server = fleetrun_server::start(config)
        .await
        .with_context(|| format!("cannot start the server (data dir {})", data_dir.display()))?;
    if let Some(token) = &server.admin_token {
        println!(
            "admin token: {token} (saved to {})",
            server.admin_token_path.display()
        );
    }
    println!("listening on http://{}", server.local_addr);
    server.wait().await?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_settings_fill_in_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:9\"\nheartbeat_secs = 3\n").unwrap();
        let args = Args {
            data_dir: Some(dir.path().into()),
            listen: None,
            heartbeat_secs: None,
            config: Some(path.clone()),
        };
        let c = resolve(args).unwrap();
        assert_eq!(c.listen.port(), 9);
        assert_eq!(c.heartbeat_secs, 3);
        assert_eq!(c.data_dir, dir.path());

        std::fs::write(&path, "listn = \"127.0.0.1:9\"\n").unwrap();
        let err = load_file(&path).unwrap_err().to_string();
        assert!(err.contains("listn"), "{err}");
    }
}
