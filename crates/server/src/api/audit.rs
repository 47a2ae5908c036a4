//! `GET /v1/audit`, `POST /v1/audit/verify`: reading and checking the audit trail (bearer token).

use super::{ApiError, page_limit};
use crate::AppState;
use crate::access::authz::{Action, Principal, Resource};
use crate::errors::Code;
use axum::extract::{Query, State};
use axum::{Extension, Json};
use fleetrun_proto::api::{AuditAnchor, AuditQuery, AuditRecord, AuditVerify};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

/// Records matching the query, newest first.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<AuditRecord>>, ApiError> {
    state
        .authz
        .require(&p, Action::ReadAudit, Resource::Fleet)?;
    let Query(q) = query.map_err(|e| ApiError::new(Code::InvalidRequest, e.body_text()))?;
    let limit = page_limit(q.limit, 100, 10_000)?;
    let since = q
        .since
        .as_deref()
        .map(|s| time_ms("since", s))
        .transpose()?;
    let until = q
        .until
        .as_deref()
        .map(|s| time_ms("until", s))
        .transpose()?;
    // Reads and refused calls only queue their records: the listing shows every call made before it.
    state.store.flush_audit().await?;
    Ok(Json(
        state.store.audit_records(&q, since, until, limit).await?,
    ))
}

/// Walks the whole chain; with an [`AuditAnchor`] body, it must also still hold that record.
pub async fn verify(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    body: axum::body::Bytes,
) -> Result<Json<AuditVerify>, ApiError> {
    state
        .authz
        .require(&p, Action::ReadAudit, Resource::Fleet)?;
    let anchor: Option<AuditAnchor> = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                Code::InvalidRequest,
                format!("the body must be an anchor {{\"seq\": N, \"hash\": \"...\"}}: {e}"),
            )
        })?)
    };
    if let Some(a) = &anchor {
        check_anchor(a)?;
    }
    state.store.flush_audit().await?;
    Ok(Json(state.store.verify_audit(anchor.as_ref()).await?))
}

/// An anchor names a record as the chain stores it: `seq` from 1 to `i64::MAX` (the column's type;
/// a larger one used to wrap negative and verify as ok), `hash` 64 hex digits.
fn check_anchor(a: &AuditAnchor) -> Result<(), ApiError> {
    if a.seq == 0 || i64::try_from(a.seq).is_err() {
        return Err(ApiError::new(
            Code::InvalidParameters,
            format!(
                "seq must be 1 to {}, got {}: it names a record of the chain",
                i64::MAX,
                a.seq
            ),
        ));
    }
    if a.hash.len() != 64 || !a.hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::new(
            Code::InvalidParameters,
            format!(
                "hash must be 64 hex digits (a record's SHA-256), got {} characters",
                a.hash.chars().count()
            ),
        ));
    }
    Ok(())
}

fn time_ms(what: &str, s: &str) -> Result<i64, ApiError> {
    humantime::parse_rfc3339_weak(s)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .ok_or_else(|| {
            ApiError::new(
                Code::InvalidParameters,
                format!("{what} must be an RFC 3339 time, got {s:?}"),
            )
        })
}
