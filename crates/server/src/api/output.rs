//! `GET /v1/commands/{id}/invocations/{node}/output/{stdout|stderr}[?follow=true]`: raw output bytes.
//!
//! Without `follow`, the stored bytes. With `follow`, the stored bytes, then live bytes as the node
//! produces them (pushed by the invocation's output actor), until the invocation ends. Either way the
//! body streams: no whole output is ever held in memory. An output that fits in its inline copy is
//! served from the database row (it may have no segment objects). Secure parameter values the
//! command's script references are masked on the way out (crate::run::params::Masker).

use super::{ApiError, parse_id};
use crate::AppState;
use crate::access::authz::{Action, Principal};
use crate::errors::Code;
use crate::run::output::{OutputMsg, pipe_prefix, read_stored};
use crate::run::params::MaskStream;
use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use fleetrun_proto::channel::Pipe;
use fleetrun_proto::{CommandId, NodeId};
use futures_util::StreamExt;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};

/// Query of the output route.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputQuery {
    #[serde(default)]
    follow: bool,
    /// Skip the first `offset` bytes of what this route serves (a follower resuming after a lost
    /// connection asks from the byte it had). Beyond the end: nothing (or, with `follow`, what comes
    /// past it).
    #[serde(default)]
    offset: u64,
}

type Tx = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Streams an invocation's output.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path((cmd, node, pipe)): Path<(String, String, String)>,
    query: Result<Query<OutputQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::new(Code::InvalidRequest, e.body_text()))?;
    let cmd: CommandId = parse_id(&cmd, Code::InvalidCommandId)?;
    let node: NodeId = parse_id(&node, Code::InvalidNodeId)?;
    let pipe = match pipe.as_str() {
        "stdout" => Pipe::Stdout,
        "stderr" => Pipe::Stderr,
        other => {
            return Err(ApiError::new(
                Code::InvalidParameters,
                format!("unknown output {other:?}: use stdout or stderr"),
            ));
        }
    };
    state
        .authz
        .require_node(&state.store, &p, Action::ReadOutput, &node)
        .await?;
    if state.store.get_command(&cmd).await?.is_none() {
        return Err(ApiError::new(
            Code::CommandNotFound,
            format!("no command {cmd}"),
        ));
    }
    if state.store.get_invocation(&cmd, &node).await?.is_none() {
        return Err(ApiError::new(
            Code::InvocationNotFound,
            format!("command {cmd} has no invocation on node {node}"),
        ));
    }
    let masker = crate::run::params::masker_for(&state.store, &state.secret_box, &cmd).await?;
    // Unmasked, served bytes are stored bytes: start there. Masked, a value may change length: mask
    // from the start and skip what was served.
    let (from, skip) = match masker {
        None => (q.offset, 0),
        Some(_) => (0, q.offset),
    };
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let r = if q.follow {
            follow(&state, &cmd, &node, pipe, from, &tx).await
        } else {
            copy_stored(&state, &cmd, &node, pipe, from, &tx)
                .await
                .map(|_| ())
        };
        if let Err(e) = r {
            tracing::warn!(%cmd, %node, "output stream ended early: {e}");
            let _ = tx.send(Err(std::io::Error::other(e))).await;
        }
    });
    let body = match masker {
        None => Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })),
        Some(m) => Body::from_stream(skipped(masked(rx, MaskStream::new(m)), skip)),
    };
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

/// The chunks of `rx` with secure values masked, the held-back tail let out at the end.
fn masked(
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    stream: MaskStream,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(Some((rx, stream)), |st| async move {
        let (mut rx, mut stream) = st?;
        match rx.recv().await {
            Some(Ok(chunk)) => {
                let out = Bytes::from(stream.push(&chunk));
                Some((Ok(out), Some((rx, stream))))
            }
            Some(Err(e)) => Some((Err(e), None)),
            None => Some((Ok(Bytes::from(stream.finish())), None)),
        }
    })
}

/// The bytes of `stream` past its first `skip`.
fn skipped(
    stream: impl futures_util::Stream<Item = Result<Bytes, std::io::Error>>,
    skip: u64,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    let mut left = skip;
    stream.filter_map(move |item| {
        let out = match item {
            Ok(chunk) if left >= chunk.len() as u64 => {
                left -= chunk.len() as u64;
                None
            }
            Ok(chunk) => {
                let at = left as usize;
                left = 0;
                Some(Ok(chunk.slice(at..)))
            }
            Err(e) => Some(Err(e)),
        };
        std::future::ready(out)
    })
}

/// Sends stored bytes from `from` on; returns the offset after the last byte sent.
async fn copy_stored(
    state: &AppState,
    cmd: &CommandId,
    node: &NodeId,
    pipe: Pipe,
    from: u64,
    tx: &Tx,
) -> Result<u64, String> {
    // The whole output fits in the inline copy: the database row holds it (there may be no objects).
    let (stored, inline) = state
        .store
        .output_state(cmd, node)
        .await
        .map_err(|e| e.to_string())?
        .pipe(pipe);
    if stored == inline.len() as u64 {
        if from < stored {
            tx.send(Ok(Bytes::from(inline).slice(from as usize..)))
                .await
                .map_err(|_| "client went away".to_string())?;
        }
        return Ok(stored.max(from));
    }
    let mut pos = from;
    let mut segs = std::pin::pin!(read_stored(
        state.objects.clone(),
        pipe_prefix(cmd, node, pipe),
        from
    ));
    while let Some(seg) = segs.next().await {
        let (off, data) = seg.map_err(|e| e.to_string())?;
        if off > pos {
            return Err(format!("stored output has a gap at byte {pos}"));
        }
        let skip = (pos - off) as usize;
        if skip < data.len() {
            pos += (data.len() - skip) as u64;
            tx.send(Ok(data.slice(skip..)))
                .await
                .map_err(|_| "client went away".to_string())?;
        }
    }
    Ok(pos)
}

/// Stored bytes, then live bytes until the invocation ends.
async fn follow(
    state: &Arc<AppState>,
    cmd: &CommandId,
    node: &NodeId,
    pipe: Pipe,
    from: u64,
    tx: &Tx,
) -> Result<(), String> {
    let key = (cmd.clone(), node.clone());
    let mut pos = from;
    loop {
        let inv = state
            .store
            .get_invocation(cmd, node)
            .await
            .map_err(|e| e.to_string())?;
        if inv.is_none_or(|i| i.status.is_terminal()) {
            copy_stored(state, cmd, node, pipe, pos, tx).await?;
            return Ok(());
        }
        if state.bus.is_some() && !state.outputs.has(&key) {
            // Its output actor is on another replica (the agent's), or not started yet.
            pos = follow_elsewhere(state, cmd, node, pipe, pos, tx).await?;
            continue;
        }
        // Subscribe through the actor, so stored + pending + live covers every byte exactly once.
        let (reply, answer) = oneshot::channel();
        state
            .outputs
            .send(state, &key, OutputMsg::Follow { pipe, reply });
        let Ok(start) = answer.await else { continue };
        let mut live = start.live;
        // Storage holds at least [0, stored); later flushes may have added more, which is fine.
        pos = copy_stored(state, cmd, node, pipe, pos, tx).await?;
        if start.stored > pos {
            return Err(format!(
                "stored output is shorter ({pos}) than recorded ({})",
                start.stored
            ));
        }
        pos = emit(tx, pos, start.stored, start.pending).await?;
        loop {
            match live.recv().await {
                // Live chunks follow `pending` without a gap; a gap would mean lost events: resync.
                Ok(chunk) if chunk.pipe == pipe && chunk.offset > pos => break,
                Ok(chunk) if chunk.pipe == pipe => {
                    pos = emit(tx, pos, chunk.offset, chunk.data).await?
                }
                Ok(_) => {}
                // Fell behind, or the actor stopped (the invocation ended): resync from storage.
                Err(broadcast::error::RecvError::Lagged(_))
                | Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    }
}

/// Longest a follower waits for news of a command before it reads storage again, when live
/// output from another replica cannot be had (not started yet, NATS down, its replica gone).
const CATCH_UP: Duration = Duration::from_secs(2);

/// One round of following output produced on another replica: the stored bytes, then the live
/// chunks its replica publishes, until that stream ends (the invocation's end, a lag, a silence);
/// or, without live output, the stored bytes and a wait for the command to change. Returns the
/// new position.
async fn follow_elsewhere(
    state: &Arc<AppState>,
    cmd: &CommandId,
    node: &NodeId,
    pipe: Pipe,
    from: u64,
    tx: &Tx,
) -> Result<u64, String> {
    let changes = state.dispatchers.watch(cmd);
    let Some((stored, mut live)) = crate::cluster::follow::start(state, cmd, node, pipe).await
    else {
        let pos = copy_stored(state, cmd, node, pipe, from, tx).await?;
        match changes {
            Some(mut rx) => {
                let _ = tokio::time::timeout(CATCH_UP, rx.changed()).await;
            }
            None => tokio::time::sleep(CATCH_UP).await,
        }
        return Ok(pos);
    };
    let mut pos = copy_stored(state, cmd, node, pipe, from, tx).await?;
    if stored > pos {
        return Err(format!(
            "stored output is shorter ({pos}) than recorded ({stored})"
        ));
    }
    while let Some(chunk) = live.next().await {
        if chunk.offset > pos {
            // A gap: read storage again.
            break;
        }
        pos = emit(tx, pos, chunk.offset, chunk.data).await?;
    }
    Ok(pos)
}

/// Sends the part of `data` (at `offset`) past `pos`; returns the new position.
async fn emit(tx: &Tx, pos: u64, offset: u64, data: Bytes) -> Result<u64, String> {
    let end = offset + data.len() as u64;
    if end <= pos || offset > pos {
        // Already sent; a gap is handled by the caller.
        return Ok(pos);
    }
    tx.send(Ok(data.slice((pos - offset) as usize..)))
        .await
        .map_err(|_| "client went away".to_string())?;
    Ok(end)
}
