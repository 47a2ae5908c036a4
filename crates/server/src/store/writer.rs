//! Group commit for the hot write paths (starts, output lengths, results, audit records).
//!
//! Every SQLite statement costs a hand-off to sqlx's worker thread, and a transaction of its own costs
//! three (begin, statement, commit) on the single writer connection. Under a fan-out to many nodes the
//! hot writes arrive together, so one task takes every queued write (up to [`BATCH_MAX`]), runs them
//! in one transaction, and only after the commit answers each caller: a caller still returns only
//! once its own write is durable. When the batch fails, each write is retried in a transaction of its
//! own, so one bad write cannot fail the others.

use super::audit::{self, AuditEntry};
use super::commands::{self, OutputState};
use super::{Finish, Result, StoreError};
use fleetrun_proto::{CommandId, NodeId};
use sqlx::{SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

/// Most writes committed in one transaction.
pub const BATCH_MAX: usize = 512;

/// A write queued for the writer task, with where to send its result.
pub(super) enum WriteOp {
    MarkStarted {
        id: CommandId,
        node: NodeId,
        started_at: i64,
        reply: oneshot::Sender<Result<Option<OutputState>>>,
    },
    UpdateOutput {
        id: CommandId,
        node: NodeId,
        stderr: bool,
        stored: u64,
        inline: Vec<u8>,
        reply: oneshot::Sender<Result<()>>,
    },
    Finish {
        id: CommandId,
        ends: Vec<(NodeId, Finish)>,
        reply: oneshot::Sender<Result<Vec<NodeId>>>,
    },
    Audit {
        entry: AuditEntry,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// What a write returned, held until its transaction commits.
enum Done {
    Started(Option<OutputState>),
    Output,
    Finished(Vec<NodeId>),
    Audited,
}

impl WriteOp {
    async fn exec(&self, conn: &mut SqliteConnection) -> Result<Done> {
        Ok(match self {
            WriteOp::MarkStarted {
                id,
                node,
                started_at,
                ..
            } => Done::Started(commands::mark_started(conn, id, node, *started_at).await?),
            WriteOp::UpdateOutput {
                id,
                node,
                stderr,
                stored,
                inline,
                ..
            } => {
                commands::update_output(conn, id, node, *stderr, *stored, inline).await?;
                Done::Output
            }
            WriteOp::Finish { id, ends, .. } => {
                Done::Finished(commands::finish_invocations(conn, id, ends).await?)
            }
            WriteOp::Audit { entry, .. } => {
                audit::append(conn, entry).await?;
                Done::Audited
            }
        })
    }

    /// Sends the result to the caller (who may have gone away: then nothing happens).
    fn answer(self, r: Result<Done>) {
        fn pick<T>(r: Result<Done>, f: impl FnOnce(Done) -> Option<T>) -> Result<T> {
            r.and_then(|d| f(d).ok_or(StoreError::Missing("write result")))
        }
        match self {
            WriteOp::MarkStarted { reply, .. } => {
                let _ = reply.send(pick(r, |d| match d {
                    Done::Started(s) => Some(s),
                    _ => None,
                }));
            }
            WriteOp::UpdateOutput { reply, .. } => {
                let _ = reply.send(pick(r, |d| matches!(d, Done::Output).then_some(())));
            }
            WriteOp::Finish { reply, .. } => {
                let _ = reply.send(pick(r, |d| match d {
                    Done::Finished(v) => Some(v),
                    _ => None,
                }));
            }
            WriteOp::Audit { reply, .. } => {
                let _ = reply.send(pick(r, |d| matches!(d, Done::Audited).then_some(())));
            }
        }
    }
}

/// Handle to the writer task.
#[derive(Clone)]
pub(super) struct Writer {
    tx: mpsc::UnboundedSender<WriteOp>,
}

impl Writer {
    /// Starts the writer task on `pool` (the single writer connection).
    pub(super) fn spawn(pool: SqlitePool) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(pool, rx));
        Writer { tx }
    }

    /// Queues a write made by `make` (given its reply channel) and waits until it is committed.
    pub(super) async fn write<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T>>) -> WriteOp,
    ) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| StoreError::Missing("database writer task"))?;
        answer
            .await
            .map_err(|_| StoreError::Missing("database writer task"))?
    }
}

async fn run(pool: SqlitePool, mut rx: mpsc::UnboundedReceiver<WriteOp>) {
    let mut batch = Vec::with_capacity(BATCH_MAX);
    while rx.recv_many(&mut batch, BATCH_MAX).await > 0 {
        match commit(&pool, &batch).await {
            Ok(done) => {
                for (op, d) in batch.drain(..).zip(done) {
                    op.answer(Ok(d));
                }
            }
            Err(e) if batch.len() == 1 => {
                if let Some(op) = batch.pop() {
                    op.answer(Err(e));
                }
            }
            Err(e) => {
                tracing::warn!(
                    writes = batch.len(),
                    "batched write failed ({e}); retrying each write on its own"
                );
                for op in batch.drain(..) {
                    let r = commit(&pool, std::slice::from_ref(&op))
                        .await
                        .and_then(|mut d| d.pop().ok_or(StoreError::Missing("write result")));
                    op.answer(r);
                }
            }
        }
    }
}

/// Runs `ops` in one transaction; their results, once it committed.
async fn commit(pool: &SqlitePool, ops: &[WriteOp]) -> Result<Vec<Done>> {
    let mut tx = pool.begin().await?;
    let mut done = Vec::with_capacity(ops.len());
    for op in ops {
        done.push(op.exec(&mut tx).await?);
    }
    tx.commit().await?;
    Ok(done)
}
