//! Turns `Run` frames into invocation tasks: never the same command twice, at most
//! `max_concurrent_commands` processes at once (the rest wait in a queue), cancel while queued.

use crate::exec::{self, ExecEvent, ExecOptions};
use crate::outbox::{NewInvocation, Outbox};
use fleetrun_proto::CommandId;
use fleetrun_proto::channel::{Outcome, RunRequest};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Name of the directory of per-command directories in the state directory.
pub const RUNS_DIR: &str = "runs";

/// Starts invocations and cleans up after them.
#[derive(Debug)]
pub struct Scheduler {
    outbox: Arc<Outbox>,
    /// One permit per command allowed to run at once.
    slots: Arc<Semaphore>,
    runs_dir: PathBuf,
    node_id: String,
    kill_grace: Duration,
}

impl Scheduler {
    /// A scheduler filling `outbox`, running commands under `state_dir/runs`.
    pub fn new(
        outbox: Arc<Outbox>,
        state_dir: &std::path::Path,
        node_id: String,
        max_concurrent: usize,
        kill_grace: Duration,
    ) -> Self {
        Scheduler {
            outbox,
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            runs_dir: state_dir.join(RUNS_DIR),
            node_id,
            kill_grace,
        }
    }

    /// Queues `req` unless its command is already held (queued, running or awaiting `ResultAck`).
    pub fn submit(&self, req: RunRequest) {
        let id = req.command_id.clone();
        let run_dir = self.runs_dir.join(id.as_str());
        let Some(new) = self.outbox.insert(&id, run_dir.clone()) else {
            tracing::debug!(command_id = %id, "ignoring Run for a command already held");
            return;
        };
        tracing::info!(command_id = %id, "command received");
        let opts = ExecOptions {
            run_dir,
            node_id: self.node_id.clone(),
            kill_grace: self.kill_grace,
        };
        let task = tokio::spawn(run_invocation(
            Arc::clone(&self.outbox),
            Arc::clone(&self.slots),
            req,
            opts,
            new,
        ));
        self.outbox.set_task(&id, task.abort_handle());
    }

    /// The server stored the result: forget the invocation and remove its directory.
    pub fn result_acked(&self, command_id: &CommandId) {
        if let Some(dir) = self.outbox.result_acked(command_id) {
            tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove run directory");
                }
                _ => {}
            });
        }
    }
}

/// Waits for a slot (or a cancel), runs the command, and records its result.
async fn run_invocation(
    outbox: Arc<Outbox>,
    slots: Arc<Semaphore>,
    req: RunRequest,
    opts: ExecOptions,
    new: NewInvocation,
) {
    let id = req.command_id.clone();
    let NewInvocation {
        stdout,
        stderr,
        cancel,
    } = new;
    // A dropped sender (invocation forgotten) is not a cancel.
    let cancel = async {
        if cancel.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(cancel);
    let permit = tokio::select! {
        p = Arc::clone(&slots).acquire_owned() => p.ok(),
        () = &mut cancel => {
            stdout.set_eof();
            stderr.set_eof();
            tracing::info!(command_id = %id, "command cancelled before it started");
            let result = exec::not_started(Outcome::Cancelled, "cancelled before it started".into());
            outbox.finish(&id, result);
            return;
        }
    };
    let mut permit = permit;
    let result = exec::execute(&req, &opts, stdout, stderr, cancel, |event| match event {
        ExecEvent::Started {
            pgid,
            started_at_ms,
        } => {
            tracing::info!(command_id = %id, pid = pgid, "command started");
            outbox.started(&id, pgid, started_at_ms);
        }
        ExecEvent::Reaped => {
            outbox.reaped(&id);
            // The process is gone: the slot is free even while its pipes drain.
            permit.take();
        }
    })
    .await;
    tracing::info!(
        command_id = %id,
        outcome = ?result.outcome,
        exit_code = result.exit_code,
        "command finished"
    );
    outbox.finish(&id, result);
}
