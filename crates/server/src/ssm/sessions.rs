//! DescribeSessions and TerminateSession: the native session records (`crate::sessions::api`), as
//! SSM shows Session Manager sessions. StartSession is not served: `fleetrun shell`,
//! `fleetrun shell -c` and `fleetrun port-forward` are the clients (AWS's session plugin speaks
//! its own protocol).

use super::shapes::*;
use super::{SsmError, SsmResult, check_max_results, epoch};
use crate::AppState;
use crate::access::authz::Principal;
use crate::errors::Code;
use crate::sessions::api::{session_scope, stop, visible};
use fleetrun_proto::NodeId;
use fleetrun_proto::api::{Session, SessionStatus};
use fleetrun_proto::time::{parse_rfc3339_ms, try_parse_rfc3339_ms};
use fleetrun_store::{SessionQuery, SessionState};
use serde_json::{Value, json};
use std::sync::Arc;

/// SessionFilterKey values.
const FILTER_KEYS: [&str; 7] = [
    "InvokedAfter",
    "InvokedBefore",
    "Target",
    "Owner",
    "Status",
    "SessionId",
    "AccessType",
];

/// The SSM status of a session record.
fn ssm_status(s: &Session) -> &'static str {
    match s.status {
        SessionStatus::Active => "Connected",
        SessionStatus::Failed => "Failed",
        SessionStatus::Ended | SessionStatus::Terminated => "Terminated",
    }
}

/// The SSM document a kind of session stands for.
fn document_name(kind: &str) -> &'static str {
    match kind {
        "port-forward" => "AWS-StartPortForwardingSession",
        "exec" => "AWS-StartInteractiveCommand",
        _ => "SSM-SessionManagerRunShell",
    }
}

/// The owner as SSM shows one: an ARN naming the fleetrun user.
pub fn owner_arn(principal: &str) -> String {
    format!(
        "arn:aws:iam::{}:user/{principal}",
        crate::run::document::OWNER_SELF
    )
}

fn shape(s: &Session) -> Value {
    let mut v = json!({
        "SessionId": s.session_id,
        "Target": s.node_id.as_str(),
        "Status": ssm_status(s),
        "StartDate": epoch(parse_rfc3339_ms(&s.started_at)),
        "DocumentName": document_name(&s.kind),
        "Owner": owner_arn(&s.principal),
        "AccessType": "Standard",
    });
    if let Some(end) = &s.ended_at {
        v["EndDate"] = epoch(parse_rfc3339_ms(end));
    }
    let mut details = s.command.clone();
    if !s.end_reason.is_empty() {
        // SSM's Reason is one line of at most 256 characters.
        v["Reason"] = json!(
            s.end_reason
                .chars()
                .take(256)
                .collect::<String>()
                .replace('\n', " ")
        );
        if details.is_empty() {
            details = s.end_reason.clone();
        }
    }
    if !details.is_empty() {
        v["Details"] = json!(details.chars().take(1024).collect::<String>());
    }
    v
}

fn invalid_filter(message: String) -> SsmError {
    SsmError::new(Code::InvalidFilterKey, message)
}

/// A NextToken names the last session of the page before.
fn token_of(s: &Session) -> String {
    format!("fs1.{}", s.session_id)
}

pub async fn describe_sessions(
    state: &Arc<AppState>,
    p: &Principal,
    req: DescribeSessionsRequest,
) -> SsmResult {
    let mut q = SessionQuery {
        state: match req.state.as_deref() {
            Some("Active") => SessionState::Active,
            Some("History") => SessionState::Over,
            Some(other) => {
                return Err(SsmError::validation(format!(
                    "1 validation error detected: Value '{other}' at 'state' failed to satisfy constraint: Member must satisfy enum value set: [Active, History]"
                )));
            }
            None => {
                return Err(SsmError::validation(
                    "1 validation error detected: Value null at 'state' failed to satisfy constraint: Member must not be null",
                ));
            }
        },
        ..SessionQuery::default()
    };
    let limit = check_max_results(req.max_results, 1, 200, 20)?;
    let filters = req.filters.unwrap_or_default();
    if filters.len() > 6 {
        return Err(SsmError::validation(
            "1 validation error detected: Value at 'filters' failed to satisfy constraint: Member must have length less than or equal to 6",
        ));
    }
    // A filter no session can match (a status fleetrun never shows, another access type).
    let mut none = false;
    for f in filters {
        let (key, value) = (f.key.unwrap_or_default(), f.value.unwrap_or_default());
        if !FILTER_KEYS.contains(&key.as_str()) {
            return Err(invalid_filter(format!("Filter key {key} is not valid.")));
        }
        if value.is_empty() || value.len() > 400 {
            return Err(SsmError::validation(format!(
                "The value of filter {key} must be 1 to 400 characters."
            )));
        }
        let date = |v: &str| {
            try_parse_rfc3339_ms(v).ok_or_else(|| {
                SsmError::validation(format!(
                    "{key} takes a date such as 2026-12-01T00:00:00Z, not {v}"
                ))
            })
        };
        match key.as_str() {
            "InvokedAfter" => q.started_after = Some(date(&value)?),
            "InvokedBefore" => q.started_before = Some(date(&value)?),
            "Target" => match value.parse::<NodeId>() {
                Ok(id) => q.node = Some(id),
                Err(_) => none = true,
            },
            "Owner" => {
                let name = value
                    .rsplit_once(":user/")
                    .map_or(value.as_str(), |(_, n)| n);
                q.principal = Some(name.to_owned());
            }
            "SessionId" => q.session_id = Some(value),
            "Status" => match value.as_str() {
                "Connected" => q.statuses = vec![SessionStatus::Active],
                "Terminated" => q.statuses = vec![SessionStatus::Ended, SessionStatus::Terminated],
                "Failed" => q.statuses = vec![SessionStatus::Failed],
                "Connecting" | "Disconnected" | "Terminating" => none = true,
                other => {
                    return Err(SsmError::validation(format!(
                        "Status {other} is not one of Connected, Connecting, Disconnected, Terminated, Terminating, Failed."
                    )));
                }
            },
            _ => none |= value != "Standard",
        }
    }
    let cursor = match req.next_token.as_deref() {
        None => None,
        Some(t) => {
            let bad = || SsmError::new(Code::InvalidNextToken, "The specified token is not valid.");
            let id = t
                .strip_prefix("fs1.")
                .filter(|id| id.len() <= 96)
                .ok_or_else(bad)?;
            Some(state.store.session_cursor(id).await?.ok_or_else(bad)?)
        }
    };
    if none {
        return Ok(json!({ "Sessions": [] }));
    }
    let scope = session_scope(state, p).await?;
    let after = cursor.as_ref().map(|(at, id)| (*at, id.as_str()));
    let page = state
        .store
        .find_sessions(&q, scope.as_filter(), after, i64::from(limit))
        .await?;
    let mut out = json!({ "Sessions": page.iter().map(shape).collect::<Vec<_>>() });
    if page.len() == limit as usize
        && let Some(last) = page.last()
    {
        out["NextToken"] = json!(token_of(last));
    }
    Ok(out)
}

pub async fn terminate_session(
    state: &Arc<AppState>,
    p: &Principal,
    req: TerminateSessionRequest,
) -> SsmResult {
    let id = req.session_id.ok_or_else(|| {
        SsmError::validation(
            "1 validation error detected: Value null at 'sessionId' failed to satisfy constraint: Member must not be null",
        )
    })?;
    if id.is_empty() || id.len() > 96 {
        return Err(SsmError::validation(
            "1 validation error detected: Value at 'sessionId' failed to satisfy constraint: Member must have length between 1 and 96",
        ));
    }
    let s = visible(state, p, &id).await?;
    // An ended session is already what TerminateSession asks for: not an error, as on SSM.
    stop(state, p, &s).await?;
    Ok(json!({ "SessionId": s.session_id }))
}
