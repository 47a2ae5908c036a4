//! Authentication: the one place credentials are checked. Every caller ends up as a principal, or
//! is refused, here:
//!
//! - people and machines on the native API: a bearer token ([`bearer`]), looked up by its SHA-256;
//! - the same on the SSM-compatible API: a SigV4 signature by an access key ([`sigv4()`], with the
//!   signature checks in `sigv4.rs`);
//! - nodes on the agent channel: an Ed25519 signature over the connection's challenge (`node.rs`).
//!
//! The callers (`api/mod.rs`, `ssm/mod.rs`, `channel.rs`) consult the brute-force guard first and
//! report failures to it; what a principal may then do is `crate::access::authz`'s question.

pub mod node;
pub mod sigv4;

use crate::access::authz::Principal;
use crate::access::secrets;
use crate::errors::Code;
use axum::http::{HeaderMap, Method, Uri, header};
use fleetrun_store::Store;
use std::time::SystemTime;

/// Why a caller is not authenticated.
#[derive(Debug)]
pub enum AuthnError {
    /// Bad, missing or unknown credentials: the caller's fault, counted by the brute-force guard.
    Refused {
        /// The kind: a SigV4 refusal's (`IncompleteSignature`, `UnrecognizedClient`...), or
        /// `Unauthorized` for bearer tokens.
        code: Code,
        /// What is wrong, in one line (never the credential itself).
        message: String,
    },
    /// The server could not check (storage, a sealed secret that does not open).
    Internal(String),
    /// The database cannot be reached now.
    Unavailable,
}

impl AuthnError {
    fn refused(code: Code, message: impl Into<String>) -> Self {
        AuthnError::Refused {
            code,
            message: message.into(),
        }
    }
}

impl From<fleetrun_store::StoreError> for AuthnError {
    fn from(e: fleetrun_store::StoreError) -> Self {
        if e.is_unavailable() {
            tracing::warn!("database unavailable: {e}");
            return AuthnError::Unavailable;
        }
        AuthnError::Internal(e.to_string())
    }
}

/// The credential id a native API request presents, for the brute-force guard: its bearer
/// token's public id (`tok_` + a prefix of its hash), known or not; None without a token.
pub fn bearer_credential(headers: &HeaderMap) -> Option<String> {
    let token = headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?
        .trim();
    (!token.is_empty()).then(|| fleetrun_store::token_id(&secrets::hash(token)))
}

/// The service a SigV4-signed request's credential is scoped to (`ssm`, `ec2`, `sts`, ...).
pub fn sigv4_service(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let auth = sigv4::parse_authorization(Some(value)).ok()?;
    Some(sigv4::scoped_service(&auth).to_owned())
}

/// The credential id an AWS-protocol request presents, for the brute-force guard: the access key
/// id of its SigV4 `Authorization` header; None when the header names none.
pub fn sigv4_credential(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let auth = sigv4::parse_authorization(Some(value)).ok()?;
    Some(format!("akid:{}", auth.access_key_id))
}

/// The TOKEN of a request's `Authorization: Bearer TOKEN`.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthnError> {
    let refused = |m: &str| AuthnError::refused(Code::Unauthorized, m);
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(refused(
            "missing Authorization header: pass `Authorization: Bearer TOKEN`",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| refused("malformed Authorization header: expected `Bearer TOKEN`"))
}

/// The principal a request's `Authorization: Bearer TOKEN` acts as.
pub async fn bearer(store: &Store, headers: &HeaderMap) -> Result<Principal, AuthnError> {
    let refused = |m: &str| AuthnError::refused(Code::Unauthorized, m);
    let token = bearer_token(headers)?;
    // Looked up by hash: the comparison is the database's index lookup of a SHA-256, so timing
    // says nothing about how much of a guess was right.
    let (user, token_id) = store
        .token_principal(&secrets::hash(token))
        .await?
        .ok_or_else(|| refused("invalid or expired API token"))?;
    Ok(Principal::new(user, token_id))
}

/// Verifies a request's SigV4 signature; the principal is the user the access key belongs to.
pub async fn sigv4(
    store: &Store,
    secret_box: &secrets::SecretBox,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    service: &str,
) -> Result<Principal, AuthnError> {
    let sig_err = |e: sigv4::SigError| AuthnError::refused(e.code, e.message);
    let auth_value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let auth = sigv4::parse_authorization(auth_value).map_err(sig_err)?;
    sigv4::check_service(&auth, service).map_err(sig_err)?;
    let Some((nonce, sealed, user)) = store.access_key_secret(&auth.access_key_id).await? else {
        return Err(AuthnError::refused(
            Code::UnrecognizedClient,
            "The security token included in the request is invalid.",
        ));
    };
    let secret = secret_box
        .open_sealed(&nonce, &sealed)
        .and_then(|s| String::from_utf8(s).ok())
        .ok_or_else(|| {
            AuthnError::Internal(
                "an access key's secret does not decrypt with this data dir's key".into(),
            )
        })?;
    let mut pairs: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(n, v)| Some((n.as_str().to_ascii_lowercase(), v.to_str().ok()?.to_owned())))
        .collect();
    // Over HTTP/2 the host a client signed comes as the `:authority` pseudo-header (the URI's
    // authority here), not as a `Host` header: it is the signed `host` then.
    if !pairs.iter().any(|(n, _)| n == "host")
        && let Some(authority) = uri.authority()
    {
        pairs.push(("host".to_owned(), authority.as_str().to_owned()));
    }
    let req = sigv4::Request {
        method: method.as_str(),
        path: uri.path(),
        query: uri.query().unwrap_or(""),
        headers: &pairs,
        body,
    };
    sigv4::verify(&auth, &req, &secret, SystemTime::now()).map_err(sig_err)?;
    let user = store.user(&user).await?.ok_or_else(|| {
        AuthnError::Internal("an access key belongs to a user that does not exist".into())
    })?;
    Ok(Principal::new(user, auth.access_key_id.to_string()))
}
