//! Group commit for the hot write paths (starts, output lengths, results, audit records).
//!
//! Every SQLite statement costs a hand-off to sqlx's worker thread, and a transaction of its own costs
//! three (begin, statement, commit) on the single writer connection; on PostgreSQL every commit is a
//! round trip and a WAL flush. Under a fan-out to many nodes the
//! hot writes arrive together, so one task takes every queued write (up to [`BATCH_MAX`]), runs them
//! in one transaction, and only after the commit answers each caller: a caller still returns only
//! once its own write is durable. When the batch fails, each write is retried in a transaction of its
//! own, so one bad write cannot fail the others. A fenced write whose fence no longer holds
//! (`leases::hold`) fails before it writes anything, without failing its batch.
//!
//! Audit records come in two kinds. A write's record (and a caller who must see it committed) goes
//! through the hot queue with the other writes. The records of reads and refused requests are only
//! queued ([`Writer::queue`]): they go through a queue of their own, bounded by [`AUDIT_QUEUE_MAX`],
//! that the writer drains after the hot writes of each batch, so a flood of reads cannot delay a
//! write; at least [`AUDIT_PER_BATCH_MIN`] of them ride along with every batch, so they cannot
//! starve either. A batch's audit records are chained in memory and stored with one `INSERT`.
//!
//! On PostgreSQL the task runs its transactions on the store's one pool; other connections (and
//! other servers' writers) write beside it, which the writes allow: each is one conditional
//! statement, a fenced end first locks its command's row (`leases::hold`), and the audit append
//! takes the chain's lock (`audit::append`).

use super::audit::{self, AuditEntry};
use super::commands::{self, OutputState};
use super::leases::{self, Fence};
use super::{Conn, Db, Finish, Result, StoreError};
use fleetrun_proto::{CommandId, NodeId};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};

/// Most writes committed in one transaction.
pub const BATCH_MAX: usize = 512;

/// Most queued (not awaited) audit records held in memory; past it, queueing one waits for room.
pub const AUDIT_QUEUE_MAX: usize = 8192;

/// Queued audit records taken into each batch even when hot writes fill it.
pub const AUDIT_PER_BATCH_MIN: usize = 64;

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
        /// The dispatcher's: checked before the ends are written (`leases::hold`).
        fence: Option<Fence>,
        reply: oneshot::Sender<Result<Vec<NodeId>>>,
    },
    Audit {
        entry: AuditEntry,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Answered once every audit record queued before it is committed.
    Barrier { reply: oneshot::Sender<Result<()>> },
}

/// What a write returned, held until its transaction commits.
enum Done {
    Started(Option<OutputState>),
    Output,
    Finished(Vec<NodeId>),
    Audited,
    /// Its fence no longer holds: it wrote nothing, and the rest of its batch commits.
    Refused(StoreError),
}

impl WriteOp {
    /// Runs the write; an audit record is only added to `audits`, stored at the end of the batch.
    async fn exec<'a>(&'a self, conn: Conn<'_>, audits: &mut Vec<&'a AuditEntry>) -> Result<Done> {
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
            WriteOp::Finish {
                id, ends, fence, ..
            } => {
                let mut conn = conn;
                match leases::hold(conn.reborrow(), id, fence.as_ref()).await {
                    Err(e) if leases::refused(&e) => Done::Refused(e),
                    held => {
                        held?;
                        Done::Finished(commands::finish_invocations(conn, id, ends).await?)
                    }
                }
            }
            WriteOp::Audit { entry, .. } => {
                audits.push(entry);
                Done::Audited
            }
            WriteOp::Barrier { .. } => Done::Audited,
        })
    }

    /// Sends the result to the caller (who may have gone away: then nothing happens).
    fn answer(self, r: Result<Done>) {
        fn pick<T>(r: Result<Done>, f: impl FnOnce(Done) -> Option<T>) -> Result<T> {
            r.and_then(|d| match d {
                Done::Refused(e) => Err(e),
                d => f(d).ok_or(StoreError::Missing("write result")),
            })
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
            WriteOp::Audit { entry, reply } => {
                let r = pick(r, |d| matches!(d, Done::Audited).then_some(()));
                // Nobody waits for a queued record: its loss is logged here.
                if let Err(Err(e)) = reply.send(r) {
                    tracing::error!(
                        action = %entry.action,
                        principal = %entry.principal,
                        "AUDIT RECORD LOST: cannot write it: {e}"
                    );
                }
            }
            WriteOp::Barrier { reply } => {
                let _ = reply.send(pick(r, |d| matches!(d, Done::Audited).then_some(())));
            }
        }
    }
}

/// Handle to the writer task.
#[derive(Clone)]
pub(super) struct Writer {
    tx: mpsc::UnboundedSender<WriteOp>,
    /// Audit records nobody waits for (reads, refused requests), and barriers.
    audit: mpsc::Sender<WriteOp>,
    /// Transactions committed (batches and retries), for tests of the grouping.
    #[cfg_attr(not(test), allow(dead_code))]
    commits: Arc<AtomicU64>,
}

impl Writer {
    /// Starts the writer task on `db` (SQLite's single writer connection, or PostgreSQL's pool).
    pub(super) fn spawn(db: Db) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (audit, audit_rx) = mpsc::channel(AUDIT_QUEUE_MAX);
        let commits = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(db, rx, audit_rx, commits.clone()));
        Writer { tx, audit, commits }
    }

    /// Transactions committed so far.
    #[cfg(test)]
    fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Queues an audit record without waiting for its commit (only for room in the queue, when
    /// [`AUDIT_QUEUE_MAX`] records are already waiting). Its result, an error included, is logged.
    pub(super) async fn queue(&self, entry: AuditEntry) -> Result<()> {
        let (reply, _) = oneshot::channel();
        let op = WriteOp::Audit { entry, reply };
        let op = match self.audit.try_send(op) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(op)) => Some(op),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(StoreError::Missing("database writer task"));
            }
        };
        if let Some(op) = op {
            self.audit
                .send(op)
                .await
                .map_err(|_| StoreError::Missing("database writer task"))?;
        }
        Ok(())
    }

    /// Returns once every audit record queued before the call is committed.
    pub(super) async fn flush_audit(&self) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.audit
            .send(WriteOp::Barrier { reply })
            .await
            .map_err(|_| StoreError::Missing("database writer task"))?;
        answer
            .await
            .map_err(|_| StoreError::Missing("database writer task"))?
    }

    /// Returns once every write and audit record queued before the call is committed.
    pub(super) async fn flush(&self) -> Result<()> {
        // A barrier in the hot queue is answered with its batch, after the writes queued before it.
        self.write(|reply| WriteOp::Barrier { reply }).await?;
        self.flush_audit().await
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

async fn run(
    db: Db,
    mut rx: mpsc::UnboundedReceiver<WriteOp>,
    mut audit: mpsc::Receiver<WriteOp>,
    commits: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(BATCH_MAX + AUDIT_PER_BATCH_MIN);
    loop {
        // Hot writes first; queued audit records fill what room is left (at least their minimum).
        let first = tokio::select! {
            biased;
            op = rx.recv() => op,
            op = audit.recv() => op,
        };
        let Some(first) = first else { break };
        batch.push(first);
        while batch.len() < BATCH_MAX
            && let Ok(op) = rx.try_recv()
        {
            batch.push(op);
        }
        let room = BATCH_MAX
            .saturating_sub(batch.len())
            .max(AUDIT_PER_BATCH_MIN);
        for _ in 0..room {
            match audit.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        match commit(&db, &batch, &commits).await {
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
                    let r = commit(&db, std::slice::from_ref(&op), &commits)
                        .await
                        .and_then(|mut d| d.pop().ok_or(StoreError::Missing("write result")));
                    op.answer(r);
                }
            }
        }
    }
}

/// Runs `ops` in one transaction; their results, once it committed.
///
/// On SQLite the transaction takes the write lock at `BEGIN` (`IMMEDIATE`): a deferred one that read
/// first and then found the lock held (by some other process) would fail at once, without the busy
/// timeout.
async fn commit(db: &Db, ops: &[WriteOp], commits: &AtomicU64) -> Result<Vec<Done>> {
    let done = match db {
        Db::Sqlite(p) => {
            let mut tx = p.write.begin_with("BEGIN IMMEDIATE").await?;
            let done = exec_all(Conn::from(&mut *tx), ops).await?;
            tx.commit().await?;
            done
        }
        Db::Postgres(pool) => {
            let mut tx = pool.begin().await?;
            let done = exec_all(Conn::from(&mut *tx), ops).await?;
            tx.commit().await?;
            done
        }
    };
    commits.fetch_add(1, Ordering::Relaxed);
    Ok(done)
}

/// Runs `ops` on `conn` (in a transaction), their audit records stored last with one append.
async fn exec_all(mut conn: Conn<'_>, ops: &[WriteOp]) -> Result<Vec<Done>> {
    let mut done = Vec::with_capacity(ops.len());
    let mut audits = Vec::new();
    for op in ops {
        done.push(op.exec(conn.reborrow(), &mut audits).await?);
    }
    audit::append(conn, &audits).await?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::super::Store;
    use super::super::commands::tests::command_on;
    use super::*;
    use fleetrun_proto::InvocationStatus;
    use fleetrun_proto::status::details;

    /// Writes queued together are committed in one transaction, and each caller gets its own
    /// answer: output lengths, a finish with the nodes it ended, a starts' stored state, an audit.
    #[tokio::test]
    async fn queued_writes_commit_together_and_each_caller_is_answered() {
        let (_dir, stores) = crate::testing::stores().await;
        for (kind, store) in stores {
            commit_together(kind, &store).await;
        }
    }

    async fn commit_together(kind: &str, store: &Store) {
        let (id, n) = command_on(store, 8).await;
        let before = store.writer.commits();

        // On this single-threaded runtime every write below is queued before the writer task runs.
        let out = |i: usize| {
            let line = format!("out {i}");
            let (id, node) = (&id, &n[i]);
            async move {
                store
                    .update_output(id, node, false, line.len() as u64, line.as_bytes())
                    .await
            }
        };
        let finish = Finish::without_running(InvocationStatus::Failed, details::FAILED, 5, "x");
        let ends = [(n[4].clone(), finish.clone()), (n[5].clone(), finish)];
        let audit = AuditEntry {
            at: 5,
            principal: "tester".into(),
            action: "test".into(),
            ..AuditEntry::default()
        };
        let (o0, o1, o2, o3, finished, started, audited) = tokio::join!(
            out(0),
            out(1),
            out(2),
            out(3),
            store.finish_invocations(&id, &ends, None),
            store.mark_started(&id, &n[6], 7),
            store.append_audit(audit),
        );
        let outputs = [o0, o1, o2, o3];
        assert!(outputs.iter().all(|r| r.is_ok()), "{kind}: {outputs:?}");
        assert_eq!(
            finished.unwrap(),
            vec![n[4].clone(), n[5].clone()],
            "{kind}"
        );
        assert_eq!(started.unwrap().map(|s| s.stdout.0), Some(0), "{kind}");
        audited.unwrap();
        assert_eq!(
            store.writer.commits() - before,
            1,
            "{kind}: one transaction for all of them"
        );

        for (i, node) in n[..4].iter().enumerate() {
            let s = store.output_state(&id, node).await.unwrap();
            assert_eq!(s.stdout.1, format!("out {i}").into_bytes(), "{kind}");
        }
        let cmd = store.get_command(&id).await.unwrap().unwrap();
        assert_eq!((cmd.completed_count, cmd.error_count), (2, 2), "{kind}");
        assert_eq!(store.verify_audit(None).await.unwrap().records, 1, "{kind}");
    }

    /// A fenced end whose fence no longer holds, queued with other writes: it alone is refused
    /// (Fenced, nothing written), and the batch still commits in one transaction, unretried.
    #[tokio::test]
    async fn a_refused_fenced_write_does_not_fail_its_batch() {
        let (_dir, stores) = crate::testing::stores().await;
        for (kind, store) in stores {
            let (id, n) = command_on(&store, 3).await;
            // Unowned: the first claim takes it at epoch 1.
            let taken = store.claim_commands("b", 600_000, 10).await.unwrap();
            assert_eq!(taken, vec![(id.clone(), 1)], "{kind}");
            let (stale, held) = (
                Fence {
                    owner: "a".into(),
                    epoch: 1,
                },
                Fence {
                    owner: "b".into(),
                    epoch: 1,
                },
            );
            let before = store.writer.commits();
            let end = |i: usize| {
                vec![(
                    n[i].clone(),
                    Finish::without_running(InvocationStatus::Failed, details::FAILED, 5, "x"),
                )]
            };
            let (e0, e1, e2) = (end(0), end(1), end(2));
            let (refused, agent, owner) = tokio::join!(
                store.finish_invocations(&id, &e0, Some(&stale)),
                store.finish_invocations(&id, &e1, None),
                store.finish_invocations(&id, &e2, Some(&held)),
            );
            assert!(
                matches!(refused, Err(StoreError::Fenced { ref held_by, epoch: 1, .. }) if held_by == "b"),
                "{kind}: {refused:?}"
            );
            assert_eq!(agent.unwrap(), vec![n[1].clone()], "{kind}");
            assert_eq!(owner.unwrap(), vec![n[2].clone()], "{kind}");
            assert_eq!(
                store.writer.commits() - before,
                1,
                "{kind}: one transaction"
            );
            let statuses: Vec<_> = store
                .invocation_rows(&id)
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.status)
                .collect();
            use InvocationStatus::{Failed, Pending};
            assert_eq!(statuses, [Pending, Failed, Failed], "{kind}");
        }
    }
}
