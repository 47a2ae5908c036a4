//! Node identity on the agent channel (protocol version 2): the challenge each connection starts
//! with, the checks of a `Hello`'s or `Register`'s signature against the node's stored public keys,
//! and key rotation over an authenticated session (fleetrun_proto::auth has the signed messages).
//!
//! The server stores public keys only. A rotation makes the session's key the node's previous key,
//! still accepted until the agent proves the new one (a `KeyConfirmed`, or a `Hello` signed with it),
//! so an agent that crashed between persisting its new key and hearing `KeyRotated` can always
//! come back with the old key and send the same rotation again.

use fleetrun_proto::NodeId;
use fleetrun_proto::auth::{self, AuthError, NONCE_LEN};
use fleetrun_proto::channel::{ErrorCode, ServerFrame};
use fleetrun_store::{NodeKeys, Store};

/// A fresh challenge for a new connection.
pub fn challenge() -> [u8; NONCE_LEN] {
    rand::random()
}

/// A refused handshake: what the agent is told and what the audit trail records.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    /// `ServerFrame::Error` code.
    pub code: ErrorCode,
    /// What is wrong, for the agent's operator.
    pub message: String,
    /// The audit record's result.
    pub audit: String,
    /// Whether it counts as a failed authentication for the brute-force guard.
    pub counts: bool,
}

impl Refusal {
    fn new(code: ErrorCode, message: String, audit: &str, counts: bool) -> Self {
        Refusal {
            code,
            message,
            audit: audit.into(),
            counts,
        }
    }
}

/// Checks a `Register`'s proof of its key; the key, hex, for storage.
pub fn check_register(
    nonce: &[u8],
    public_key: &[u8],
    signature: &[u8],
    instance_id: Option<&str>,
) -> Result<String, Refusal> {
    let bad = |e: AuthError| {
        Refusal::new(
            ErrorCode::BadSignature,
            format!(
                "registration refused: {e} (the signature must cover this connection's challenge)"
            ),
            "BadSignature",
            true,
        )
    };
    auth::check_public_key(public_key).map_err(bad)?;
    let message = match instance_id {
        Some(id) => auth::register_instance_message(nonce, public_key, id),
        None => auth::register_message(nonce, public_key),
    };
    auth::verify(public_key, &message, signature).map_err(bad)?;
    Ok(hex::encode(public_key))
}

/// Checks a `Hello`: the node exists, is not deregistered, and signed this connection's challenge
/// with one of its keys. Returns the key, hex, that the session is authenticated with.
pub async fn check_hello(
    store: &Store,
    node_id: &NodeId,
    nonce: &[u8],
    public_key: &[u8],
    signature: &[u8],
) -> Result<String, Refusal> {
    let keys = match store.node_keys(node_id).await {
        Ok(Some(k)) => k,
        Ok(None) => {
            return Err(Refusal::new(
                ErrorCode::UnknownNode,
                format!("node {node_id} is not registered here"),
                "UnknownNode",
                true,
            ));
        }
        Err(e) => {
            tracing::error!("cannot look up node: {e}");
            return Err(Refusal::new(
                ErrorCode::InternalError,
                "the server cannot read its database".into(),
                "InternalError",
                false,
            ));
        }
    };
    let key = verify_hello(&keys, node_id, nonce, public_key, signature)?;
    if keys.deregistered {
        return Err(Refusal::new(
            ErrorCode::UnknownNode,
            format!("node {node_id} was deregistered"),
            "UnknownNode: deregistered",
            false,
        ));
    }
    // Proving the current key ends a rotation: the previous key is no longer accepted. (Only then
    // does a Hello write, so a reconnect storm costs reads only.)
    if keys.previous.is_some()
        && keys.current.as_deref() == Some(key.as_str())
        && let Err(e) = store.node_key_proven(node_id, &key).await
    {
        tracing::error!(%node_id, "cannot record the end of a key rotation: {e}");
    }
    Ok(key)
}

/// The signature check of [`check_hello`], against the keys stored for the node.
fn verify_hello(
    keys: &NodeKeys,
    node_id: &NodeId,
    nonce: &[u8],
    public_key: &[u8],
    signature: &[u8],
) -> Result<String, Refusal> {
    let Some(current) = &keys.current else {
        return Err(Refusal::new(
            ErrorCode::UnknownNode,
            format!(
                "node {node_id} registered with a secret (protocol version 1) and has no key: \
                 deregister it and register the agent again with an activation code"
            ),
            "UnknownNode: no key",
            false,
        ));
    };
    let key = hex::encode(public_key);
    if key != *current && keys.previous.as_deref() != Some(key.as_str()) {
        return Err(Refusal::new(
            ErrorCode::BadSignature,
            format!("the key presented is not node {node_id}'s key"),
            "BadSignature: not the node's key",
            true,
        ));
    }
    auth::verify(
        public_key,
        &auth::hello_message(node_id, nonce, public_key),
        signature,
    )
    .map_err(|e| {
        Refusal::new(
            ErrorCode::BadSignature,
            format!("node {node_id}: {e} over this connection's challenge"),
            "BadSignature",
            true,
        )
    })?;
    Ok(key)
}

/// A rotation request of the node's session authenticated with `session_key` (hex): stores the new
/// key durably, then returns `KeyRotated`. The session's key becomes the new one.
pub async fn rotate(
    store: &Store,
    node_id: &NodeId,
    session_key: &mut String,
    old_public_key: &[u8],
    new_public_key: &[u8],
    signature: &[u8],
) -> Result<ServerFrame, String> {
    if hex::encode(old_public_key) != *session_key {
        return Err(
            "RotateKey: old_public_key is not the key this session authenticated with".into(),
        );
    }
    auth::check_public_key(new_public_key).map_err(|e| format!("RotateKey: {e}"))?;
    let message = auth::rotate_message(node_id, old_public_key, new_public_key);
    auth::verify(new_public_key, &message, signature).map_err(|e| format!("RotateKey: {e}"))?;
    let new = hex::encode(new_public_key);
    let now = fleetrun_proto::time::now_ms();
    match store.rotate_node_key(node_id, session_key, &new, now).await {
        Ok(true) => {}
        Ok(false) => return Err("RotateKey: this session's key is no longer the node's".into()),
        Err(e) => {
            tracing::error!(%node_id, "cannot store a rotated key: {e}");
            return Err("RotateKey: the server cannot write its database".into());
        }
    }
    tracing::info!(%node_id, key = %auth::fingerprint(new_public_key), "node key rotated");
    *session_key = new;
    Ok(ServerFrame::KeyRotated {
        public_key: new_public_key.to_vec(),
    })
}

/// The agent uses its new key now: the previous one is no longer accepted.
pub async fn confirmed(
    store: &Store,
    node_id: &NodeId,
    session_key: &str,
    public_key: &[u8],
) -> Result<(), String> {
    if hex::encode(public_key) != session_key {
        return Err("KeyConfirmed: not the key of this session's last rotation".into());
    }
    store
        .node_key_proven(node_id, session_key)
        .await
        .map_err(|e| {
            tracing::error!(%node_id, "cannot record the end of a key rotation: {e}");
            "KeyConfirmed: the server cannot write its database".to_owned()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetrun_proto::auth::NodeKey;

    #[test]
    fn hellos_verify_against_current_and_previous_keys_only() {
        let node = NodeId::from_random(5);
        let (old, new, other) = (
            NodeKey::from_seed([1; 32]),
            NodeKey::from_seed([2; 32]),
            NodeKey::from_seed([3; 32]),
        );
        let nonce = challenge();
        let sign = |k: &NodeKey, n: &[u8]| k.sign(&auth::hello_message(&node, n, &k.public_key()));
        let mut keys = NodeKeys {
            current: Some(hex::encode(new.public_key())),
            previous: Some(hex::encode(old.public_key())),
            deregistered: false,
        };
        for k in [&old, &new] {
            let got = verify_hello(&keys, &node, &nonce, &k.public_key(), &sign(k, &nonce));
            assert_eq!(got, Ok(hex::encode(k.public_key())));
        }
        // Another node's key, or a signature over another challenge (a replay): refused.
        let e = verify_hello(
            &keys,
            &node,
            &nonce,
            &other.public_key(),
            &sign(&other, &nonce),
        );
        assert_eq!(e.unwrap_err().audit, "BadSignature: not the node's key");
        let e = verify_hello(
            &keys,
            &node,
            &nonce,
            &new.public_key(),
            &sign(&new, &[9; 32]),
        );
        let e = e.unwrap_err();
        assert_eq!((e.code, e.counts), (ErrorCode::BadSignature, true));
        // Once the rotation is proven, the old key is refused.
        keys.previous = None;
        let e = verify_hello(&keys, &node, &nonce, &old.public_key(), &sign(&old, &nonce));
        assert_eq!(e.unwrap_err().code, ErrorCode::BadSignature);
        // A protocol-1 node has no key.
        keys.current = None;
        let e = verify_hello(&keys, &node, &nonce, &new.public_key(), &sign(&new, &nonce));
        assert!(e.unwrap_err().message.contains("register the agent again"));
    }

    #[test]
    fn registration_proves_the_key() {
        let k = NodeKey::from_seed([4; 32]);
        let nonce = challenge();
        let pk = k.public_key();
        let sig = k.sign(&auth::register_message(&nonce, &pk));
        assert_eq!(check_register(&nonce, &pk, &sig, None), Ok(hex::encode(pk)));
        assert_eq!(
            check_register(&[0; 32], &pk, &sig, None).unwrap_err().code,
            ErrorCode::BadSignature
        );
        assert!(check_register(&nonce, &[0; 32], &sig, None).is_err());
        // An instance's registration binds its id: the plain message, or another id, fails.
        let id = "i-0123456789abcdef0";
        let sig = k.sign(&auth::register_instance_message(&nonce, &pk, id));
        assert!(check_register(&nonce, &pk, &sig, Some(id)).is_ok());
        assert!(check_register(&nonce, &pk, &sig, Some("i-0123456789abcdef1")).is_err());
        assert!(check_register(&nonce, &pk, &sig, None).is_err());
    }
}
