//! Node authentication on the agent channel (since protocol version 2): every node holds an Ed25519
//! key pair; the server keeps only public keys. Right after the WebSocket opens the server sends a
//! random [`NONCE_LEN`]-byte challenge, and the agent's first frame carries a signature over it, so a
//! captured handshake cannot be replayed and a node id alone proves nothing.
//!
//! Every signed message is domain-separated (its own context string) and length-prefixes each field,
//! so a signature made for one purpose never verifies for another.

use crate::ids::NodeId;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// Length of the server's challenge nonce.
pub const NONCE_LEN: usize = 32;
/// Length of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of an Ed25519 private key (its seed).
pub const PRIVATE_KEY_LEN: usize = 32;

const HELLO_CONTEXT: &[u8] = b"fleetrun-node-auth-v2\0hello";
const REGISTER_CONTEXT: &[u8] = b"fleetrun-node-auth-v2\0register";
const REGISTER_INSTANCE_CONTEXT: &[u8] = b"fleetrun-node-auth-v2\0register-instance";
const ROTATE_CONTEXT: &[u8] = b"fleetrun-node-auth-v2\0rotate";

/// Why a signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The public key is not 32 bytes or not a valid curve point.
    #[error("the public key is not a valid Ed25519 key")]
    BadKey,
    /// The signature is not 64 bytes or does not verify.
    #[error("the signature does not verify")]
    BadSignature,
}

/// The message a `Hello` signs: the node proves its key over this connection's challenge.
pub fn hello_message(node_id: &NodeId, nonce: &[u8], public_key: &[u8]) -> Vec<u8> {
    message(
        HELLO_CONTEXT,
        &[node_id.as_str().as_bytes(), nonce, public_key],
    )
}

/// The message a `Register` signs: a new node proves it holds the key it enrols.
pub fn register_message(nonce: &[u8], public_key: &[u8]) -> Vec<u8> {
    message(REGISTER_CONTEXT, &[nonce, public_key])
}

/// The message a `RegisterInstance` signs (since version 7): as [`register_message`], and the
/// instance id the node asks for, so a captured frame cannot be replayed under another id.
pub fn register_instance_message(nonce: &[u8], public_key: &[u8], instance_id: &str) -> Vec<u8> {
    message(
        REGISTER_INSTANCE_CONTEXT,
        &[nonce, public_key, instance_id.as_bytes()],
    )
}

/// The message a `RotateKey` signs with the new key: binds the node and its old and new keys.
pub fn rotate_message(node_id: &NodeId, old_public_key: &[u8], new_public_key: &[u8]) -> Vec<u8> {
    message(
        ROTATE_CONTEXT,
        &[node_id.as_str().as_bytes(), old_public_key, new_public_key],
    )
}

fn message(context: &[u8], fields: &[&[u8]]) -> Vec<u8> {
    let mut m =
        Vec::with_capacity(context.len() + fields.iter().map(|f| 4 + f.len()).sum::<usize>());
    m.extend_from_slice(context);
    for f in fields {
        // Fields are at most a few dozen bytes; a length that does not fit u32 cannot occur.
        m.extend_from_slice(&u32::try_from(f.len()).unwrap_or(u32::MAX).to_be_bytes());
        m.extend_from_slice(f);
    }
    m
}

/// A node's private key. Its `Debug` shows only the public key's fingerprint: never log the secret.
#[derive(Clone)]
pub struct NodeKey(SigningKey);

impl NodeKey {
    /// A key from 32 random bytes (the caller's CSPRNG, e.g. `rand::random()`).
    pub fn from_seed(seed: [u8; PRIVATE_KEY_LEN]) -> Self {
        NodeKey(SigningKey::from_bytes(&seed))
    }
    /// The private key's bytes, for the identity file only.
    pub fn seed(&self) -> [u8; PRIVATE_KEY_LEN] {
        self.0.to_bytes()
    }
    /// The public key.
    pub fn public_key(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.0.verifying_key().to_bytes()
    }
    /// Signs a message built by one of the `*_message` functions.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.0.sign(message).to_bytes().to_vec()
    }
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey({})", fingerprint(&self.public_key()))
    }
}

/// Checks `signature` over `message` with `public_key`.
pub fn verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> Result<(), AuthError> {
    let key: [u8; PUBLIC_KEY_LEN] = public_key.try_into().map_err(|_| AuthError::BadKey)?;
    let key = VerifyingKey::from_bytes(&key).map_err(|_| AuthError::BadKey)?;
    let sig = Signature::from_slice(signature).map_err(|_| AuthError::BadSignature)?;
    // Strict: no malleable signatures, no small-order keys.
    key.verify_strict(message, &sig)
        .map_err(|_| AuthError::BadSignature)
}

/// Checks that `public_key` is a usable Ed25519 key.
pub fn check_public_key(public_key: &[u8]) -> Result<(), AuthError> {
    let key: [u8; PUBLIC_KEY_LEN] = public_key.try_into().map_err(|_| AuthError::BadKey)?;
    let key = VerifyingKey::from_bytes(&key).map_err(|_| AuthError::BadKey)?;
    if key.is_weak() {
        return Err(AuthError::BadKey);
    }
    Ok(())
}

/// A short, stable name of a public key for listings and logs: `SHA256:` and the first 16 bytes of
/// its SHA-256 in hex.
pub fn fingerprint(public_key: &[u8]) -> String {
    let digest = Sha256::digest(public_key);
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("SHA256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> NodeKey {
        NodeKey::from_seed([n; 32])
    }

    #[test]
    fn a_hello_verifies_only_for_its_node_nonce_and_key() {
        let (a, b) = (key(1), key(2));
        let node = NodeId::from_random(1);
        let other = NodeId::from_random(2);
        let nonce = [7u8; NONCE_LEN];
        let pk = a.public_key();
        let sig = a.sign(&hello_message(&node, &nonce, &pk));
        assert_eq!(
            verify(&pk, &hello_message(&node, &nonce, &pk), &sig),
            Ok(())
        );
        // Another nonce (a replay), another node, another key: refused.
        let err = Err(AuthError::BadSignature);
        assert_eq!(verify(&pk, &hello_message(&node, &[8; 32], &pk), &sig), err);
        assert_eq!(verify(&pk, &hello_message(&other, &nonce, &pk), &sig), err);
        let pk_b = b.public_key();
        assert_eq!(verify(&pk_b, &hello_message(&node, &nonce, &pk), &sig), err);
        // A hello signature is no registration or rotation signature.
        assert_eq!(verify(&pk, &register_message(&nonce, &pk), &sig), err);
        assert_eq!(verify(&pk, &rotate_message(&node, &nonce, &pk), &sig), err);
        // Malformed inputs are errors, not panics.
        assert_eq!(verify(&pk[..5], b"m", &sig), Err(AuthError::BadKey));
        assert_eq!(verify(&pk, b"m", &sig[..10]), err);
    }

    #[test]
    fn keys_round_trip_and_never_show_their_secret() {
        let k = key(3);
        let again = NodeKey::from_seed(k.seed());
        assert_eq!(again.public_key(), k.public_key());
        let shown = format!("{k:?}");
        assert!(shown.starts_with("NodeKey(SHA256:"), "{shown}");
        let seed_hex: String = k.seed().iter().map(|b| format!("{b:02x}")).collect();
        assert!(!shown.contains(&seed_hex));
        assert_eq!(fingerprint(&k.public_key()).len(), 7 + 32);
        assert!(check_public_key(&k.public_key()).is_ok());
        assert!(check_public_key(&[0u8; 32]).is_err());
        assert!(check_public_key(&[1u8; 3]).is_err());
    }

    #[test]
    fn length_prefixes_keep_fields_apart() {
        assert_ne!(register_message(b"ab", b"c"), register_message(b"a", b"bc"));
    }
}
