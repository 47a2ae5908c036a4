//! The node's identity (`identity.json` in the state directory): its id and Ed25519 private key,
//! written atomically and readable by the agent's user only, because the key authenticates the node.
//!
//! Key rotation is a small state machine kept in the same file, so a crash at any point leaves a key
//! the server accepts: [`Identity::begin_rotation`] makes a pending key (persisted before the
//! server hears of it), [`Identity::finish_rotation`] makes it current once the server stored it.
//! Until then the agent keeps signing with the old key, which the server accepts as the previous
//! one, and sends the same pending key again after a reconnect.

use crate::AgentError;
use fleetrun_proto::NodeId;
use fleetrun_proto::auth::{self, NodeKey, PRIVATE_KEY_LEN};
use fleetrun_proto::channel::AgentFrame;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// File name of the identity in the state directory.
pub const IDENTITY_FILE: &str = "identity.json";

/// The node's id and keys.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The node's id.
    pub node_id: NodeId,
    key: NodeKey,
    key_created_at_ms: i64,
    pending: Option<NodeKey>,
}

/// The identity file's form. `secret` is only read, to recognise a protocol-1 identity.
#[derive(Serialize, Deserialize)]
struct IdentityFile {
    node_id: NodeId,
    #[serde(default, skip_serializing)]
    secret: Option<String>,
    #[serde(default)]
    private_key: Option<String>,
    #[serde(default)]
    key_created_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending_private_key: Option<String>,
}

/// A new private key from the OS-seeded CSPRNG.
pub fn generate_key() -> NodeKey {
    NodeKey::from_seed(rand::random())
}

impl Identity {
    /// A node's identity after registration with `key`, created at `now_ms`.
    pub fn new(node_id: NodeId, key: NodeKey, now_ms: i64) -> Self {
        Identity {
            node_id,
            key,
            key_created_at_ms: now_ms,
            pending: None,
        }
    }

    /// The current key: `Hello` is signed with it.
    pub fn key(&self) -> &NodeKey {
        &self.key
    }

    /// A new key waiting for the server's `KeyRotated`, if any.
    pub fn pending(&self) -> Option<&NodeKey> {
        self.pending.as_ref()
    }

    /// The `Hello` credentials for a connection's challenge: public key and signature.
    pub fn sign_hello(&self, nonce: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let pk = self.key.public_key();
        let sig = self
            .key
            .sign(&auth::hello_message(&self.node_id, nonce, &pk));
        (pk.to_vec(), sig)
    }

    /// How long until a rotation is due with keys living `every`; zero when a pending key waits.
    pub fn rotation_due_in(&self, now_ms: i64, every: Duration) -> Duration {
        if self.pending.is_some() {
            return Duration::ZERO;
        }
        let age = u64::try_from(now_ms.saturating_sub(self.key_created_at_ms)).unwrap_or(0);
        every.saturating_sub(Duration::from_millis(age))
    }

    /// Starts (or resumes) a rotation: makes a pending key unless one exists, and returns the
    /// `RotateKey` to send. Persist the identity before sending it.
    pub fn begin_rotation(&mut self) -> AgentFrame {
        let new = self.pending.get_or_insert_with(generate_key).clone();
        let old_pk = self.key.public_key();
        let new_pk = new.public_key();
        AgentFrame::RotateKey {
            old_public_key: old_pk.to_vec(),
            new_public_key: new_pk.to_vec(),
            signature: new.sign(&auth::rotate_message(&self.node_id, &old_pk, &new_pk)),
        }
    }

    /// The server stored `public_key`: if it is the pending key it becomes current (created at
    /// `now_ms`) and the `KeyConfirmed` to send is returned. Persist the identity before sending.
    pub fn finish_rotation(&mut self, public_key: &[u8], now_ms: i64) -> Option<AgentFrame> {
        let pending = self.pending.take_if(|p| p.public_key() == public_key)?;
        self.key = pending;
        self.key_created_at_ms = now_ms;
        Some(AgentFrame::KeyConfirmed {
            public_key: public_key.to_vec(),
        })
    }

    fn to_file(&self) -> IdentityFile {
        IdentityFile {
            node_id: self.node_id.clone(),
            secret: None,
            private_key: Some(hex::encode(self.key.seed())),
            key_created_at_ms: self.key_created_at_ms,
            pending_private_key: self.pending.as_ref().map(|k| hex::encode(k.seed())),
        }
    }

    fn from_file(f: IdentityFile, path: &Path) -> Result<Self, AgentError> {
        let Some(private_key) = f.private_key else {
            let why = if f.secret.is_some() {
                "holds a node secret of protocol version 1; nodes now authenticate with a key pair"
            } else {
                "has no private_key"
            };
            return Err(AgentError::Config(format!(
                "{} {why}: deregister node {} (fleetrun nodes deregister {}), delete the file and \
                 start the agent again with --activation-code to register anew",
                path.display(),
                f.node_id,
                f.node_id
            )));
        };
        let key = |hex_key: &str, what: &str| {
            let seed: [u8; PRIVATE_KEY_LEN] = hex::decode(hex_key)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| {
                    AgentError::Config(format!(
                        "{}: {what} is not {PRIVATE_KEY_LEN} hex-encoded bytes",
                        path.display()
                    ))
                })?;
            Ok::<_, AgentError>(NodeKey::from_seed(seed))
        };
        Ok(Identity {
            key: key(&private_key, "private_key")?,
            pending: f
                .pending_private_key
                .as_deref()
                .map(|k| key(k, "pending_private_key"))
                .transpose()?,
            node_id: f.node_id,
            key_created_at_ms: f.key_created_at_ms,
        })
    }
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
    let file: IdentityFile = serde_json::from_str(&text).map_err(|e| {
        AgentError::Config(format!(
            "{} is not a valid identity file: {e}",
            path.display()
        ))
    })?;
    Identity::from_file(file, &path).map(Some)
}

/// Writes the identity: a temporary file (mode 0600) synced, then renamed over the old one, so a
/// crash never leaves a half-written identity.
pub fn save(state_dir: &Path, identity: &Identity) -> Result<(), AgentError> {
    let path = identity_path(state_dir);
    let tmp = state_dir.join(format!(".{IDENTITY_FILE}.tmp"));
    let err = |what: &str, e| AgentError::Io(format!("cannot {what} {}", path.display()), e);
    let json = serde_json::to_vec_pretty(&identity.to_file())
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

    fn pk(id: &Identity) -> [u8; 32] {
        id.key().public_key()
    }

    #[test]
    fn identity_round_trips_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        let mut id = Identity::new(NodeId::from_random(42), generate_key(), 1_000);
        save(dir.path(), &id).unwrap();
        save(dir.path(), &id).unwrap();
        let back = load(dir.path()).unwrap().unwrap();
        assert_eq!((&back.node_id, pk(&back)), (&id.node_id, pk(&id)));
        assert_eq!(back.key_created_at_ms, 1_000);
        id.begin_rotation();
        save(dir.path(), &id).unwrap();
        let back = load(dir.path()).unwrap().unwrap();
        assert_eq!(
            back.pending().map(NodeKey::public_key),
            id.pending().map(NodeKey::public_key)
        );
        // The private key is never in Debug output (logs).
        let seed = hex::encode(id.key().seed());
        assert!(!format!("{id:?}").contains(&seed));
        let mode = fs::metadata(identity_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(identity_path(dir.path()), "{").unwrap();
        assert!(load(dir.path()).is_err());
    }

    #[test]
    fn a_protocol_1_identity_asks_to_register_again() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = r#"{"node_id": "mi-0000000000000002a", "secret": "s3cret"}"#;
        fs::write(identity_path(dir.path()), v1).unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("protocol version 1"), "{e}");
        assert!(e.contains("--activation-code"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
    }

    /// The rotation state machine across crashes: whatever was persisted when the agent died, it
    /// comes back with a key the server accepts and finishes the same rotation.
    #[test]
    fn rotation_survives_a_crash_at_every_step() {
        let dir = tempfile::tempdir().unwrap();
        let every = Duration::from_secs(10);
        let mut id = Identity::new(NodeId::from_random(7), generate_key(), 0);
        let old = pk(&id);
        assert_eq!(id.rotation_due_in(4_000, every), Duration::from_secs(6));
        assert_eq!(id.rotation_due_in(10_000, every), Duration::ZERO);

        // Step 1: the pending key is persisted before RotateKey leaves.
        let AgentFrame::RotateKey {
            new_public_key,
            old_public_key,
            signature,
        } = id.begin_rotation()
        else {
            panic!("not a RotateKey");
        };
        save(dir.path(), &id).unwrap();
        assert_eq!(old_public_key, old);
        let msg = auth::rotate_message(&id.node_id, &old, &new_public_key);
        assert!(auth::verify(&new_public_key, &msg, &signature).is_ok());

        // Crash here (RotateKey sent or not, KeyRotated lost): the agent restarts signing with the
        // old key, and its rotation is due at once, with the same new key.
        let mut back = load(dir.path()).unwrap().unwrap();
        assert_eq!(pk(&back), old);
        assert_eq!(back.rotation_due_in(10_001, every), Duration::ZERO);
        let AgentFrame::RotateKey {
            new_public_key: again,
            ..
        } = back.begin_rotation()
        else {
            panic!("not a RotateKey");
        };
        assert_eq!(
            again, new_public_key,
            "a resumed rotation sends the same key"
        );

        // A KeyRotated for another key changes nothing.
        assert!(back.finish_rotation(&[9; 32], 11_000).is_none());
        assert_eq!(pk(&back), old);

        // Step 2: KeyRotated makes the pending key current, persisted before KeyConfirmed.
        let confirm = back.finish_rotation(&new_public_key, 11_000);
        assert_eq!(
            confirm,
            Some(AgentFrame::KeyConfirmed {
                public_key: new_public_key.clone()
            })
        );
        save(dir.path(), &back).unwrap();
        let after = load(dir.path()).unwrap().unwrap();
        assert_eq!(pk(&after).to_vec(), new_public_key);
        assert!(after.pending().is_none());
        assert_eq!(after.rotation_due_in(11_000, every), every);
        // Its Hello verifies with the new key.
        let (hello_pk, sig) = after.sign_hello(&[1; 32]);
        let msg = auth::hello_message(&after.node_id, &[1; 32], &hello_pk);
        assert!(auth::verify(&new_public_key, &msg, &sig).is_ok());
    }
}
