//! `/v1/commands`: send a command, list and show commands and invocations, watch progress, cancel.

use super::{ApiError, ApiJson, parse_id};
use crate::clock::now_ms;
use crate::dispatch::{self, DispatchMsg};
use crate::store::{CommandRow, CommandSpec, NewCommand};
use crate::{AppState, secrets};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleetrun_proto::api::{
    CancelCommand, Command, DOCUMENT_RUN_SHELL_SCRIPT, Invocation, SendCommand,
};
use fleetrun_proto::limits::*;
use fleetrun_proto::targets::{Rate, TargetExpr};
use fleetrun_proto::{CommandId, CommandStatus, NodeId};
use serde::Deserialize;
use std::collections::HashSet;
use std::sync::Arc;

/// Accepts a command: validates it, resolves its targets, persists it with all its invocations, then
/// starts its dispatcher. Answers 201 with the command.
pub async fn send(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<SendCommand>,
) -> Result<(StatusCode, Json<Command>), ApiError> {
    let bad = |code: &'static str, msg: String| ApiError::bad_request(code, msg);
    let document_name = req
        .document_name
        .clone()
        .unwrap_or_else(|| DOCUMENT_RUN_SHELL_SCRIPT.into());
    if document_name != DOCUMENT_RUN_SHELL_SCRIPT {
        return Err(bad(
            "InvalidDocument",
            format!("document {document_name:?} is not supported: use {DOCUMENT_RUN_SHELL_SCRIPT}"),
        ));
    }
    if req.commands.is_empty() {
        return Err(bad(
            "InvalidParameters",
            "commands is empty: give at least one script line".into(),
        ));
    }
    let script_len: usize = req.commands.iter().map(|c| c.len() + 1).sum();
    if script_len > SCRIPT_MAX {
        return Err(bad(
            "MaxDocumentSizeExceeded",
            format!("the script is {script_len} bytes; the limit is {SCRIPT_MAX}"),
        ));
    }
    if req.commands.iter().any(|c| c.contains('\0')) {
        return Err(bad(
            "InvalidParameters",
            "commands contain a NUL byte".into(),
        ));
    }
    let working_dir = req.working_directory.clone().unwrap_or_default();
    if working_dir.len() > WORKING_DIR_MAX {
        return Err(bad(
            "InvalidParameters",
            format!("working directory is longer than {WORKING_DIR_MAX} bytes"),
        ));
    }
    if !working_dir.is_empty() && !working_dir.starts_with('/') {
        return Err(bad(
            "InvalidParameters",
            format!("working directory {working_dir:?} must be an absolute path"),
        ));
    }
    let execution_timeout = req
        .execution_timeout_secs
        .unwrap_or(EXECUTION_TIMEOUT_DEFAULT);
    if !(1..=EXECUTION_TIMEOUT_MAX).contains(&execution_timeout) {
        return Err(bad(
            "InvalidParameters",
            format!(
                "execution timeout {execution_timeout} s is out of range: 1 to {EXECUTION_TIMEOUT_MAX} s"
            ),
        ));
    }
    let delivery_timeout = req
        .delivery_timeout_secs
        .unwrap_or(DELIVERY_TIMEOUT_DEFAULT);
    if !(DELIVERY_TIMEOUT_MIN..=DELIVERY_TIMEOUT_MAX).contains(&delivery_timeout) {
        return Err(bad(
            "InvalidParameters",
            format!(
                "delivery timeout {delivery_timeout} s is out of range: {DELIVERY_TIMEOUT_MIN} to {DELIVERY_TIMEOUT_MAX} s"
            ),
        ));
    }
    let comment = req.comment.clone().unwrap_or_default();
    if comment.chars().count() > COMMENT_MAX {
        return Err(bad(
            "InvalidParameters",
            format!("comment is longer than {COMMENT_MAX} characters"),
        ));
    }
    let max_concurrency = req
        .max_concurrency
        .clone()
        .unwrap_or_else(|| MAX_CONCURRENCY_DEFAULT.into());
    Rate::parse_concurrency(&max_concurrency).map_err(|e| bad("InvalidParameters", e.0))?;
    let max_errors = req
        .max_errors
        .clone()
        .unwrap_or_else(|| MAX_ERRORS_DEFAULT.into());
    Rate::parse_errors(&max_errors).map_err(|e| bad("InvalidParameters", e.0))?;

    let run_as = req.run_as.clone().unwrap_or_default();
    if run_as.len() > 32
        || run_as
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || "._-".contains(c)))
    {
        return Err(bad(
            "InvalidParameters",
            format!("run-as user {run_as:?} is not a valid user name or uid"),
        ));
    }
    if let Some(mb) = req.memory_limit_mb
        && !(MEMORY_LIMIT_MIN_MB..=MEMORY_LIMIT_MAX_MB).contains(&mb)
    {
        return Err(bad(
            "InvalidParameters",
            format!(
                "memory limit {mb} MiB is out of range: {MEMORY_LIMIT_MIN_MB} to {MEMORY_LIMIT_MAX_MB} MiB"
            ),
        ));
    }
    if let Some(pct) = req.cpu_limit_percent
        && !(CPU_LIMIT_MIN_PERCENT..=CPU_LIMIT_MAX_PERCENT).contains(&pct)
    {
        return Err(bad(
            "InvalidParameters",
            format!(
                "cpu limit {pct}% is out of range: {CPU_LIMIT_MIN_PERCENT}% to {CPU_LIMIT_MAX_PERCENT}%"
            ),
        ));
    }

    let targets = req.targets.as_deref().map(str::trim).unwrap_or("");
    let invocations = match (req.node_ids.is_empty(), targets.is_empty()) {
        (true, true) => {
            return Err(bad(
                "MissingTarget",
                "give node ids or a target expression".into(),
            ));
        }
        (false, false) => {
            return Err(bad(
                "InvalidTarget",
                "give node ids or a target expression, not both".into(),
            ));
        }
        (false, true) => resolve_ids(&state, &req.node_ids).await?,
        (true, false) => {
            let expr = TargetExpr::parse(targets).map_err(|e| bad("InvalidTarget", e.0))?;
            let found = state.store.resolve_targets(&expr).await?;
            if found.is_empty() {
                return Err(bad(
                    "InvalidTarget",
                    format!("no node matches the target expression {targets:?}"),
                ));
            }
            found
        }
    };

    let command_id = CommandId::from_random(secrets::random_u128());
    let new = NewCommand {
        command_id: command_id.clone(),
        document_name,
        comment,
        node_ids: req.node_ids,
        targets: targets.to_owned(),
        spec: CommandSpec {
            commands: req.commands,
            working_dir,
            execution_timeout,
            delivery_timeout,
            max_concurrency,
            max_errors,
            run_as,
            memory_limit_mb: req.memory_limit_mb,
            cpu_limit_percent: req.cpu_limit_percent,
            requested_at: now_ms(),
        },
        invocations,
    };
    state.store.insert_command(&new).await?;
    let row = CommandRow {
        command_id: command_id.clone(),
        target_count: new.invocations.len() as u64,
        spec: new.spec,
        status: CommandStatus::Pending,
        error_count: 0,
        cancel_requested: false,
    };
    dispatch::spawn(state.clone(), row);
    // Without invocations: for a fleet-wide command they would be a large answer nobody asked for.
    let cmd = state
        .store
        .get_command(&command_id)
        .await?
        .ok_or_else(|| ApiError::internal("command vanished after insert"))?;
    tracing::info!(%command_id, targets = cmd.target_count, "command accepted");
    Ok((StatusCode::CREATED, Json(cmd)))
}

async fn resolve_ids(state: &AppState, ids: &[NodeId]) -> Result<Vec<(NodeId, String)>, ApiError> {
    let mut seen = HashSet::new();
    if let Some(dup) = ids.iter().find(|id| !seen.insert(*id)) {
        return Err(ApiError::bad_request(
            "DuplicateNodeId",
            format!("node {dup} is given more than once"),
        ));
    }
    let found = state.store.node_names(ids).await?;
    let known: HashSet<&NodeId> = found.iter().map(|(id, _)| id).collect();
    let unknown: Vec<&str> = ids
        .iter()
        .filter(|id| !known.contains(id))
        .map(NodeId::as_str)
        .collect();
    if !unknown.is_empty() {
        return Err(ApiError::bad_request(
            "InvalidNodeId",
            format!("unknown node id(s): {}", unknown.join(", ")),
        ));
    }
    // Keep the order the operator gave.
    let names: std::collections::HashMap<NodeId, String> = found.into_iter().collect();
    Ok(ids
        .iter()
        .map(|id| (id.clone(), names.get(id).cloned().unwrap_or_default()))
        .collect())
}

/// Query of `GET /v1/commands`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<u32>,
}

/// Commands, newest first.
pub async fn list(
    State(state): State<Arc<AppState>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<Command>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("InvalidRequest", e.body_text()))?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request(
            "InvalidParameters",
            format!("limit must be 1 to 1000, got {limit}"),
        ));
    }
    Ok(Json(state.store.list_commands(limit).await?))
}

async fn load(state: &AppState, id: &str) -> Result<Command, ApiError> {
    let id: CommandId = parse_id(id, "InvalidCommandId")?;
    state
        .store
        .get_command(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("CommandNotFound", format!("no command {id}")))
}

/// One command with its invocations.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Command>, ApiError> {
    let mut cmd = load(&state, &id).await?;
    cmd.invocations = state.store.list_invocations(&cmd.command_id).await?;
    Ok(Json(cmd))
}

/// A command's invocations.
pub async fn invocations(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Vec<Invocation>>, ApiError> {
    let cmd = load(&state, &id).await?;
    Ok(Json(state.store.list_invocations(&cmd.command_id).await?))
}

/// Cancels a command's invocations (all, or some nodes'). Answers with the command.
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CancelCommand>,
) -> Result<Json<Command>, ApiError> {
    let cmd = load(&state, &id).await?;
    if !req.node_ids.is_empty() {
        let invs = state.store.list_invocations(&cmd.command_id).await?;
        let known: HashSet<&NodeId> = invs.iter().map(|i| &i.node_id).collect();
        if let Some(n) = req.node_ids.iter().find(|n| !known.contains(n)) {
            return Err(ApiError::bad_request(
                "InvalidNodeId",
                format!("command {} has no invocation on node {n}", cmd.command_id),
            ));
        }
    }
    if !cmd.status.is_terminal() {
        state
            .dispatchers
            .send(&cmd.command_id, DispatchMsg::Cancel(req.node_ids));
    }
    // The dispatcher applies the cancel in order with everything else; answer with what is stored now.
    let cmd = load(&state, &id).await?;
    Ok(Json(cmd))
}

/// Streams the command (without invocations) as NDJSON: now, then after every change, until it ends.
pub async fn watch(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let first = load(&state, &id).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    let mut changes = state.dispatchers.watch(&first.command_id);
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
                // No dispatcher runs (ended between reads, or failed): the stored state is final.
                return;
            }
        }
    });
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}
