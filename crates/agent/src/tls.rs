//! Whom the agent trusts when it dials `wss://`: the CA given with `--ca-cert`, the CA it pinned on
//! first contact (saved as `STATE_DIR/ca.pem`), a CA fingerprint to pin (`--ca-fingerprint`), or
//! else the system's roots.
//!
//! Pinning: the server's own CA sends its certificate in the chain; the agent accepts a chain that
//! contains a CA certificate with the given fingerprint and whose leaf verifies against that CA for
//! the server's name. Once the server has accepted the node, that CA is saved and is what every
//! later connection trusts.

use crate::AgentError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio_tungstenite::Connector;

/// The file in the state directory holding the CA pinned on first contact.
pub const SAVED_CA_FILE: &str = "ca.pem";

/// The agent's TLS trust, and the connector built from it.
pub struct Tls {
    state_dir: PathBuf,
    connector: Connector,
    /// Set while trust is a pinned fingerprint not yet confirmed by a successful handshake.
    pin: Option<Arc<PinVerifier>>,
}

impl Tls {
    /// Trust as configured: `--ca-cert`, else the saved CA (unless `--ca-fingerprint` names another
    /// one), else the pin, else the system roots. Plain `ws://` needs none.
    pub fn new(config: &crate::AgentConfig, url: &str) -> Result<Self, AgentError> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let plain = |connector| Tls {
            state_dir: config.state_dir.clone(),
            connector,
            pin: None,
        };
        if url.starts_with("ws://") {
            return Ok(plain(Connector::Plain));
        }
        if let Some(path) = &config.ca_cert {
            let certs = read_certs(path)?;
            return Ok(plain(roots_connector(&provider, certs, path)?));
        }
        let saved_path = config.state_dir.join(SAVED_CA_FILE);
        let saved = if saved_path.exists() {
            Some(read_certs(&saved_path)?)
        } else {
            None
        };
        let pin = config.ca_fingerprint.as_deref().map(|f| f.to_owned());
        match (saved, pin) {
            (Some(certs), pin)
                if pin.as_ref().is_none_or(|p| {
                    certs
                        .iter()
                        .any(|c| fleetrun_proto::tls::fingerprint(c) == *p)
                }) =>
            {
                Ok(plain(roots_connector(&provider, certs, &saved_path)?))
            }
            (_, Some(fingerprint)) => {
                let verifier = Arc::new(PinVerifier {
                    fingerprint,
                    provider: Arc::clone(&provider),
                    seen: Mutex::new(None),
                });
                let client = ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| AgentError::Config(format!("TLS: {e}")))?
                    .dangerous()
                    .with_custom_certificate_verifier(verifier.clone())
                    .with_no_client_auth();
                Ok(Tls {
                    state_dir: config.state_dir.clone(),
                    connector: Connector::Rustls(Arc::new(client)),
                    pin: Some(verifier),
                })
            }
            (_, None) => {
                let native = rustls_native_certs::load_native_certs();
                if native.certs.is_empty() {
                    return Err(AgentError::Config(format!(
                        "no system CA certificates found ({:?}): give the server's CA with --ca-cert FILE or --ca-fingerprint HEX",
                        native.errors
                    )));
                }
                let mut roots = RootCertStore::empty();
                let (_, _) = roots.add_parsable_certificates(native.certs);
                Ok(plain(Connector::Rustls(Arc::new(client_config(
                    provider, roots,
                )?))))
            }
        }
    }

    /// The connector for the next dial.
    pub fn connector(&self) -> Connector {
        self.connector.clone()
    }

    /// Called once the server accepted the node over a pinned connection: saves the CA that
    /// matched the fingerprint as `STATE_DIR/ca.pem` and trusts it alone from now on.
    pub fn confirm(&mut self) -> Result<(), AgentError> {
        let Some(pin) = &self.pin else {
            return Ok(());
        };
        let ca = pin.seen.lock().map(|s| s.clone()).unwrap_or_default();
        let Some(ca) = ca else {
            return Ok(());
        };
        let path = self.state_dir.join(SAVED_CA_FILE);
        save_pem(&path, &ca)?;
        let provider = Arc::clone(&pin.provider);
        self.connector = roots_connector(&provider, vec![ca], &path)?;
        self.pin = None;
        tracing::info!(path = %path.display(), "pinned the server's CA");
        Ok(())
    }
}

/// Explains a failed dial when TLS is the cause, naming what to do; None for other failures.
pub fn describe_dial_error(e: &tokio_tungstenite::tungstenite::Error) -> Option<String> {
    use tokio_tungstenite::tungstenite::Error;
    let rustls_error = match e {
        Error::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>()?,
        Error::Tls(tls) => return Some(format!("TLS: {tls}")),
        _ => return None,
    };
    Some(match rustls_error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            format!("TLS: {}", other.0)
        }
        rustls::Error::InvalidCertificate(cause) => format!(
            "TLS: the server's certificate is not trusted ({cause:?}); give its CA with --ca-cert FILE or --ca-fingerprint HEX (the server prints both)"
        ),
        other => format!("TLS: {other}"),
    })
}

fn client_config(
    provider: Arc<CryptoProvider>,
    roots: RootCertStore,
) -> Result<ClientConfig, AgentError> {
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AgentError::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn roots_connector(
    provider: &Arc<CryptoProvider>,
    certs: Vec<CertificateDer<'static>>,
    from: &Path,
) -> Result<Connector, AgentError> {
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| {
            AgentError::Config(format!(
                "CA certificate in {} is unusable: {e}",
                from.display()
            ))
        })?;
    }
    Ok(Connector::Rustls(Arc::new(client_config(
        Arc::clone(provider),
        roots,
    )?)))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, AgentError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            AgentError::Config(format!(
                "cannot read CA certificate {}: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(AgentError::Config(format!(
            "no certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

/// Writes the CA as PEM: a temporary file, fsynced, renamed into place.
fn save_pem(path: &Path, cert: &CertificateDer<'_>) -> Result<(), AgentError> {
    use std::io::Write;
    let b64 = base64_encode(cert.as_ref());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    let tmp = path.with_extension("pem.tmp");
    let io = |e| AgentError::Io(format!("cannot write {}", path.display()), e);
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(pem.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Accepts a server whose chain holds the pinned CA and whose leaf that CA vouches for.
#[derive(Debug)]
struct PinVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
    /// The CA that matched, for [`Tls::confirm`].
    seen: Mutex<Option<CertificateDer<'static>>>,
}

/// Why a pinned connection was refused.
#[derive(Debug)]
struct PinError(String);

impl std::fmt::Display for PinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PinError {}

fn pin_error(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(PinError(msg)),
    )))
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| fleetrun_proto::tls::fingerprint(c) == self.fingerprint)
        else {
            let presented: Vec<String> = intermediates
                .iter()
                .map(|c| fleetrun_proto::tls::fingerprint(c))
                .collect();
            return Err(pin_error(format!(
                "CA fingerprint mismatch: the server presented no CA certificate with fingerprint {} (it presented {}); check --ca-fingerprint",
                self.fingerprint,
                if presented.is_empty() {
                    "none".to_owned()
                } else {
                    presented.join(", ")
                }
            )));
        };
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| pin_error(format!("the pinned CA certificate is unusable: {e}")))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|e| pin_error(format!("cannot verify with the pinned CA: {e}")))?;
        let verified = verifier.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(ca.clone().into_owned());
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }
}
