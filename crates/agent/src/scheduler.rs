//! Turns `Run` frames into invocation tasks: exactly once (a `Run` is journaled before anything
//! runs, and an id with a run directory or in `completed.log` never runs again), at most
//! `max_concurrent_commands` processes at once (the rest wait in a queue), cancel while queued.
//! At start-up it takes over what an earlier agent process left in `runs/` ([`Scheduler::recover`]).

use crate::exec::{self, ExecEvent, ExecOptions};
use crate::journal::{self, Completed, Leftover, StartRecord};
use crate::outbox::{NewInvocation, Outbox};
use fleetrun_proto::CommandId;
use fleetrun_proto::channel::{ExecResult, Outcome, RunRequest};
use fleetrun_proto::time::now_ms;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Name of the directory of per-command directories in the state directory.
pub const RUNS_DIR: &str = "runs";
/// The message of an invocation that was running when the agent stopped.
pub const AGENT_RESTARTED_MESSAGE: &str =
    "the agent stopped while the command ran; its exit status is unknown";

/// Starts invocations and cleans up after them.
#[derive(Debug)]
pub struct Scheduler {
    outbox: Arc<Outbox>,
    /// One permit per command allowed to run at once.
    slots: Arc<Semaphore>,
    runs_dir: PathBuf,
    node_id: String,
    kill_grace: Duration,
    completed: Mutex<Completed>,
    /// Directories of acknowledged runs, removed together later (see [`Scheduler::result_acked`]).
    trash: Arc<Mutex<Vec<PathBuf>>>,
    /// How long they wait.
    sweep_after: Duration,
}

/// More waiting than this are removed at once, bounding what the state dir holds.
const SWEEP_MAX: usize = 1_000;

impl Scheduler {
    /// A scheduler filling `outbox`, running commands under `state_dir/runs`.
    pub fn new(
        outbox: Arc<Outbox>,
        state_dir: &Path,
        node_id: String,
        max_concurrent: usize,
        kill_grace: Duration,
        sweep_after: Duration,
    ) -> std::io::Result<Self> {
        Ok(Scheduler {
            outbox,
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            runs_dir: state_dir.join(RUNS_DIR),
            node_id,
            kill_grace,
            completed: Mutex::new(Completed::load(state_dir)?),
            trash: Arc::default(),
            sweep_after,
        })
    }

    fn completed(&self) -> parking_lot::MutexGuard<'_, Completed> {
        self.completed.lock()
    }

    /// Takes over the run directories of an earlier agent process: results are resent; an
    /// invocation that was (or may have been) running has what is left of its process group
    /// killed and ends `AgentRestarted`; one accepted but never started runs now. A journal file
    /// of a newer format refuses the whole recovery, before anything is acted on.
    pub fn recover(&self) -> Result<(), journal::NewerFormat> {
        let leftovers = journal::scan(&self.runs_dir, &self.completed())?;
        for (id, leftover) in leftovers {
            match leftover {
                Leftover::Finished { run_dir, result } => {
                    match self.outbox.recover_streams(&id, &run_dir) {
                        Ok(streams) => {
                            tracing::info!(command_id = %id, "resending a result kept from before the restart");
                            self.outbox.insert_finished(&id, run_dir, streams, result);
                        }
                        Err(e) => {
                            tracing::error!(command_id = %id, error = %e, "cannot read the output spool")
                        }
                    }
                }
                Leftover::Interrupted { run_dir, started } => {
                    self.recover_interrupted(&id, run_dir, &started);
                }
                Leftover::NotStarted { run_dir, request } => {
                    tracing::info!(command_id = %id, "running a command accepted before the restart");
                    if let Some(new) = self.outbox.insert(&id, run_dir.clone()) {
                        self.spawn(request, run_dir, new);
                    }
                }
            }
        }
        Ok(())
    }

    fn recover_interrupted(&self, id: &CommandId, run_dir: PathBuf, started: &StartRecord) {
        kill_leftover_group(id, started);
        crate::limits::remove_leftover_groups(id);
        let streams = match self.outbox.recover_streams(id, &run_dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(command_id = %id, error = %e, "cannot read the output spool");
                return;
            }
        };
        let mut result = exec::not_started(Outcome::AgentRestarted, AGENT_RESTARTED_MESSAGE.into());
        if started.started_at_ms > 0 {
            result.started_at_ms = started.started_at_ms;
        }
        result.stdout_bytes = streams[0].total_len();
        result.stderr_bytes = streams[1].total_len();
        tracing::warn!(command_id = %id, "the command was running when the agent stopped: it ends AgentRestarted");
        if let Err(e) = journal::write_json(&run_dir, journal::RESULT_FILE, &result) {
            tracing::error!(command_id = %id, error = %e, "cannot record the result");
        }
        self.outbox.insert_finished(id, run_dir, streams, result);
    }

    /// Queues `req` unless its command was accepted before (held, or acknowledged and listed in
    /// `completed.log`): a command never runs twice.
    pub fn submit(&self, req: RunRequest) {
        let id = req.command_id.clone();
        if self.outbox.contains(&id) {
            tracing::debug!(command_id = %id, "Run for a command already held: not run again");
            self.outbox.resend_result(&id);
            return;
        }
        if self.completed().contains(&id) {
            tracing::info!(command_id = %id, "Run for a command already completed: ignored");
            return;
        }
        let run_dir = match journal::accept(&self.runs_dir, &req) {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                tracing::warn!(command_id = %id, "Run for a command with a run directory: not run again");
                return;
            }
            Err(e) => {
                // Not journaled, so not run: the server hears why.
                tracing::error!(command_id = %id, error = %e, "cannot record the command");
                let run_dir = self.runs_dir.join(id.as_str());
                if let Some(new) = self.outbox.insert(&id, run_dir) {
                    new.stdout.set_eof();
                    new.stderr.set_eof();
                    let msg =
                        format!("the agent cannot record the command in its state directory: {e}");
                    self.outbox
                        .finish(&id, exec::not_started(Outcome::NotStarted, msg));
                }
                return;
            }
        };
        let Some(new) = self.outbox.insert(&id, run_dir.clone()) else {
            return;
        };
        tracing::info!(command_id = %id, "command received");
        self.spawn(req, run_dir, new);
    }

    fn spawn(&self, req: RunRequest, run_dir: PathBuf, new: NewInvocation) {
        let id = req.command_id.clone();
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

    /// The server stored the result: remember the id in `completed.log`, forget the invocation
    /// and, later, remove its directory.
    ///
    /// Removal is batched off the command path: a sweep `sweep_after` the first waiting directory
    /// (or at once past `SWEEP_MAX`) removes every waiting one. Unlinking costs a run's files
    /// again, and on ext4 without a journal each fresh inode allocation then skips over the recently
    /// deleted ones (`recently_deleted`), which made the next runs' file creation the agent's
    /// hottest path. A directory left by a crash is an acknowledged one in `completed.log`, which
    /// the start-up scan removes.
    pub fn result_acked(&self, command_id: &CommandId) {
        if let Some(dir) = self.outbox.result_acked(command_id) {
            if let Err(e) = self.completed().add(command_id) {
                tracing::warn!(%command_id, error = %e, "cannot record the completed command");
            }
            let (first, full) = {
                let mut trash = self.trash.lock();
                trash.push(dir);
                (trash.len() == 1, trash.len() >= SWEEP_MAX)
            };
            if full {
                sweep(&self.trash);
            } else if first {
                let trash = Arc::clone(&self.trash);
                let after = self.sweep_after;
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    sweep(&trash);
                });
            }
        }
    }
}

/// Removes every waiting run directory (in a blocking-pool thread).
fn sweep(trash: &Mutex<Vec<PathBuf>>) {
    let dirs = std::mem::take(&mut *trash.lock());
    if !dirs.is_empty() {
        tokio::task::spawn_blocking(move || dirs.iter().for_each(|d| journal::remove_run_dir(d)));
    }
}

/// Kills what is left of an interrupted invocation's process group, unless its pid now belongs
/// to another process (same pid, other start time). While any member of the group lives, its id
/// cannot be reused, so a group whose leader is gone is still the command's.
fn kill_leftover_group(id: &CommandId, started: &StartRecord) {
    let (Some(pid), Some(pgid)) = (started.pid, started.pgid) else {
        tracing::warn!(command_id = %id, "the command's pid was never recorded: nothing to kill");
        return;
    };
    let now = journal::proc_start_time(pid);
    if now.is_some() && now != started.proc_start_time {
        tracing::info!(command_id = %id, pid, "pid reused by another process: not killed");
        return;
    }
    match killpg(Pid::from_raw(pgid), Signal::SIGKILL) {
        Ok(()) => tracing::info!(command_id = %id, pgid, "killed what was left of the command"),
        Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => {
            tracing::warn!(command_id = %id, pgid, error = %e, "cannot kill the command's group")
        }
    }
}

/// Records `result` durably, then hands it to the outbox (so `Finished` goes out only once it
/// would survive a restart).
fn finish(outbox: &Outbox, run_dir: &Path, id: &CommandId, result: ExecResult) {
    if let Err(e) = journal::write_json(run_dir, journal::RESULT_FILE, &result) {
        tracing::error!(command_id = %id, error = %e, "cannot record the result");
    }
    outbox.finish(id, result);
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
            finish(&outbox, &opts.run_dir, &id, result);
            return;
        }
    };
    let mut permit = permit;
    let run_dir = opts.run_dir.clone();
    let result = exec::execute(&req, &opts, stdout, stderr, cancel, |event| match event {
        ExecEvent::Spawning => {
            // The marker goes first: from now on a restart treats the command as started.
            let marker = StartRecord {
                started_at_ms: now_ms(),
                ..StartRecord::default()
            };
            journal::mark_spawning(&run_dir, &marker)
                .map_err(|e| format!("the agent cannot record the start of the command: {e}"))
        }
        ExecEvent::Started {
            pgid,
            started_at_ms,
        } => {
            tracing::info!(command_id = %id, pid = pgid, "command started");
            outbox.started(&id, pgid, started_at_ms);
            let record = StartRecord {
                pid: Some(pgid),
                pgid: Some(pgid),
                started_at_ms,
                proc_start_time: journal::proc_start_time(pgid),
            };
            journal::record_pid(&run_dir, &record)
                .map_err(|e| format!("cannot record the command's pid: {e}"))
        }
        ExecEvent::Reaped => {
            outbox.reaped(&id);
            // The process is gone: the slot is free even while its pipes drain.
            permit.take();
            Ok(())
        }
    })
    .await;
    tracing::info!(
        command_id = %id,
        outcome = ?result.outcome,
        exit_code = result.exit_code,
        "command finished"
    );
    finish(&outbox, &run_dir, &id, result);
}
