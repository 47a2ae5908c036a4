//! The CLI's own settings: where the server is, the token to use and the CA to trust, from flags, env
//! or a config file.
//!
//! Precedence is flag > env > file; clap already merges flag and env, so this module adds the file. The
//! file is `$XDG_CONFIG_HOME/fleetrun/config.toml` unless `FLEETRUN_CONFIG` names another path.

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Env var naming the CLI config file, overriding the XDG default.
pub const CONFIG_ENV: &str = "FLEETRUN_CONFIG";

/// Contents of the CLI config file.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliConfigFile {
    /// Base URL of the server, e.g. `https://127.0.0.1:8080`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// PEM file with the CA the server's certificate is signed by (the server's `DATA_DIR/ca.pem`);
    /// relative to the config file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
}

/// Where to reach the server and how to authenticate.
#[derive(Clone, Debug)]
pub struct Connection {
    /// Base URL without a trailing slash.
    pub server: String,
    /// Bearer token.
    pub token: String,
    /// A CA to trust for `https://` (else the system's roots).
    pub ca_cert: Option<PathBuf>,
}

/// The project's standard directories (`~/.config/fleetrun`, `~/.local/share/fleetrun` on Linux).
pub fn project_dirs() -> Option<directories::ProjectDirs> {
    directories::ProjectDirs::from("", "", "fleetrun")
}

/// Path of the CLI config file: `FLEETRUN_CONFIG`, else the XDG config dir.
pub fn config_path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let dirs = project_dirs()
        .context("cannot find a home directory for the config file: set FLEETRUN_CONFIG")?;
    Ok(dirs.config_dir().join("config.toml"))
}

/// Reads the config file; a missing file is an empty config.
pub fn load(path: &Path) -> anyhow::Result<CliConfigFile> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            toml::from_str(&text).with_context(|| format!("bad config file {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CliConfigFile::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read config file {}", path.display())),
    }
}

/// Writes the config file readable by its owner only, since it holds a token. Writes a temporary file
/// and renames it so a reader never sees half a file.
pub fn save(path: &Path, config: &CliConfigFile) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create config directory {}", dir.display()))?;
    }
    let text = toml::to_string(config).context("cannot encode the config file")?;
    let tmp = path.with_extension("toml.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write config file {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write config file {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot write config file {}", path.display()))?;
    Ok(())
}

/// Resolves the connection from flag-or-env values and the config file.
pub fn resolve(
    server: Option<String>,
    token: Option<String>,
    ca_cert: Option<PathBuf>,
) -> anyhow::Result<Connection> {
    let path = config_path()?;
    let need_file = server.is_none() || token.is_none() || ca_cert.is_none();
    let file = if need_file {
        load(&path)?
    } else {
        CliConfigFile::default()
    };
    let nonempty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
    let Some(server) = nonempty(server).or(nonempty(file.server)) else {
        bail!(
            "no server given: pass --server URL, set FLEETRUN_SERVER, put `server = \"http://...\"` in {}, or run `fleetrun dev`",
            path.display()
        );
    };
    let Some(token) = nonempty(token).or(nonempty(file.token)) else {
        bail!(
            "no token given: pass --token TOKEN, set FLEETRUN_TOKEN, put `token = \"...\"` in {}, or run `fleetrun dev` (the admin token is in the server's data dir, admin.token)",
            path.display()
        );
    };
    // A relative path in the file is relative to the file, not to wherever the CLI runs.
    let file_ca = file
        .ca_cert
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| match path.parent() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p,
        });
    Ok(Connection {
        server: normalize_server(&server)?,
        token: token.trim().to_owned(),
        ca_cert: ca_cert.filter(|p| !p.as_os_str().is_empty()).or(file_ca),
    })
}

/// Checks a server URL and strips trailing slashes, so paths can be appended.
pub fn normalize_server(s: &str) -> anyhow::Result<String> {
    let s = s.trim().trim_end_matches('/');
    if !(s.starts_with("http://") || s.starts_with("https://")) {
        bail!("server URL {s:?} must start with https:// (e.g. https://127.0.0.1:8080)");
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_round_trips_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.toml");
        let cfg = CliConfigFile {
            server: Some("http://127.0.0.1:1".into()),
            token: Some("t".into()),
            ca_cert: Some("ca.pem".into()),
        };
        save(&path, &cfg).unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back.server.as_deref(), Some("http://127.0.0.1:1"));
        assert_eq!(back.token.as_deref(), Some("t"));
        assert_eq!(back.ca_cert.as_deref(), Some(Path::new("ca.pem")));
        std::fs::write(&path, "servr = \"x\"\n").unwrap();
        let err = format!("{:#}", load(&path).unwrap_err());
        assert!(err.contains("servr"), "{err}");
        assert!(
            load(&dir.path().join("missing.toml"))
                .unwrap()
                .server
                .is_none()
        );
    }

    #[test]
    fn server_urls_are_checked_and_trimmed() {
        assert_eq!(normalize_server("http://a:1/").unwrap(), "http://a:1");
        assert!(normalize_server("a:1").is_err());
    }
}
