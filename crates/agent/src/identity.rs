//! The node's identity (`identity.json` in the state directory): written once at registration,
//! atomically and readable by the agent's user only, because the secret authenticates the node.

use crate::AgentError;
use fleetrun_proto::NodeId;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// File name of the identity in the state directory.
pub const IDENTITY_FILE: &str = "identity.json";

/// What the server gave the node at registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The node's id.
    pub node_id: NodeId,
    /// The node's secret, presented in every `Hello`.
    pub secret: String,
}

fn identity_path(state_dir: &Path) -> PathBuf {
    state_dir.join(IDENTITY_FILE)
}

/// Creates the state directory (mode 0700) if it does not exist yet.
pub fn ensure_state_dir(state_dir: &Path) -> Result<(), AgentError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(|e| {
            AgentError::Io(
                format!("cannot create state directory {}", state_dir.display()),
                e,
            )
        })
}

/// Reads the identity; `None` if the node has not registered yet.
pub fn load(state_dir: &Path) -> Result<Option<Identity>, AgentError> {
    let path = identity_path(state_dir);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AgentError::Io(format!("cannot read {}", path.display()), e)),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| {
        AgentError::Config(format!(
            "{} is not a valid identity file: {e}",
            path.display()
        ))
    })
}

/// Writes the identity: a temporary file (mode 0600) synced, then renamed over the old one, so a
/// crash never leaves a half-written identity.
pub fn save(state_dir: &Path, identity: &Identity) -> Result<(), AgentError> {
    let path = identity_path(state_dir);
    let tmp = state_dir.join(format!(".{IDENTITY_FILE}.tmp"));
    let err = |what: &str, e| AgentError::Io(format!("cannot {what} {}", path.display()), e);
    let json = serde_json::to_vec_pretty(identity)
        .map_err(|e| AgentError::Config(format!("cannot encode identity: {e}")))?;
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| err("write", e))?;
    f.write_all(&json).map_err(|e| err("write", e))?;
    f.sync_all().map_err(|e| err("sync", e))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(|e| err("rename into", e))?;
    // Make the rename itself durable.
    if let Ok(dir) = fs::File::open(state_dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn identity_round_trips_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let id = Identity {
            node_id: NodeId::from_random(42),
            secret: "s3cret".into(),
        };
        save(dir.path(), &id).unwrap();
        save(dir.path(), &id).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(id));
        let mode = fs::metadata(identity_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(identity_path(dir.path()), "{").unwrap();
        assert!(load(dir.path()).is_err());
    }
}
