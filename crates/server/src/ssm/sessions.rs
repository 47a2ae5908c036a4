//! StartSession, DescribeSessions and TerminateSession: the native sessions (`crate::sessions`),
//! as SSM shows Session Manager sessions. StartSession authorizes a shell on the node and issues
//! a ticket (`crate::sessions::tickets`): its StreamUrl and TokenValue open the native session
//! stream, whose client is `fleetrun shell --stream-url URL` (AWS's session plugin speaks its own
//! protocol over its own service). Port forwards are `fleetrun port-forward`'s.

use super::shapes::*;
use super::{SsmError, SsmResult, check_max_results, epoch};
use crate::AppState;
use crate::access::authz::{Action, Principal};
use crate::errors::Code;
use crate::sessions::api::{session_scope, stop, visible};
use crate::sessions::tickets::Preset;
use fleetrun_proto::NodeId;
use fleetrun_proto::api::{Session, SessionStatus};
use fleetrun_proto::stream::STREAM_COMMAND_MAX;
use fleetrun_proto::time::{parse_rfc3339_ms, try_parse_rfc3339_ms};
use fleetrun_proto::version::SHELLS_AND_TCP_SINCE;
use fleetrun_store::{SessionQuery, SessionState};
use serde_json::{Value, json};
use std::collections::BTreeMap;
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

/// The SSM document a session stands for: a port forward's, the shell's for a login shell, else
/// the interactive command's (a command, on a PTY or not).
fn document_name(s: &Session) -> &'static str {
    match s.kind.as_str() {
        "port-forward" => "AWS-StartPortForwardingSession",
        "shell" if s.command == crate::sessions::exec::LOGIN_SHELL => SHELL_DOCUMENT,
        "shell" | "exec" => "AWS-StartInteractiveCommand",
        _ => SHELL_DOCUMENT,
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
        "DocumentName": document_name(s),
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

/// The session documents StartSession serves, and what each runs.
fn preset(
    document: Option<&str>,
    mut parameters: BTreeMap<String, Vec<String>>,
) -> Result<Preset, SsmError> {
    let name = document.unwrap_or(SHELL_DOCUMENT);
    let mut command = || -> Result<String, SsmError> {
        let values = parameters.remove("command").unwrap_or_default();
        let [command] = <[String; 1]>::try_from(values).map_err(|_| {
            SsmError::new(
                Code::InvalidParameters,
                format!("{name} takes one value of the parameter command"),
            )
        })?;
        if command.trim().is_empty() || command.len() > STREAM_COMMAND_MAX {
            return Err(SsmError::new(
                Code::InvalidParameters,
                format!("the command of {name} must be 1 to {STREAM_COMMAND_MAX} bytes, not blank"),
            ));
        }
        Ok(command)
    };
    let preset = match name {
        SHELL_DOCUMENT => Preset::Shell,
        "AWS-StartInteractiveCommand" | "AWS-StartNonInteractiveCommand" => {
            Preset::Command(command()?)
        }
        "AWS-StartPortForwardingSession"
        | "AWS-StartPortForwardingSessionToRemoteHost"
        | "AWS-StartPortForwardingSessionToSocket"
        | "AWS-StartSSHSession" => {
            return Err(SsmError::new(
                Code::InvalidDocument,
                format!(
                    "StartSession serves shells and commands here; for {name}, run `fleetrun port-forward NODE LOCAL:REMOTE`"
                ),
            ));
        }
        other => {
            return Err(SsmError::new(
                Code::InvalidDocument,
                format!(
                    "StartSession serves the documents {SHELL_DOCUMENT}, AWS-StartInteractiveCommand and AWS-StartNonInteractiveCommand, not {other}"
                ),
            ));
        }
    };
    if let Some(extra) = parameters.keys().next() {
        return Err(SsmError::new(
            Code::InvalidParameters,
            format!("{name} has no parameter {extra}"),
        ));
    }
    Ok(preset)
}

/// The shell document, StartSession's default.
const SHELL_DOCUMENT: &str = "SSM-SessionManagerRunShell";

/// StartSession: once the caller may open a shell on the connected target, a ticket for the
/// session (`crate::sessions::tickets`). The session's record appears when its client connects.
pub async fn start_session(
    state: &Arc<AppState>,
    p: &Principal,
    req: StartSessionRequest,
) -> SsmResult {
    let target = req.target.ok_or_else(|| {
        SsmError::validation(
            "1 validation error detected: Value null at 'target' failed to satisfy constraint: Member must not be null",
        )
    })?;
    if target.is_empty() || target.len() > 400 {
        return Err(SsmError::validation(
            "1 validation error detected: Value at 'target' failed to satisfy constraint: Member must have length between 1 and 400",
        ));
    }
    if let Some(reason) = &req.reason
        && (reason.is_empty() || reason.chars().count() > 256 || reason.contains('\n'))
    {
        return Err(SsmError::validation(
            "1 validation error detected: Value at 'reason' failed to satisfy constraint: Member must satisfy regular expression pattern: ^.{1,256}$",
        ));
    }
    let preset = preset(
        req.document_name.as_deref(),
        req.parameters.unwrap_or_default(),
    )?;
    let not_connected = || {
        SsmError::new(
            Code::TargetNotConnected,
            format!("{target} is not connected."),
        )
    };
    let node: NodeId = target.parse().map_err(|_| not_connected())?;
    // An unknown node is checked with no tags, then not connected: a refusal says no more.
    state
        .authz
        .require_node(&state.store, p, Action::Shell, &node)
        .await?;
    let streams = state.hub.streams(&node).ok_or_else(not_connected)?;
    if streams.version() < SHELLS_AND_TCP_SINCE {
        return Err(SsmError::new(
            Code::TargetNotConnected,
            format!(
                "{target}'s agent speaks protocol version {}, without shells; update it",
                streams.version()
            ),
        ));
    }
    let (session_id, token) = state
        .tickets
        .issue(node, p.clone(), preset)
        .map_err(|e| SsmError::new(Code::TooManyRequests, e.to_string()))?;
    Ok(json!({
        "SessionId": session_id,
        "TokenValue": token,
        "StreamUrl": stream_url(&state.public_url, &session_id),
    }))
}

/// The WebSocket URL of a ticket's session: the server's public URL, `ws`/`wss` for
/// `http`/`https`.
fn stream_url(public_url: &str, session_id: &str) -> String {
    let base = match public_url.split_once("://") {
        Some(("http", rest)) => format!("ws://{rest}"),
        Some((_, rest)) => format!("wss://{rest}"),
        None => format!("wss://{public_url}"),
    };
    format!("{base}/v1/sessions/{session_id}/stream")
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
    // A session StartSession issued whose client never came (the AWS CLI terminates it when it
    // finds no session plugin): its ticket goes.
    if let Some(node) = state.tickets.node_of(&id) {
        state
            .authz
            .require_node(&state.store, p, Action::TerminateSession, &node)
            .await?;
        if state.tickets.cancel(&id) {
            return Ok(json!({ "SessionId": id }));
        }
    }
    let s = visible(state, p, &id).await?;
    // An ended session is already what TerminateSession asks for: not an error, as on SSM.
    stop(state, p, &s).await?;
    Ok(json!({ "SessionId": s.session_id }))
}
