//! The one request gate both front doors (`api/mod.rs::authenticate`, `ssm/mod.rs::handle`) pass
//! every call through, so the two APIs cannot disagree on who gets in or what is recorded:
//!
//! - [`admit`]: the brute-force guard's check, then authentication, a refusal counted against the
//!   source and credential (every refusal of a credential, whatever its kind, the same on both
//!   APIs), then the principal's request rate;
//! - [`conclude`]: deny by default (an answer given without asking `authz` is turned into an
//!   `AccessDenied`), the audit record (principal, resources, the request redacted, the outcome
//!   with its error code), and the wait for that record's commit, for accepted writes only.

use crate::access::audit::{self, CreatedCommand, DeniedNodes, ErrorCode};
use crate::access::authn::AuthnError;
use crate::access::authz::Principal;
use crate::access::guard::{AuthGuard, RateLimiter};
use crate::errors::{Code, Error, FrontDoor, render, retry_secs};
use fleetrun_proto::time::now_ms;
use fleetrun_store::{AuditEntry, Store};
use std::future::Future;
use std::net::IpAddr;

/// Who knocks: the source address (None outside a real listener) and the credential id the
/// request presents (None without one), both as the brute-force guard counts them.
pub struct Caller<'a> {
    /// The source address.
    pub ip: Option<IpAddr>,
    /// The credential id (`tok_…`, `akid:…`).
    pub credential: Option<&'a str>,
}

/// Admits a caller: a source or credential over its failure budget is refused before its
/// credentials are looked at; a refused `authenticate` is counted against both; an authenticated
/// principal over its request rate is refused. The principal (once known) is put in `entry`.
pub async fn admit<D: FrontDoor>(
    guard: &AuthGuard,
    limiter: &RateLimiter,
    caller: &Caller<'_>,
    entry: &mut AuditEntry,
    authenticate: impl Future<Output = Result<Principal, AuthnError>>,
) -> Result<Principal, Error> {
    if let Some(ip) = caller.ip
        && let Err(retry) = guard.check_credential(ip, caller.credential)
    {
        return Err(Error::new(
            Code::TooManyFailedAuthentications,
            format!(
                "too many failed authentications from this address or with this {}; retry in {} s",
                D::CREDENTIAL,
                retry_secs(retry)
            ),
        )
        .retry_after(retry));
    }
    let principal = match authenticate.await {
        Ok(p) => p,
        Err(e) => {
            // Counted by kind: every refusal of the credential, never a fault of the server.
            if let AuthnError::Refused { .. } = e
                && let Some(ip) = caller.ip
            {
                guard.failed_credential(ip, caller.credential);
            }
            return Err(e.into());
        }
    };
    entry.principal = principal.name().to_owned();
    if let Err(retry) = limiter.check(principal.name()) {
        return Err(Error::new(
            Code::TooManyRequests,
            format!(
                "{} is over its request rate limit; retry in {} s",
                principal.name(),
                retry_secs(retry)
            ),
        )
        .retry_after(retry));
    }
    Ok(principal)
}

/// What of a request its record keeps, once the request was read.
pub struct Recorded<'a> {
    /// The query string (native API).
    pub query: Option<String>,
    /// The body as received (redacted, or kept as a digest, by [`audit::body_record`]).
    pub body: &'a [u8],
}

/// How a request ended before its answer goes out.
pub struct Outcome<'a> {
    /// The principal the request acted as (None: refused before that was known).
    pub principal: Option<&'a Principal>,
    /// What the record keeps of the request (None: refused before it was read).
    pub request: Option<Recorded<'a>>,
    /// Whether the request changes state: an accepted one waits for its record's commit.
    pub write: bool,
    /// What the request addressed, for a deny-by-default refusal ("this route", "operation X").
    pub subject: &'a str,
}

/// Requests that take longer than this (from arrival to answer, audit included) are logged.
pub const SLOW_REQUEST_MS: i64 = 250;

/// Concludes a request: deny by default, then the audit record, then the answer. An accepted
/// write's answer waits for its record's commit; anything else only queues its record, so reads
/// and refusals never wait for the writer.
pub async fn conclude<D: FrontDoor>(
    store: &Store,
    mut entry: AuditEntry,
    outcome: Outcome<'_>,
    mut resp: axum::response::Response,
) -> axum::response::Response {
    if let Some(p) = outcome.principal
        && resp.status().is_success()
        && !p.was_authorized()
    {
        // A handler that answered without asking crate::access::authz is a bug, and must not hand
        // anything out.
        tracing::error!(
            subject = outcome.subject,
            "handler answered without an authorization check; refused"
        );
        resp = render::<D>(Error::new(
            Code::AccessDenied,
            format!("{} has no authorization rule; refused", outcome.subject),
        ));
    }
    let accepted = resp.status().is_success();
    if let Some(r) = outcome.request {
        let body = audit::body_record(&mut entry, r.body, accepted, D::DOCUMENT_MEMBERS);
        entry.params = D::params(r.query, body);
    }
    if let Some(CreatedCommand(id)) = resp.extensions().get::<CreatedCommand>() {
        entry.command_id = id.clone();
    }
    if let Some(DeniedNodes(nodes)) = resp.extensions().get::<DeniedNodes>() {
        audit::add_nodes(&mut entry, nodes);
    }
    entry.result = match resp.extensions().get::<ErrorCode>() {
        Some(ErrorCode(code)) => format!("{} {code}", resp.status().as_u16()),
        None => resp.status().as_u16().to_string(),
    };
    let (started, action, result) = (entry.at, entry.action.clone(), entry.result.clone());
    audit::record(store, entry, outcome.write && accepted).await;
    // A slow answer is worth a line at the default level: it says where a client's latency went.
    let took = now_ms().saturating_sub(started);
    if took >= SLOW_REQUEST_MS {
        tracing::warn!(action, result, took_ms = took, "slow request");
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::guard::MAX_FAILURES_PER_CREDENTIAL;
    use crate::api::Native;
    use crate::ssm::Ssm;
    use fleetrun_proto::api::Role;
    use fleetrun_store::UserRow;

    fn alice() -> Principal {
        Principal::new(
            UserRow {
                name: "alice".into(),
                role: Role::Admin,
                policy: String::new(),
            },
            "tok_alice".into(),
        )
    }

    /// A caller with one credential from one address.
    fn caller() -> Caller<'static> {
        Caller {
            ip: Some([192, 0, 2, 7].into()),
            credential: Some("tok_guessed"),
        }
    }

    /// Through door `D`: faults of the server are not counted; refusals are, up to the lock-out,
    /// which is refused with its code and a Retry-After before the credential is looked at.
    async fn counts_refusals_not_faults<D: FrontDoor>() {
        let (guard, limiter) = (AuthGuard::default(), RateLimiter::default());
        let mut entry = AuditEntry::default();
        for _ in 0..MAX_FAILURES_PER_CREDENTIAL * 2 {
            let fault = async { Err(AuthnError::Internal("store down".into())) };
            let e = admit::<D>(&guard, &limiter, &caller(), &mut entry, fault)
                .await
                .unwrap_err();
            assert_eq!(e.code, Code::Internal);
        }
        for _ in 0..MAX_FAILURES_PER_CREDENTIAL {
            let refused = async {
                Err(AuthnError::Refused {
                    code: Code::InvalidSignature,
                    message: "no".into(),
                })
            };
            let e = admit::<D>(&guard, &limiter, &caller(), &mut entry, refused)
                .await
                .unwrap_err();
            assert_eq!(e.code, Code::InvalidSignature);
        }
        let unread = async { panic!("a locked credential is looked at") };
        let e = admit::<D>(&guard, &limiter, &caller(), &mut entry, unread)
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::TooManyFailedAuthentications);
        assert!(e.retry_after.is_some_and(|r| r.as_secs() <= 60));
        assert!(e.message.contains(D::CREDENTIAL), "{}", e.message);
        assert_eq!(entry.principal, "", "no principal for a refusal");
    }

    #[tokio::test]
    async fn both_doors_count_refused_credentials_alike_and_faults_not_at_all() {
        counts_refusals_not_faults::<Native>().await;
        counts_refusals_not_faults::<Ssm>().await;
    }

    #[tokio::test]
    async fn a_principal_over_its_rate_is_refused_and_named() {
        let (guard, limiter) = (AuthGuard::default(), RateLimiter::new(1, 1));
        let mut entry = AuditEntry::default();
        let p = admit::<Native>(&guard, &limiter, &caller(), &mut entry, async {
            Ok(alice())
        })
        .await
        .expect("admitted");
        assert_eq!(p.name(), "alice");
        let e = admit::<Native>(&guard, &limiter, &caller(), &mut entry, async {
            Ok(alice())
        })
        .await
        .unwrap_err();
        assert_eq!(e.code, Code::TooManyRequests);
        assert!(e.retry_after.is_some());
        assert_eq!(entry.principal, "alice");
    }
}
