//! The agent's settings: one documented struct with defaults, validated before anything connects.

use crate::AgentError;
use fleetrun_proto::channel::NODE_INFO_TEXT_MAX;
use fleetrun_proto::targets::{check_tag_key, check_tag_value, parse_tag};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Default seconds between WebSocket pings.
pub const HEARTBEAT_SECS_DEFAULT: u64 = 15;
/// Default number of commands run at once (SSM runs up to 5 documents at once; fleetrun allows more).
pub const MAX_CONCURRENT_COMMANDS_DEFAULT: usize = 8;
/// Default time between SIGTERM and SIGKILL when a command is stopped.
pub const KILL_GRACE_DEFAULT: Duration = Duration::from_secs(5);
/// Default bound on spooled output, over all commands (256 MiB).
pub const SPOOL_MAX_BYTES_DEFAULT: u64 = 256 * 1024 * 1024;
/// Default age after which the node's key is rotated.
pub const KEY_ROTATION_DEFAULT: Duration = Duration::from_secs(30 * 24 * 3600);
/// Smallest spool accepted (one pipe read).
pub const SPOOL_MAX_BYTES_MIN: u64 = 64 * 1024;
/// Most server URLs an agent takes (replicas of one server).
pub const SERVER_URLS_MAX: usize = 16;
/// The WebSocket path of the agent channel, under the server's base URL.
pub const CONNECT_PATH: &str = "/v1/agent/connect";

/// Everything the agent needs to run. Passed explicitly to [`crate::run`]; never global.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The server's base URL, e.g. `https://fleet.example:8080` (`wss://` is accepted too; `http://`
    /// and `ws://` only with `insecure_http`); or several, comma-separated, for server replicas:
    /// the agent dials the next one when the one it uses cannot be reached.
    pub server_url: String,
    /// Where the agent keeps its identity and per-command directories.
    pub state_dir: PathBuf,
    /// Activation code for the first start (ignored once an identity exists).
    pub activation_code: Option<String>,
    /// Display name of the node (default: the hostname).
    pub name: Option<String>,
    /// Tags the node asks for at registration.
    pub tags: BTreeMap<String, String>,
    /// Seconds between pings; a connection silent for 3 of them is dropped.
    pub heartbeat_secs: u64,
    /// Commands run at once; further ones wait in a queue.
    pub max_concurrent_commands: usize,
    /// Time between SIGTERM and SIGKILL when a command times out or is cancelled, or a session
    /// stream is hung up.
    pub kill_grace: Duration,
    /// Session streams (e.g. `Exec`) open at once; past it a `StreamOpen` is refused.
    pub max_streams: usize,
    /// How long acknowledged run directories wait before they are removed together.
    pub sweep_after: Duration,
    /// Most bytes of unacknowledged output kept on disk, over all commands; when full, commands
    /// block writing output until the server catches up (reported in their results).
    pub spool_max_bytes: u64,
    /// Age after which the node's key is replaced by a new one, over the live connection.
    pub key_rotation: Duration,
    /// A PEM file with the CA that signs the server's certificate (`--ca-cert`).
    pub ca_cert: Option<PathBuf>,
    /// Fingerprint of the server's CA to pin on first contact (`--ca-fingerprint`); canonical
    /// lowercase hex once validated.
    pub ca_fingerprint: Option<String>,
    /// Allows a plain `http://` server URL (`--insecure-http`).
    pub insecure_http: bool,
    /// The EC2 instance id to register under (`--instance-id`) instead of a server-made `mi-`
    /// id; used at registration only.
    pub instance_id: Option<String>,
    /// Where to ask IMDS for the instance id when registering without `instance_id`
    /// (`--imds-endpoint`); `None` does not ask (`--no-imds`, and the default of an embedded
    /// agent, which [`AgentConfig::new`] makes).
    pub imds_endpoint: Option<String>,
}

/// Default of [`AgentConfig::sweep_after`]: run directories are removed in batches, off the command
/// path (see `scheduler.rs`).
pub const SWEEP_AFTER_DEFAULT: Duration = Duration::from_secs(30);

impl AgentConfig {
    /// A configuration with the defaults for everything but the server and the state directory.
    pub fn new(server_url: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        AgentConfig {
            server_url: server_url.into(),
            state_dir: state_dir.into(),
            activation_code: None,
            name: None,
            tags: BTreeMap::new(),
            heartbeat_secs: HEARTBEAT_SECS_DEFAULT,
            max_concurrent_commands: MAX_CONCURRENT_COMMANDS_DEFAULT,
            kill_grace: KILL_GRACE_DEFAULT,
            max_streams: crate::streams::MAX_STREAMS_DEFAULT,
            sweep_after: SWEEP_AFTER_DEFAULT,
            spool_max_bytes: SPOOL_MAX_BYTES_DEFAULT,
            key_rotation: KEY_ROTATION_DEFAULT,
            ca_cert: None,
            ca_fingerprint: None,
            insecure_http: false,
            instance_id: None,
            imds_endpoint: None,
        }
    }

    /// Checks every setting; the error says which one is wrong and why.
    pub fn validate(&self) -> Result<(), AgentError> {
        self.connect_urls()?;
        if self.ca_cert.is_some() && self.ca_fingerprint.is_some() {
            return Err(AgentError::Config(
                "give --ca-cert or --ca-fingerprint, not both".into(),
            ));
        }
        if let Some(f) = &self.ca_fingerprint {
            fleetrun_proto::tls::parse_fingerprint(f)
                .map_err(|e| AgentError::Config(format!("--ca-fingerprint: {e}")))?;
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err(AgentError::Config("--state-dir must not be empty".into()));
        }
        if self.heartbeat_secs == 0 || self.heartbeat_secs > 3_600 {
            return Err(AgentError::Config(format!(
                "--heartbeat-secs must be 1 to 3600, not {}",
                self.heartbeat_secs
            )));
        }
        if self.max_concurrent_commands == 0 || self.max_concurrent_commands > 1_024 {
            return Err(AgentError::Config(format!(
                "--max-concurrent-commands must be 1 to 1024, not {}",
                self.max_concurrent_commands
            )));
        }
        let streams_max = fleetrun_proto::stream::STREAMS_PER_CONNECTION_MAX;
        if self.max_streams == 0 || self.max_streams > streams_max {
            return Err(AgentError::Config(format!(
                "--max-streams must be 1 to {streams_max}, not {}",
                self.max_streams
            )));
        }
        if self.spool_max_bytes < SPOOL_MAX_BYTES_MIN {
            return Err(AgentError::Config(format!(
                "--spool-max-bytes must be at least {SPOOL_MAX_BYTES_MIN}, not {}",
                self.spool_max_bytes
            )));
        }
        if self.key_rotation < Duration::from_secs(1) {
            return Err(AgentError::Config(format!(
                "--key-rotation must be at least 1s, not {}",
                humantime::format_duration(self.key_rotation)
            )));
        }
        if let Some(code) = &self.activation_code
            && code.trim().is_empty()
        {
            return Err(AgentError::Config(
                "--activation-code must not be empty".into(),
            ));
        }
        if let Some(name) = &self.name {
            if name.trim().is_empty() || name.len() > NODE_INFO_TEXT_MAX {
                return Err(AgentError::Config(format!(
                    "--name must be 1 to {NODE_INFO_TEXT_MAX} characters"
                )));
            }
            fleetrun_proto::channel::check_node_text("name", name)
                .map_err(|e| AgentError::Config(format!("invalid --name: {e}")))?;
        }
        if let Some(id) = &self.instance_id {
            fleetrun_proto::NodeId::ec2(id)
                .map_err(|e| AgentError::Config(format!("--instance-id: {e}")))?;
        }
        if let Some(endpoint) = &self.imds_endpoint {
            crate::imds::authority(endpoint)
                .map_err(|e| AgentError::Config(format!("--imds-endpoint: {e}")))?;
        }
        for (k, v) in &self.tags {
            check_tag_key(k)
                .and_then(|()| check_tag_value(v))
                .map_err(|e| AgentError::Config(format!("invalid tag: {e}")))?;
        }
        Ok(())
    }

    /// The WebSocket URLs of the agent channel on the configured server(s), in the order given.
    pub fn connect_urls(&self) -> Result<Vec<String>, AgentError> {
        let given: Vec<&str> = self
            .server_url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        if given.is_empty() {
            return Err(AgentError::Config("no server URL given".into()));
        }
        if given.len() > SERVER_URLS_MAX {
            return Err(AgentError::Config(format!(
                "{} server URLs given; at most {SERVER_URLS_MAX}",
                given.len()
            )));
        }
        let mut urls = Vec::with_capacity(given.len());
        for server in given {
            let url = connect_url(server)?;
            if url.starts_with("ws://") && !self.insecure_http {
                return Err(AgentError::Config(format!(
                    "server URL {server:?} is plain HTTP: the node's secret and every command would cross the network in clear text; use https://, or pass --insecure-http to accept that"
                )));
            }
            urls.push(url);
        }
        // One trust for all of them: TLS everywhere or nowhere.
        if urls.iter().any(|u| u.starts_with("ws://"))
            && urls.iter().any(|u| u.starts_with("wss://"))
        {
            return Err(AgentError::Config(
                "server URLs mix https:// and http://: give them all the same scheme".into(),
            ));
        }
        Ok(urls)
    }
}

/// Parses `--tag KEY=VALUE` arguments into a map; a repeated key is an error.
pub fn parse_tags<S: AsRef<str>>(args: &[S]) -> Result<BTreeMap<String, String>, AgentError> {
    let mut tags = BTreeMap::new();
    for arg in args {
        let arg = arg.as_ref();
        let (k, v) =
            parse_tag(arg).map_err(|e| AgentError::Config(format!("invalid --tag: {e}")))?;
        if tags.insert(k.clone(), v).is_some() {
            return Err(AgentError::Config(format!(
                "invalid --tag: key {k:?} given twice"
            )));
        }
    }
    Ok(tags)
}

/// Maps the server's base URL to the channel's WebSocket URL: `https://H:P[/prefix]` becomes
/// `wss://H:P[/prefix]/v1/agent/connect`, `http://` becomes `ws://`.
fn connect_url(server_url: &str) -> Result<String, AgentError> {
    let url = server_url.trim();
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("https://") {
        ("wss", rest)
    } else if let Some(rest) = url.strip_prefix("wss://") {
        ("wss", rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        ("ws", rest)
    } else if let Some(rest) = url.strip_prefix("ws://") {
        ("ws", rest)
    } else {
        return Err(AgentError::Config(format!(
            "server URL {url:?} must start with https:// (e.g. https://127.0.0.1:8080)"
        )));
    };
    let rest = rest.trim_end_matches('/');
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || rest.contains(['?', '#']) || rest.chars().any(char::is_whitespace) {
        return Err(AgentError::Config(format!(
            "server URL {url:?} must be https://HOST[:PORT][/PATH]"
        )));
    }
    Ok(format!("{scheme}://{rest}{CONNECT_PATH}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_map_to_the_channel_url() {
        assert_eq!(
            connect_url("http://127.0.0.1:8080").unwrap(),
            "ws://127.0.0.1:8080/v1/agent/connect"
        );
        assert_eq!(
            connect_url("http://h:1/base/").unwrap(),
            "ws://h:1/base/v1/agent/connect"
        );
        assert_eq!(
            connect_url("ws://h:1").unwrap(),
            "ws://h:1/v1/agent/connect"
        );
        assert_eq!(
            connect_url("https://h:1/").unwrap(),
            "wss://h:1/v1/agent/connect"
        );
        assert!(connect_url("ftp://h").is_err());
        assert!(connect_url("http://").is_err());
    }

    /// Replicas: several URLs, comma-separated, in order; all of one scheme, at most 16.
    #[test]
    fn several_server_urls_are_taken_in_order() {
        let mut c = AgentConfig::new("https://a:1, https://b:2/x,", "/tmp/x");
        assert_eq!(
            c.connect_urls().unwrap(),
            ["wss://a:1/v1/agent/connect", "wss://b:2/x/v1/agent/connect"]
        );
        c.insecure_http = true;
        c.server_url = "https://a:1,http://b:2".into();
        let mixed = c.connect_urls().unwrap_err().to_string();
        assert!(mixed.contains("same scheme"), "{mixed}");
        c.server_url = " , ".into();
        assert!(c.connect_urls().is_err());
        c.server_url = vec!["https://a:1"; SERVER_URLS_MAX + 1].join(",");
        let many = c.connect_urls().unwrap_err().to_string();
        assert!(many.contains("at most 16"), "{many}");
        c.server_url = "https://a:1,ftp://b".into();
        assert!(c.connect_urls().is_err());
    }

    #[test]
    fn settings_are_checked() {
        let mut c = AgentConfig::new("http://127.0.0.1:1", "/tmp/x");
        let plain = c.validate().unwrap_err().to_string();
        assert!(plain.contains("--insecure-http"), "{plain}");
        c.insecure_http = true;
        assert!(c.validate().is_ok());
        c.server_url = "https://127.0.0.1:1".into();
        c.ca_fingerprint = Some("nope".into());
        assert!(c.validate().is_err());
        c.ca_fingerprint = None;
        c.max_concurrent_commands = 0;
        assert!(c.validate().is_err());
        c.max_concurrent_commands = 5;
        c.max_streams = 0;
        assert!(c.validate().is_err());
        c.max_streams = fleetrun_proto::stream::STREAMS_PER_CONNECTION_MAX + 1;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--max-streams must be 1 to 256"), "{e}");
        c.max_streams = 1;
        c.heartbeat_secs = 0;
        assert!(c.validate().is_err());
        c.heartbeat_secs = 1;
        c.tags.insert("bad key".into(), "v".into());
        assert!(c.validate().is_err());
        c.tags.clear();
        c.instance_id = Some("i-0123456789abcdef0".into());
        assert!(c.validate().is_ok());
        for bad in ["mi-0123456789abcdef0", "i-XYZ", ""] {
            c.instance_id = Some(bad.into());
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("--instance-id") && e.contains("`i-`"), "{e}");
        }
        c.instance_id = None;
        c.imds_endpoint = Some("https://169.254.169.254".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--imds-endpoint"), "{e}");
    }

    #[test]
    fn a_name_with_control_characters_is_refused() {
        let mut c = AgentConfig::new("https://127.0.0.1:1", "/tmp/x");
        c.name = Some("web-1".into());
        assert!(c.validate().is_ok());
        for bad in ["web\u{0}1", "web\u{1b}[2J", "two\nlines"] {
            c.name = Some(bad.into());
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains("invalid --name") && e.contains("control character"),
                "{e}"
            );
        }
    }

    #[test]
    fn tags_parse_and_reject_duplicates() {
        let t = parse_tags(&["env=prod", "role=web"]).unwrap();
        assert_eq!(t.get("env").map(String::as_str), Some("prod"));
        assert!(parse_tags(&["env"]).is_err());
        assert!(parse_tags(&["a=1", "a=2"]).is_err());
    }
}
