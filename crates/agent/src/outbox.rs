//! Everything the agent holds for the server: the invocations it knows (queued, running, or
//! finished with a result not yet acknowledged), their output streams (spooled to disk, see
//! [`crate::stream`]), and which `Started`, `Output` and `Finished` frames are due on the current
//! connection.
//!
//! It is pull-based: producers (pumps, invocation tasks) only update state and wake the
//! connection's writer, which asks [`Outbox::next_batch`] for frames. On a new connection
//! [`Outbox::rewind`] makes everything unacknowledged due again, so nothing is lost across
//! reconnects; the server drops what it already has.

use crate::exec::kill_process_group;
use crate::stream::{OutputStream, Spool};
use fleetrun_proto::CommandId;
use fleetrun_proto::channel::{AgentFrame, ExecResult, Pipe, StreamId};
use fleetrun_proto::limits::OUTPUT_FRAME_MAX;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{Notify, oneshot};
use tokio::task::AbortHandle;

/// The invocations the agent holds. Lock order: the outbox, then a stream, then the spool.
#[derive(Debug)]
pub struct Outbox {
    inner: Mutex<BTreeMap<CommandId, Entry>>,
    /// Wakes the writer: something may be due (one waiter; `notify_one` keeps a permit).
    ready: Arc<Notify>,
    /// The bound shared by every stream.
    spool: Arc<Spool>,
}

/// What a new invocation's runner gets from [`Outbox::insert`].
#[derive(Debug)]
pub struct NewInvocation {
    /// Its stdout stream.
    pub stdout: Arc<OutputStream>,
    /// Its stderr stream.
    pub stderr: Arc<OutputStream>,
    /// Resolves when the server cancels it.
    pub cancel: oneshot::Receiver<()>,
}

#[derive(Debug)]
struct Entry {
    stdout: Arc<OutputStream>,
    stderr: Arc<OutputStream>,
    started_at_ms: Option<i64>,
    /// `Started` went out on the current connection / on any connection.
    started_sent: bool,
    started_ever_sent: bool,
    /// The process group while the main process is not reaped (to kill it if the agent stops).
    pgid: Option<i32>,
    result: Option<ExecResult>,
    finished_sent: bool,
    cancel: Option<oneshot::Sender<()>>,
    task: Option<AbortHandle>,
    run_dir: PathBuf,
}

impl Outbox {
    /// An empty outbox whose streams share `spool`.
    pub fn new(spool: Arc<Spool>) -> Self {
        Outbox {
            inner: Mutex::default(),
            ready: Arc::default(),
            spool,
        }
    }

    /// The spool shared by the streams.
    pub fn spool(&self) -> &Arc<Spool> {
        &self.spool
    }

    /// Notified whenever a frame may have become due.
    pub fn ready(&self) -> &Notify {
        &self.ready
    }

    /// Registers a new invocation; `None` if the id is already held (a command never runs twice).
    pub fn insert(&self, command_id: &CommandId, run_dir: PathBuf) -> Option<NewInvocation> {
        let mut inner = self.inner.lock();
        if inner.contains_key(command_id) {
            return None;
        }
        let stream = |pipe| {
            let id = StreamId::Output {
                command_id: command_id.clone(),
                pipe,
            };
            Arc::new(OutputStream::create(
                id,
                run_dir.clone(),
                Arc::clone(&self.spool),
                Arc::clone(&self.ready),
            ))
        };
        let (cancel_tx, cancel_rx) = oneshot::channel();
        let entry = Entry {
            stdout: stream(Pipe::Stdout),
            stderr: stream(Pipe::Stderr),
            started_at_ms: None,
            started_sent: false,
            started_ever_sent: false,
            pgid: None,
            result: None,
            finished_sent: false,
            cancel: Some(cancel_tx),
            task: None,
            run_dir,
        };
        let new = NewInvocation {
            stdout: Arc::clone(&entry.stdout),
            stderr: Arc::clone(&entry.stderr),
            cancel: cancel_rx,
        };
        inner.insert(command_id.clone(), entry);
        Some(new)
    }

    /// The output streams an earlier agent process left in `run_dir`.
    pub fn recover_streams(
        &self,
        command_id: &CommandId,
        run_dir: &Path,
    ) -> std::io::Result<[Arc<OutputStream>; 2]> {
        let stream = |pipe| {
            let id = StreamId::Output {
                command_id: command_id.clone(),
                pipe,
            };
            OutputStream::recover(
                id,
                run_dir.to_owned(),
                Arc::clone(&self.spool),
                Arc::clone(&self.ready),
            )
            .map(Arc::new)
        };
        Ok([stream(Pipe::Stdout)?, stream(Pipe::Stderr)?])
    }

    /// Holds an invocation an earlier agent process left with a result: its remaining output
    /// and its result are due on every connection until acknowledged. No `Started` is sent.
    pub fn insert_finished(
        &self,
        command_id: &CommandId,
        run_dir: PathBuf,
        [stdout, stderr]: [Arc<OutputStream>; 2],
        result: ExecResult,
    ) {
        let entry = Entry {
            stdout,
            stderr,
            started_at_ms: None,
            started_sent: false,
            started_ever_sent: false,
            pgid: None,
            result: Some(result),
            finished_sent: false,
            cancel: None,
            task: None,
            run_dir,
        };
        self.inner.lock().insert(command_id.clone(), entry);
        self.ready.notify_one();
    }

    /// A duplicate `Run` for a held invocation: if it has a result, make sure it goes out again
    /// (the server may have missed it); anything else is already due or will be.
    pub fn resend_result(&self, command_id: &CommandId) {
        if let Some(e) = self.inner.lock().get_mut(command_id)
            && e.result.is_some()
        {
            e.finished_sent = false;
        }
        self.ready.notify_one();
    }

    /// Remembers the invocation's task, to abort it if the agent stops.
    pub fn set_task(&self, command_id: &CommandId, task: AbortHandle) {
        if let Some(e) = self.inner.lock().get_mut(command_id) {
            e.task = Some(task);
        }
    }

    /// The process started: `Started` becomes due.
    pub fn started(&self, command_id: &CommandId, pgid: i32, started_at_ms: i64) {
        if let Some(e) = self.inner.lock().get_mut(command_id) {
            e.started_at_ms = Some(started_at_ms);
            e.pgid = Some(pgid);
        }
        self.ready.notify_one();
    }

    /// The main process was reaped: its group is no longer the agent's to kill.
    pub fn reaped(&self, command_id: &CommandId) {
        if let Some(e) = self.inner.lock().get_mut(command_id) {
            e.pgid = None;
        }
    }

    /// The invocation ended: `Finished` becomes due once all its output is sent.
    pub fn finish(&self, command_id: &CommandId, result: ExecResult) {
        if let Some(e) = self.inner.lock().get_mut(command_id) {
            e.result = Some(result);
            e.cancel = None;
            e.pgid = None;
        }
        self.ready.notify_one();
    }

    /// Asks a queued or running invocation to stop; unknown or finished ones are left alone.
    pub fn cancel(&self, command_id: &CommandId) -> bool {
        let sender = self
            .inner
            .lock()
            .get_mut(command_id)
            .and_then(|e| e.cancel.take());
        sender.is_some_and(|s| s.send(()).is_ok())
    }

    /// The server stored `stream` up to `offset`. Unknown streams are ignored.
    pub fn ack(&self, stream: &StreamId, offset: u64) {
        let s = {
            let inner = self.inner.lock();
            let StreamId::Output { command_id, pipe } = stream;
            inner.get(command_id).map(|e| match pipe {
                Pipe::Stdout => Arc::clone(&e.stdout),
                Pipe::Stderr => Arc::clone(&e.stderr),
            })
        };
        if let Some(s) = s {
            s.ack(offset);
        }
    }

    /// The server stored the result: forget the invocation (its bytes leave the spool). Returns
    /// its run directory, to be removed; `None` if there is no result yet (the ack is premature
    /// and ignored) or the id is unknown.
    pub fn result_acked(&self, command_id: &CommandId) -> Option<PathBuf> {
        let mut inner = self.inner.lock();
        inner.get(command_id)?.result.as_ref()?;
        let e = inner.remove(command_id)?;
        e.stdout.discard();
        e.stderr.discard();
        Some(e.run_dir)
    }

    /// Every invocation held, for `Hello.known`.
    pub fn known(&self) -> Vec<CommandId> {
        self.inner.lock().keys().cloned().collect()
    }

    /// Whether the invocation is held.
    pub fn contains(&self, command_id: &CommandId) -> bool {
        self.inner.lock().contains_key(command_id)
    }

    /// A new connection: resend everything not acknowledged.
    pub fn rewind(&self) {
        for e in self.inner.lock().values_mut() {
            e.stdout.rewind();
            e.stderr.rewind();
            e.started_sent = false;
            e.finished_sent = false;
        }
        self.ready.notify_one();
    }

    /// The frames due now, in the order they must go: `Started` frames, then at most one `Output`
    /// frame per stream (round-robin across calls, so a busy stream never stalls another), then
    /// `Finished` frames of invocations whose every byte is sent. Empty when nothing is due.
    pub fn next_batch(&self) -> Vec<AgentFrame> {
        let mut inner = self.inner.lock();
        let mut frames = Vec::new();
        for (id, e) in inner.iter_mut() {
            if let Some(started_at_ms) = e.started_at_ms
                && !e.started_sent
                && (e.result.is_none() || !e.started_ever_sent)
            {
                e.started_sent = true;
                e.started_ever_sent = true;
                frames.push(AgentFrame::Started {
                    command_id: id.clone(),
                    started_at_ms,
                });
            }
        }
        for e in inner.values() {
            for s in [&e.stdout, &e.stderr] {
                if let Some((offset, data)) = s.next_chunk(OUTPUT_FRAME_MAX) {
                    frames.push(AgentFrame::Output {
                        stream: s.id().clone(),
                        offset,
                        data,
                    });
                }
            }
        }
        for (id, e) in inner.iter_mut() {
            if let Some(result) = &e.result
                && !e.finished_sent
                && e.stdout.all_sent()
                && e.stderr.all_sent()
            {
                e.finished_sent = true;
                frames.push(AgentFrame::Finished {
                    command_id: id.clone(),
                    result: result.clone(),
                });
            }
        }
        frames
    }

    /// The agent is stopping: kill every running process group and abort every invocation task.
    pub fn shutdown(&self) {
        for e in self.inner.lock().values_mut() {
            if let Some(pgid) = e.pgid.take() {
                kill_process_group(pgid);
            }
            if let Some(task) = e.task.take() {
                task.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::not_started;
    use fleetrun_proto::channel::Outcome;

    fn names(frames: &[AgentFrame]) -> Vec<&'static str> {
        frames
            .iter()
            .map(|f| match f {
                AgentFrame::Started { .. } => "Started",
                AgentFrame::Output { .. } => "Output",
                AgentFrame::Finished { .. } => "Finished",
                _ => "other",
            })
            .collect()
    }

    fn outbox() -> Outbox {
        Outbox::new(Spool::new(1 << 20))
    }

    #[test]
    fn frames_come_in_order_and_are_resent_after_rewind() {
        let outbox = outbox();
        let id = CommandId::from_random(5);
        let new = outbox.insert(&id, PathBuf::from("/nonexistent")).unwrap();
        assert!(outbox.insert(&id, PathBuf::new()).is_none(), "never twice");
        assert!(outbox.next_batch().is_empty(), "queued: nothing due");

        outbox.started(&id, 1234, 42);
        assert_eq!(names(&outbox.next_batch()), ["Started"]);
        outbox.rewind();
        assert_eq!(names(&outbox.next_batch()), ["Started"], "running: resent");

        new.stdout.set_eof();
        outbox.finish(&id, not_started(Outcome::Exited, String::new()));
        // stderr is still open: no Finished yet.
        assert!(outbox.next_batch().is_empty());
        new.stderr.set_eof();
        assert_eq!(names(&outbox.next_batch()), ["Finished"]);
        assert!(outbox.next_batch().is_empty());
        outbox.rewind();
        assert_eq!(
            names(&outbox.next_batch()),
            ["Finished"],
            "finished: no Started again"
        );
        assert_eq!(outbox.known(), std::slice::from_ref(&id));
        assert!(outbox.result_acked(&id).is_some());
        assert!(outbox.known().is_empty());
        assert!(!outbox.cancel(&id));
    }

    #[test]
    fn premature_result_ack_and_unknown_acks_are_ignored() {
        let outbox = outbox();
        let id = CommandId::from_random(6);
        let _new = outbox.insert(&id, PathBuf::new()).unwrap();
        assert!(outbox.result_acked(&id).is_none());
        assert!(outbox.contains(&id));
        let other = StreamId::Output {
            command_id: CommandId::from_random(7),
            pipe: Pipe::Stdout,
        };
        outbox.ack(&other, 10);
        assert!(outbox.cancel(&id));
        assert!(!outbox.cancel(&id), "one cancel is enough");
    }
}
