//! The one spelling of a CA certificate's fingerprint, shared by the server (which prints it with
//! activation codes), the agent (which pins it on first contact) and the CLI.

use sha2::{Digest, Sha256};

/// The fingerprint of a certificate: SHA-256 of its DER bytes, lowercase hex (64 characters).
pub fn fingerprint(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}

/// Reads a fingerprint as an operator may paste it: hex in either case, with or without `:`
/// between bytes, optionally prefixed `sha256:`. Returns the canonical lowercase form.
pub fn parse_fingerprint(s: &str) -> Result<String, String> {
    let t = s.trim();
    let t = t
        .strip_prefix("sha256:")
        .or_else(|| t.strip_prefix("SHA256:"))
        .unwrap_or(t);
    let hex: String = t.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "CA fingerprint {s:?} must be 64 hex digits (SHA-256 of the CA certificate)"
        ));
    }
    Ok(hex.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_lowercase_sha256_hex_and_parse_leniently() {
        let f = fingerprint(b"abc");
        assert_eq!(
            f,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let colons = f
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(parse_fingerprint(&colons).unwrap(), f);
        assert_eq!(parse_fingerprint(&format!("sha256:{f}")).unwrap(), f);
        assert!(parse_fingerprint("abc").is_err());
        assert!(parse_fingerprint(&"g".repeat(64)).is_err());
    }
}
