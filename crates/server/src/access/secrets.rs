//! Random tokens and their hashes. The server stores only SHA-256 hashes of secrets it hands out
//! (API tokens, activation codes, node secrets), so a copy of the database gives no access.

use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};

/// A random alphanumeric string of `len` characters from the OS-seeded thread RNG.
pub fn random_token(len: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// 128 random bits.
pub fn random_u128() -> u128 {
    rand::rng().random()
}

/// Hex SHA-256 of a secret, as stored.
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Compares two hashes without leaking where they differ.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Encrypts secrets the server must be able to read back (SigV4 secret keys), with a 256-bit key kept
/// in the data dir (`secrets.key`, owner-only). A stolen database alone reveals none of them.
pub struct SecretBox {
    cipher: chacha20poly1305::XChaCha20Poly1305,
}

impl SecretBox {
    /// Loads the key from `path`, creating it (mode 0600) on first use.
    pub fn open(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let key = match std::fs::read(path) {
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key: [u8; 32] = rand::random();
                crate::app::write_private_file(path, &key)?;
                key.to_vec()
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        Self::from_key(path, &key)
    }

    /// Loads the key from `path`, which must exist (a configured key file).
    pub fn open_existing(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let key = std::fs::read(path)
            .with_context(|| format!("cannot read the secrets key file {}", path.display()))?;
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %path.display(), "the secrets key file is readable by other users; chmod 600 it");
        }
        Self::from_key(path, &key)
    }

    fn from_key(path: &std::path::Path, key: &[u8]) -> anyhow::Result<Self> {
        use chacha20poly1305::KeyInit;
        let cipher = chacha20poly1305::XChaCha20Poly1305::new_from_slice(key)
            .map_err(|_| anyhow::anyhow!("{} must hold exactly 32 bytes", path.display()))?;
        Ok(SecretBox { cipher })
    }

    /// Encrypts; returns (nonce, ciphertext).
    pub fn seal(&self, plain: &[u8]) -> (Vec<u8>, Vec<u8>) {
        use chacha20poly1305::aead::Aead;
        let nonce: [u8; 24] = rand::random();
        let sealed = self
            .cipher
            .encrypt(&chacha20poly1305::XNonce::from(nonce), plain)
            .unwrap_or_default();
        (nonce.to_vec(), sealed)
    }

    /// Decrypts; None when the data or nonce was tampered with or the key changed.
    pub fn open_sealed(&self, nonce: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        use chacha20poly1305::aead::Aead;
        let nonce: [u8; 24] = nonce.try_into().ok()?;
        self.cipher
            .decrypt(&chacha20poly1305::XNonce::from(nonce), sealed)
            .ok()
    }
}
