//! Invocation output: one actor per running invocation stores its streams as objects, acknowledges
//! what is stored, and fans live bytes out to followers.
//!
//! Output of a pipe is kept as segment objects `output/{command}/{node}/{pipe}/{offset:020}` of at most
//! [`SEGMENT_BYTES`] (plus the inline copy's size); reading concatenates them in offset order. While a
//! pipe's whole output fits in its inline copy in the database, no object is written: readers serve
//! the inline copy when the stored length equals its length. The actor buffers at most one segment
//! per pipe, flushes when it is full, [`FLUSH_AFTER`] after its first unflushed byte, or when the
//! invocation ends, and only then sends `Ack` — so the agent's window bounds memory on both sides and
//! nothing acknowledged is lost.

use crate::AppState;
use crate::fleet::hub::Hub;
use crate::run::invocations::Ender;
use bytes::{Bytes, BytesMut};
use fleetrun_proto::channel::{ExecResult, Outcome, Pipe, ServerFrame, StreamId};
use fleetrun_proto::limits::{INLINE_STDERR_MAX, INLINE_STDOUT_MAX};
use fleetrun_proto::status::details;
use fleetrun_proto::time::now_ms;
use fleetrun_proto::{CommandId, InvocationStatus, NodeId};
use fleetrun_store::{Finish, OutputState, Store};
use futures_util::{Stream, StreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

/// Largest output segment object.
pub const SEGMENT_BYTES: usize = 1024 * 1024;
/// Longest time a received byte waits before it is stored (and acknowledged).
pub const FLUSH_AFTER: Duration = Duration::from_millis(50);
/// Live chunks a follower may fall behind before it re-syncs from storage.
const FOLLOW_BACKLOG: usize = 1024;

/// Key of an invocation.
pub type InvocationKey = (CommandId, NodeId);

/// A message to an invocation's output actor.
pub enum OutputMsg {
    /// Bytes of a pipe from the agent.
    Data {
        /// Which pipe.
        pipe: Pipe,
        /// Where in the pipe the bytes start.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// The invocation ended on the node (sent after all its bytes).
    Finished(ExecResult),
    /// A follower wants the live stream of a pipe.
    Follow {
        /// Which pipe.
        pipe: Pipe,
        /// Where the stored bytes and the live stream go.
        reply: oneshot::Sender<FollowStart>,
    },
    /// The invocation was ended by the server (timeout, cancel, lost): flush and stop.
    Close {
        /// Dropped (never sent on) once the actor has left the registry, for a caller who waits.
        done: Option<oneshot::Sender<()>>,
    },
    /// What storage held for the invocation when its start was recorded, read after this actor
    /// began (so no write of ours can be missing from it): spares the actor reading it itself.
    Primed(OutputState),
}

/// Live bytes of a pipe.
#[derive(Clone, Debug)]
pub struct Chunk {
    /// Which pipe.
    pub pipe: Pipe,
    /// Offset of `data[0]`.
    pub offset: u64,
    /// The bytes.
    pub data: Bytes,
}

/// What a follower gets when it subscribes: storage holds `[0, stored)`, `pending` holds the bytes
/// after it that are not stored yet, and `live` carries every later byte.
pub struct FollowStart {
    /// Stored length.
    pub stored: u64,
    /// Received, not yet stored.
    pub pending: Bytes,
    /// Later bytes (of both pipes).
    pub live: broadcast::Receiver<Chunk>,
}

/// The registry of output actors.
#[derive(Default)]
pub struct Outputs {
    actors: Mutex<HashMap<InvocationKey, mpsc::UnboundedSender<OutputMsg>>>,
}

impl Outputs {
    /// Sends a message to the invocation's actor, starting one if none runs.
    pub fn send(&self, state: &Arc<AppState>, key: &InvocationKey, msg: OutputMsg) {
        let mut msg = msg;
        for _ in 0..2 {
            let tx = {
                let mut actors = self.actors.lock();
                actors
                    .entry(key.clone())
                    .or_insert_with(|| {
                        let (tx, rx) = mpsc::unbounded_channel();
                        state
                            .tasks
                            .spawn(run_actor(state.clone(), key.clone(), rx, tx.clone()));
                        tx
                    })
                    .clone()
            };
            match tx.send(msg) {
                Ok(()) => return,
                Err(mpsc::error::SendError(m)) => {
                    // The actor ended between lookup and send: forget it and start a fresh one.
                    msg = m;
                    self.remove(key, &tx);
                }
            }
        }
    }

    /// Makes sure an actor runs for the invocation: its channel, and whether this call started it.
    pub fn ensure(
        &self,
        state: &Arc<AppState>,
        key: &InvocationKey,
    ) -> (mpsc::UnboundedSender<OutputMsg>, bool) {
        let mut actors = self.actors.lock();
        if let Some(tx) = actors.get(key) {
            return (tx.clone(), false);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        state
            .tasks
            .spawn(run_actor(state.clone(), key.clone(), rx, tx.clone()));
        actors.insert(key.clone(), tx.clone());
        (tx, true)
    }

    /// Whether an actor runs for the invocation.
    pub fn has(&self, key: &InvocationKey) -> bool {
        self.actors.lock().contains_key(key)
    }

    /// Actors running now.
    pub fn live(&self) -> usize {
        self.actors.lock().len()
    }

    /// Stops the invocation's actor if one runs (the invocation ended elsewhere) and returns once
    /// it has flushed what it held and left the registry.
    pub async fn close(&self, key: &InvocationKey) {
        let (done, stopped) = oneshot::channel();
        let sent = self
            .actors
            .lock()
            .get(key)
            .is_some_and(|tx| tx.send(OutputMsg::Close { done: Some(done) }).is_ok());
        if sent {
            // Never answered: the sender is dropped when the actor has gone (or dropped the message
            // because it was already going).
            let _ = stopped.await;
        }
    }

    fn remove(&self, key: &InvocationKey, tx: &mpsc::UnboundedSender<OutputMsg>) {
        let mut actors = self.actors.lock();
        if actors.get(key).is_some_and(|t| t.same_channel(tx)) {
            actors.remove(key);
        }
    }
}

/// The object path under which all of a command's output lives.
pub fn command_prefix(cmd: &CommandId) -> ObjectPath {
    ObjectPath::from(format!("output/{cmd}"))
}

/// The object path of a pipe's segments.
pub fn pipe_prefix(cmd: &CommandId, node: &NodeId, pipe: Pipe) -> ObjectPath {
    ObjectPath::from(format!("output/{cmd}/{node}/{}", pipe.as_str()))
}

struct PipeState {
    pipe: Pipe,
    /// Bytes stored (recorded in the database).
    stored: u64,
    /// Bytes `[0, in_objects)` are in segment objects. Below `stored` only while the whole stored
    /// output fits in `inline` (then `inline` holds it all; readers serve it from there).
    in_objects: u64,
    buf: BytesMut,
    first_unflushed: Option<Instant>,
    inline: Vec<u8>,
}

impl PipeState {
    fn pair(s: OutputState) -> Vec<Self> {
        vec![
            Self::new(Pipe::Stdout, s.stdout),
            Self::new(Pipe::Stderr, s.stderr),
        ]
    }
    fn new(pipe: Pipe, (stored, inline): (u64, Vec<u8>)) -> Self {
        // A whole output that fits inline may have no objects (or some of it): rewrite from 0 if it
        // outgrows the inline copy (objects of the same offsets hold the same bytes).
        let in_objects = if stored as usize <= inline_max(pipe) {
            0
        } else {
            stored
        };
        PipeState {
            pipe,
            stored,
            in_objects,
            buf: BytesMut::new(),
            first_unflushed: None,
            inline,
        }
    }
    fn received(&self) -> u64 {
        self.stored + self.buf.len() as u64
    }
    fn inline_max(&self) -> usize {
        inline_max(self.pipe)
    }
}

/// Bytes of a pipe kept inline in the database.
pub fn inline_max(pipe: Pipe) -> usize {
    match pipe {
        Pipe::Stdout => INLINE_STDOUT_MAX,
        Pipe::Stderr => INLINE_STDERR_MAX,
    }
}

async fn run_actor(
    state: Arc<AppState>,
    key: InvocationKey,
    mut rx: mpsc::UnboundedReceiver<OutputMsg>,
    me: mpsc::UnboundedSender<OutputMsg>,
) {
    let (cmd, node) = key.clone();
    // Loaded from storage on the first message, unless a `Primed` comes first.
    let mut pipes: Vec<PipeState> = Vec::new();
    // Made when the first follower comes: most invocations have none, and the channel preallocates
    // its whole backlog.
    let mut live: Option<broadcast::Sender<Chunk>> = None;
    // Set when the node has no such invocation (never delivered to it, or purged since): a node may
    // only write its own invocations' output, so nothing is stored, but everything is acknowledged
    // so the agent's spool drains.
    let mut foreign = false;
    // Who closed the actor, told (by the drop) once it has left the registry.
    let mut closed: Option<oneshot::Sender<()>> = None;
    let sink = Sink {
        store: &state.store,
        objects: state.objects.as_ref(),
        hub: &state.hub,
    };
    loop {
        let deadline = pipes
            .iter()
            .filter_map(|p| p.first_unflushed)
            .min()
            .map(|t| t + FLUSH_AFTER);
        let msg = tokio::select! {
            msg = rx.recv() => msg,
            _ = state.shutdown.cancelled() => {
                // Store what is buffered while the store is still open; the agent resends the rest.
                for p in pipes.iter_mut() {
                    flush(sink, &cmd, &node, p).await;
                }
                break;
            }
            _ = sleep_until_opt(deadline) => {
                for p in pipes.iter_mut() {
                    if p.first_unflushed.is_some_and(|t| t + FLUSH_AFTER <= Instant::now()) {
                        flush(sink, &cmd, &node, p).await;
                    }
                }
                continue;
            }
        };
        let Some(msg) = msg else { break };
        if pipes.is_empty() {
            let loaded = match msg {
                OutputMsg::Primed(s) => {
                    pipes = PipeState::pair(s);
                    continue;
                }
                _ => match state.store.invocation_output_state(&cmd, &node).await {
                    Ok(Some(s)) => s,
                    Ok(None) => {
                        tracing::warn!(%cmd, %node, "node sent output or a result for a command it has no invocation of; not stored");
                        foreign = true;
                        OutputState::default()
                    }
                    Err(e) => {
                        tracing::error!(%cmd, %node, "cannot load output state: {e}");
                        break;
                    }
                },
            };
            pipes = PipeState::pair(loaded);
        }
        match msg {
            // Storage was read already (a resent Started of a running invocation).
            OutputMsg::Primed(_) => {}
            OutputMsg::Data { pipe, offset, data } if foreign => {
                ack(&state.hub, &cmd, &node, pipe, offset + data.len() as u64);
            }
            OutputMsg::Finished(_) if foreign => {
                state.hub.send(
                    &node,
                    ServerFrame::ResultAck {
                        command_id: cmd.clone(),
                    },
                );
                break;
            }
            OutputMsg::Data { pipe, offset, data } => {
                let p = pipe_mut(&mut pipes, pipe);
                let end = offset + data.len() as u64;
                let received = p.received();
                if offset > received {
                    // The agent sends from its acknowledged offset, which is never past what we hold.
                    tracing::warn!(%cmd, %node, offset, received, "output gap from agent; dropping frame");
                    continue;
                }
                if end <= received {
                    // A resend of bytes we have: re-acknowledge what is stored so the agent moves on.
                    if end <= p.stored {
                        ack(&state.hub, &cmd, &node, p.pipe, p.stored);
                    }
                    continue;
                }
                let fresh = data.slice((received - offset) as usize..);
                if let Some(live) = &live {
                    let _ = live.send(Chunk {
                        pipe,
                        offset: received,
                        data: fresh.clone(),
                    });
                }
                p.buf.extend_from_slice(&fresh);
                p.first_unflushed.get_or_insert_with(Instant::now);
                if p.buf.len() >= SEGMENT_BYTES {
                    flush(sink, &cmd, &node, p).await;
                }
            }
            OutputMsg::Follow { pipe, reply } => {
                let p = pipe_mut(&mut pipes, pipe);
                let _ = reply.send(FollowStart {
                    stored: p.stored,
                    pending: Bytes::copy_from_slice(&p.buf),
                    live: live
                        .get_or_insert_with(|| broadcast::channel(FOLLOW_BACKLOG).0)
                        .subscribe(),
                });
            }
            OutputMsg::Finished(result) => {
                for p in pipes.iter_mut() {
                    flush(sink, &cmd, &node, p).await;
                }
                let mut finish = finish_from_result(&result);
                // A saved script's output file is shipped before the result is stored.
                crate::scripts::runner::on_result(&state, &cmd, &node, &mut finish).await;
                match Ender::of(&state).end_from_actor(&cmd, &node, finish).await {
                    Ok(_) => {
                        state.hub.send(
                            &node,
                            ServerFrame::ResultAck {
                                command_id: cmd.clone(),
                            },
                        );
                    }
                    Err(e) => tracing::error!(%cmd, %node, "cannot store result: {e}"),
                }
                break;
            }
            OutputMsg::Close { done } => {
                for p in pipes.iter_mut() {
                    flush(sink, &cmd, &node, p).await;
                }
                closed = done;
                break;
            }
        }
    }
    state.outputs.remove(&key, &me);
    // The closer waits for this: the actor is out of the registry now.
    drop(closed);
}

/// What storing a pipe's bytes touches.
#[derive(Clone, Copy)]
struct Sink<'a> {
    store: &'a Store,
    objects: &'a dyn ObjectStore,
    hub: &'a Hub,
}

fn pipe_mut(pipes: &mut [PipeState], pipe: Pipe) -> &mut PipeState {
    let i = usize::from(pipe == Pipe::Stderr);
    &mut pipes[i]
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Stores the buffered bytes of a pipe, records the stored length, then acknowledges. While the
/// whole output fits in the inline copy, the database row holds it all and no object is written; once
/// it outgrows it, one segment object holds everything not yet in objects.
async fn flush(sink: Sink<'_>, cmd: &CommandId, node: &NodeId, p: &mut PipeState) {
    if p.buf.is_empty() {
        p.first_unflushed = None;
        return;
    }
    let data = p.buf.split().freeze();
    let stored = p.stored + data.len() as u64;
    let inline_only = stored <= p.inline_max() as u64;
    let restore = |p: &mut PipeState, data: &Bytes| {
        // Keep the bytes; the next flush retries. The agent keeps them too until acknowledged.
        let mut back = BytesMut::from(&data[..]);
        back.extend_from_slice(&p.buf);
        p.buf = back;
    };
    if !inline_only {
        let seg = if p.in_objects < p.stored {
            // Only while everything stored fits inline, so `inline` holds `[in_objects, stored)`.
            let mut seg = BytesMut::with_capacity((stored - p.in_objects) as usize);
            seg.extend_from_slice(&p.inline[p.in_objects as usize..p.stored as usize]);
            seg.extend_from_slice(&data);
            seg.freeze()
        } else {
            data.clone()
        };
        let path = pipe_prefix(cmd, node, p.pipe).join(format!("{:020}", p.in_objects).as_str());
        if let Err(e) = sink.objects.put(&path, PutPayload::from(seg)).await {
            tracing::error!(%cmd, %node, "cannot store output segment {path}: {e}");
            restore(p, &data);
            return;
        }
    }
    let inline_len = p.inline.len();
    let room = p.inline_max().saturating_sub(inline_len);
    p.inline.extend_from_slice(&data[..room.min(data.len())]);
    if let Err(e) = sink
        .store
        .update_output(cmd, node, p.pipe == Pipe::Stderr, stored, &p.inline)
        .await
    {
        tracing::error!(%cmd, %node, "cannot record output length: {e}");
        p.inline.truncate(inline_len);
        restore(p, &data);
        return;
    }
    p.stored = stored;
    if !inline_only {
        p.in_objects = stored;
    }
    p.first_unflushed = None;
    ack(sink.hub, cmd, node, p.pipe, p.stored);
}

fn ack(hub: &Hub, cmd: &CommandId, node: &NodeId, pipe: Pipe, offset: u64) {
    let stream = StreamId::Output {
        command_id: cmd.clone(),
        pipe,
    };
    hub.send(node, ServerFrame::Ack { stream, offset });
}

/// How the agent's result maps to SSM's statuses.
pub fn finish_from_result(r: &ExecResult) -> Finish {
    let (status, details) = match r.outcome {
        Outcome::Exited if r.exit_code == 0 => (InvocationStatus::Success, details::SUCCESS),
        Outcome::Exited => (InvocationStatus::Failed, details::FAILED),
        Outcome::TimedOut => (InvocationStatus::TimedOut, details::EXECUTION_TIMED_OUT),
        Outcome::Cancelled => (InvocationStatus::Cancelled, details::CANCELLED),
        Outcome::NotStarted => (InvocationStatus::Failed, details::UNDELIVERABLE),
        Outcome::MemoryLimitExceeded => (InvocationStatus::Failed, details::MEMORY_LIMIT_EXCEEDED),
        Outcome::AgentRestarted => (InvocationStatus::Failed, details::TERMINATED),
    };
    let ran = r.outcome != Outcome::NotStarted;
    Finish {
        status,
        details,
        exit_code: r.exit_code,
        signal: r.signal,
        started_at: ran.then_some(r.started_at_ms),
        finished_at: if r.finished_at_ms > 0 {
            r.finished_at_ms
        } else {
            now_ms()
        },
        cpu_user_ms: ran.then_some(r.cpu_user_ms),
        cpu_system_ms: ran.then_some(r.cpu_system_ms),
        max_rss_kb: ran.then_some(r.max_rss_kb),
        message: r.message.clone(),
        limits_applied: r.limits_applied.clone(),
    }
}

/// The stored bytes of a pipe from `from`, segment by segment, without holding more than one segment.
pub fn read_stored(
    objects: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    from: u64,
) -> impl Stream<Item = Result<(u64, Bytes), object_store::Error>> {
    // First list the segments (names only), then fetch them one at a time.
    let listing = async move {
        let metas: Vec<_> = objects.list(Some(&prefix)).collect().await;
        let mut segs = Vec::with_capacity(metas.len());
        for m in metas {
            let m = m?;
            let Some(off) = m.location.filename().and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            if off + m.size > from {
                segs.push((off, m.location));
            }
        }
        segs.sort_by_key(|(off, _)| *off);
        Ok::<_, object_store::Error>((objects, segs))
    };
    futures_util::stream::once(listing).flat_map(move |listed| match listed {
        Err(e) => futures_util::stream::iter(vec![Err(e)]).boxed(),
        Ok((objects, segs)) => futures_util::stream::iter(segs)
            .then(move |(off, loc)| {
                let objects = objects.clone();
                async move {
                    let bytes = objects.get(&loc).await?.bytes().await?;
                    let skip = from.saturating_sub(off).min(bytes.len() as u64) as usize;
                    Ok((off + skip as u64, bytes.slice(skip..)))
                }
            })
            .boxed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(outcome: Outcome, exit_code: i32) -> ExecResult {
        ExecResult {
            outcome,
            exit_code,
            signal: None,
            started_at_ms: 10,
            finished_at_ms: 20,
            cpu_user_ms: 1,
            cpu_system_ms: 2,
            max_rss_kb: 3,
            stdout_bytes: 0,
            stderr_bytes: 0,
            message: String::new(),
            limits_applied: String::new(),
        }
    }

    /// Every outcome an agent reports maps to SSM's status and details; only a run that started
    /// carries its start and resource use.
    #[test]
    fn results_map_to_ssm_statuses() {
        use InvocationStatus::{Cancelled, Failed, Success, TimedOut};
        #[rustfmt::skip]
        let table = [
            (Outcome::Exited, 0, Success, details::SUCCESS, true),
            (Outcome::Exited, 2, Failed, details::FAILED, true),
            (Outcome::TimedOut, -1, TimedOut, details::EXECUTION_TIMED_OUT, true),
            (Outcome::Cancelled, -1, Cancelled, details::CANCELLED, true),
            (Outcome::NotStarted, -1, Failed, details::UNDELIVERABLE, false),
            (Outcome::MemoryLimitExceeded, 137, Failed, details::MEMORY_LIMIT_EXCEEDED, true),
            (Outcome::AgentRestarted, -1, Failed, details::TERMINATED, true),
        ];
        for (outcome, code, status, why, ran) in table {
            let f = finish_from_result(&result(outcome, code));
            assert_eq!(
                (f.status, f.details, f.exit_code),
                (status, why, code),
                "{outcome:?}"
            );
            assert_eq!(f.started_at.is_some(), ran, "{outcome:?}");
            assert_eq!(f.cpu_user_ms.is_some(), ran, "{outcome:?}");
            assert_eq!(f.finished_at, 20);
        }
        // A result without a finish time is stamped with the server's.
        let mut r = result(Outcome::Exited, 0);
        r.finished_at_ms = 0;
        assert!(finish_from_result(&r).finished_at > 20);
    }
}
