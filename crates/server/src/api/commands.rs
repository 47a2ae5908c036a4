//! `/v1/commands`: send a command, list and show commands and invocations, watch progress, cancel.

use super::{ApiError, ApiJson, page_limit, parse_id};
use crate::AppState;
use crate::access::audit::CreatedCommand;
use crate::access::authz::{Action, Principal};
use crate::errors::Code;
use crate::run::send::{Idempotency, SendOptions, Sent};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use fleetrun_proto::api::{CancelCommand, Command, Invocation, SendCommand};
use fleetrun_proto::limits::{IDEMPOTENCY_KEY_HEADER, check_idempotency_key};
use fleetrun_proto::{CommandId, NodeId};
use fleetrun_store::CommandCursor;
use serde::Deserialize;
use std::collections::HashSet;
use std::sync::Arc;

/// Accepts a command (see [`crate::run::send`]). Answers 201 with the command; with an `Idempotency-Key`
/// header that this principal already sent with the same body, 200 with the command that key made
/// (and `Idempotent-Replayed: true`); the same key with another body is refused with 422
/// `IdempotencyKeyMismatch`.
pub async fn send(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<SendCommand>,
) -> Result<Response, ApiError> {
    let idempotency = idempotency_key(&headers)?.map(|key| Idempotency {
        key: format!("native:{key}"),
        request_hash: crate::run::send::request_hash(&req),
    });
    let opts = SendOptions {
        idempotency,
        ..SendOptions::default()
    };
    let sent = crate::run::send::send_command(&state, &p, req, opts).await?;
    Ok(sent_response(sent))
}

/// A send's answer: 201 with the command, or 200 marked replayed for a retry.
pub(crate) fn sent_response(Sent { command, replayed }: Sent) -> Response {
    let created = Extension(CreatedCommand(command.command_id.to_string()));
    if replayed {
        (
            StatusCode::OK,
            [(IDEMPOTENT_REPLAYED, "true")],
            created,
            Json(command),
        )
            .into_response()
    } else {
        (StatusCode::CREATED, created, Json(command)).into_response()
    }
}

/// The header a replayed send's answer carries.
const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// The `Idempotency-Key` header, checked: at most one, 1 to 128 visible ASCII characters.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let bad = |m: String| ApiError::new(Code::InvalidIdempotencyKey, m);
    let mut values = headers.get_all(IDEMPOTENCY_KEY_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(bad("Idempotency-Key is given more than once".into()));
    }
    let key = value.to_str().map_err(|_| {
        bad("Idempotency-Key must be visible ASCII characters (0x21 to 0x7E)".into())
    })?;
    check_idempotency_key(key).map_err(bad)?;
    Ok(Some(key.to_owned()))
}

/// Query of `GET /v1/commands`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<u32>,
    /// Only commands listed after this cursor: an RFC 3339 time (commands requested before it) or
    /// a command id (the commands after it in the listing: pass the last id of a page to get the
    /// next page).
    before: Option<String>,
}

/// The `before` cursor of a listing: a command id, or an RFC 3339 time.
async fn cursor(state: &AppState, before: &str) -> Result<CommandCursor, ApiError> {
    let bad = |m: String| ApiError::new(Code::InvalidParameters, m);
    if let Ok(id) = before.parse::<CommandId>() {
        return state
            .store
            .command_cursor(&id)
            .await?
            .ok_or_else(|| bad(format!("before: no command {id} (it may have been purged)")));
    }
    let ms = humantime::parse_rfc3339_weak(before)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .ok_or_else(|| {
            bad(format!(
                "before must be a command id or an RFC 3339 time, got {}",
                fleetrun_proto::targets::shown(before)
            ))
        })?;
    Ok(CommandCursor {
        requested_at: ms,
        command_id: String::new(),
    })
}

/// Commands with an invocation on a node the caller may read, newest first.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<Command>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::new(Code::InvalidRequest, e.body_text()))?;
    let limit = page_limit(q.limit, 50, 1000)?;
    let before = match q.before.as_deref() {
        Some(b) => Some(cursor(&state, b).await?),
        None => None,
    };
    let scope = state
        .authz
        .node_scope(&state.store, &p, Action::ReadOutput)
        .await?;
    Ok(Json(
        state
            .store
            .list_commands(limit, scope.as_filter(), before.as_ref())
            .await?,
    ))
}

async fn load(state: &AppState, id: &str) -> Result<Command, ApiError> {
    let id: CommandId = parse_id(id, Code::InvalidCommandId)?;
    state
        .store
        .get_command(&id)
        .await?
        .ok_or_else(|| ApiError::new(Code::CommandNotFound, format!("no command {id}")))
}

/// One command with its invocations on the nodes the caller may read.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Command>, ApiError> {
    let mut cmd = load(&state, &id).await?;
    cmd.invocations = readable_invocations(&state, &p, &cmd.command_id).await?;
    Ok(Json(cmd))
}

/// A command's invocations on the nodes the caller may read.
pub async fn invocations(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Vec<Invocation>>, ApiError> {
    let cmd = load(&state, &id).await?;
    Ok(Json(
        readable_invocations(&state, &p, &cmd.command_id).await?,
    ))
}

/// The invocations of a command on nodes the principal may read (secure values masked in their
/// inline output); refused when there is none.
async fn readable_invocations(
    state: &AppState,
    p: &Principal,
    id: &CommandId,
) -> Result<Vec<Invocation>, ApiError> {
    let scope = state
        .authz
        .command_scope(&state.store, p, Action::ReadOutput, id)
        .await?;
    let mut invs = state.store.list_invocations(id).await?;
    invs.retain(|i| scope.contains(&i.node_id));
    let mut exports = state.store.export_states(id).await?;
    for inv in &mut invs {
        inv.output_s3_pending = exports.remove(&inv.node_id).map(|e| e.text());
    }
    crate::run::params::mask_invocations(&state.store, &state.secret_box, &mut invs).await?;
    Ok(invs)
}

/// Cancels a command's invocations (all, or some nodes'). Answers with the command.
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CancelCommand>,
) -> Result<Json<Command>, ApiError> {
    let cmd = load(&state, &id).await?;
    // Refused whole when any node to cancel on is not the caller's to cancel on.
    state
        .authz
        .require_command_nodes(
            &state.store,
            &p,
            Action::Cancel,
            &cmd.command_id,
            &req.node_ids,
        )
        .await?;
    if !req.node_ids.is_empty() {
        let invs = state.store.list_invocations(&cmd.command_id).await?;
        let known: HashSet<&NodeId> = invs.iter().map(|i| &i.node_id).collect();
        if let Some(n) = req.node_ids.iter().find(|n| !known.contains(n)) {
            return Err(ApiError::new(
                Code::InvalidNodeId,
                format!("command {} has no invocation on node {n}", cmd.command_id),
            ));
        }
    }
    if !cmd.status.is_terminal() {
        crate::run::dispatch::cancel(&state, &cmd.command_id, req.node_ids).await?;
    }
    // The dispatcher applies the cancel in order with everything else; answer with what is stored now.
    let cmd = load(&state, &id).await?;
    Ok(Json(cmd))
}

/// Streams the command (without invocations) as NDJSON: now, then after every change, until it ends.
pub async fn watch(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let first = load(&state, &id).await?;
    state
        .authz
        .command_scope(&state.store, &p, Action::ReadOutput, &first.command_id)
        .await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    // Subscribed before the state is read again below, so no change falls between the two.
    let mut changes = state.dispatchers.watch(&first.command_id);
    let first = load(&state, &id).await?;
    tokio::spawn(async move {
        let line = |c: &Command| {
            let mut v = serde_json::to_vec(c).unwrap_or_default();
            v.push(b'\n');
            Ok(bytes::Bytes::from(v))
        };
        let mut last = serde_json::to_vec(&first).unwrap_or_default();
        if tx.send(line(&first)).await.is_err() {
            return;
        }
        let id = first.command_id.clone();
        let mut terminal = first.status.is_terminal();
        while !terminal {
            let alive = match changes.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => false,
            };
            let Ok(Some(cmd)) = state.store.get_command(&id).await else {
                return;
            };
            terminal = cmd.status.is_terminal();
            let now = serde_json::to_vec(&cmd).unwrap_or_default();
            if now != last {
                if tx.send(line(&cmd)).await.is_err() {
                    return;
                }
                last = now;
            }
            if !alive && !terminal {
                // No dispatcher runs here any more: taken over by another replica (watched
                // through the bus from now on), or, on its own, ended or failed: the stored
                // state is final.
                changes = state.dispatchers.watch(&id);
                if changes.is_none() {
                    return;
                }
            }
        }
    });
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}
