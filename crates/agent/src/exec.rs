//! Runs one command: writes its script, spawns `sh -c` in its own session (in its resource limits,
//! as its run-as user), pumps its pipes into [`OutputStream`]s, reaps it with `wait4` (for rusage),
//! and stops its whole process group on timeout or cancel (SIGTERM, a grace, SIGKILL).
//!
//! This is usable without a server: give it a [`RunRequest`], two streams and a cancel future.

use crate::limits::Limits;
use crate::stream::{DRAIN_AFTER_EXIT, OutputStream, pump};
use crate::user;
use fleetrun_proto::channel::{ExecResult, Outcome, RunRequest};
use fleetrun_proto::limits::{EXECUTION_TIMEOUT_DEFAULT, EXECUTION_TIMEOUT_MAX};
use fleetrun_proto::time::now_ms;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::future::Future;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::unix::pipe;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Name of the script file in the work directory.
pub const SCRIPT_FILE: &str = "script.sh";
/// Name of the command's own directory in the run directory: its script and default cwd.
pub const WORK_DIR: &str = "work";

/// Where and how to run a command.
#[derive(Clone, Debug)]
pub struct ExecOptions {
    /// The invocation's directory (`STATE_DIR/runs/<command_id>`), created if missing. Its `work`
    /// subdirectory holds the script and is the working directory unless the request names one.
    pub run_dir: PathBuf,
    /// Put in the command's environment as `FLEETRUN_NODE_ID`.
    pub node_id: String,
    /// Time between SIGTERM and SIGKILL when the command is stopped.
    pub kill_grace: Duration,
}

/// What happened while running, for the caller to report as it happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecEvent {
    /// About to spawn: everything is ready. An error from the handler stops here (not started).
    Spawning,
    /// The process exists. It leads its own process group: `pgid` is its pid.
    Started {
        /// The process group (and the main process's pid).
        pgid: i32,
        /// Start time, epoch milliseconds.
        started_at_ms: i64,
    },
    /// The main process has been reaped; the group was killed if it was stopped. The pipes may
    /// still be drained for a while.
    Reaped,
}

/// Why a running command was stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Timeout,
    Cancel,
}

/// A result for an invocation that never ran (bad working directory, spawn failure, cancelled
/// while queued).
pub fn not_started(outcome: Outcome, message: String) -> ExecResult {
    let now = now_ms();
    ExecResult {
        limits_applied: "none".into(),
        outcome,
        exit_code: -1,
        signal: None,
        started_at_ms: now,
        finished_at_ms: now,
        cpu_user_ms: 0,
        cpu_system_ms: 0,
        max_rss_kb: 0,
        stdout_bytes: 0,
        stderr_bytes: 0,
        message,
    }
}

/// Aborts a task when dropped, so pumps do not outlive an abandoned invocation.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `req` to its end and returns its result. Output goes to `stdout`/`stderr` (both are at EOF
/// when this returns); `cancel` resolving stops the command; `on_event` hears of the spawn, the
/// start and the reaping of the main process (an error answering `Spawning` means not started).
pub async fn execute(
    req: &RunRequest,
    opts: &ExecOptions,
    stdout: Arc<OutputStream>,
    stderr: Arc<OutputStream>,
    cancel: impl Future<Output = ()>,
    mut on_event: impl FnMut(ExecEvent) -> Result<(), String>,
) -> ExecResult {
    let fail = |message: String| {
        stdout.set_eof();
        stderr.set_eof();
        not_started(Outcome::NotStarted, message)
    };
    let run_as = match req.run_as.as_deref().map(user::resolve).transpose() {
        Ok(r) => r,
        Err(message) => return fail(message),
    };
    let work = opts.run_dir.join(WORK_DIR);
    let cwd = match check_working_dir(&req.working_dir, &work) {
        Ok(cwd) => cwd,
        Err(message) => return fail(message),
    };
    let script = match write_script(&work, &req.script) {
        Ok(path) => path,
        Err(e) => {
            return fail(format!(
                "cannot write the script into {}: {e}",
                work.display()
            ));
        }
    };
    if let Some(u) = &run_as
        && let Err(e) = u.grant(&opts.run_dir, &work, &script)
    {
        return fail(format!(
            "cannot give user {} access to {}: {e}",
            u.name,
            work.display()
        ));
    }
    let limits = Limits::prepare(
        &req.command_id,
        req.memory_limit_bytes,
        req.cpu_limit_percent,
    );
    let limits = Arc::new(limits);
    let fail = |message: String| {
        // Groups created for nothing: remove them (nothing is in them yet).
        limits.cleanup();
        let mut r = fail(message);
        r.limits_applied = limits.mechanism.into();
        r
    };
    if let Err(message) = on_event(ExecEvent::Spawning) {
        return fail(message);
    }

    // `sh -c 'exec "$0"' SCRIPT` rather than `sh -c SCRIPT`: the same lookup (a shebang is
    // honoured, a plain script runs in sh), but the script replaces the outer shell instead of
    // running in a child of it. Otherwise the outer shell, not the script, gets the SIGTERM and
    // dies at once, and a script trapping TERM to clean up gets no grace.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("exec \"$0\"")
        .arg(&script)
        .current_dir(&cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("FLEETRUN_COMMAND_ID", req.command_id.as_str())
        .env("FLEETRUN_NODE_ID", &opts.node_id);
    if let Some(u) = &run_as {
        cmd.env("HOME", &u.home)
            .env("USER", &u.name)
            .env("LOGNAME", &u.name);
    }
    let in_child = (Arc::clone(&limits), run_as.clone());
    // SAFETY: only async-signal-safe system calls on data prepared before the fork (setsid,
    // open/write/close of cgroup files, setrlimit, setgroups/setgid/setuid).
    unsafe {
        cmd.pre_exec(move || {
            // Its own session and process group (pgid = pid), so the whole group can be stopped.
            nix::unistd::setsid().map_err(io::Error::from)?;
            // Limits first: joining a cgroup needs the agent's privileges.
            in_child.0.enter()?;
            match &in_child.1 {
                Some(u) => u.enter(),
                None => Ok(()),
            }
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start sh: {e}")),
    };
    let pid = child.id() as i32;
    let started_at_ms = now_ms();
    if let Err(e) = on_event(ExecEvent::Started {
        pgid: pid,
        started_at_ms,
    }) {
        tracing::warn!(command_id = %req.command_id, "{e}");
    }

    let (stop_tx, stop_rx) = watch::channel(None);
    let pumps = [
        (child.stdout.take().map(OwnedFd::from), &stdout),
        (child.stderr.take().map(OwnedFd::from), &stderr),
    ]
    .map(|(fd, stream)| start_pump(fd, Arc::clone(stream), stop_rx.clone()));
    // The std `Child` is not waited on: `wait4` below reaps the pid (tokio::process is not used
    // because its SIGCHLD reaper would race with wait4).
    drop(child);

    let mut wait = tokio::task::spawn_blocking(move || wait4(pid));
    let timeout_secs = match req.execution_timeout_secs {
        0 => EXECUTION_TIMEOUT_DEFAULT,
        s => s.min(EXECUTION_TIMEOUT_MAX),
    };
    let timeout = tokio::time::sleep(Duration::from_secs(timeout_secs));
    let (stop, waited) = tokio::select! {
        r = &mut wait => (None, r),
        () = timeout => (Some(Stop::Timeout), kill_group(pid, &mut wait, opts.kill_grace).await),
        () = cancel => (Some(Stop::Cancel), kill_group(pid, &mut wait, opts.kill_grace).await),
    };
    if stop.is_some() {
        // Members that outlived the main process (or escaped the TERM) go too.
        signal_group(pid, Signal::SIGKILL);
    }
    let finished_at_ms = now_ms();
    let _ = on_event(ExecEvent::Reaped);

    let _ = stop_tx.send(Some(Instant::now() + DRAIN_AFTER_EXIT));
    for mut p in pumps.into_iter().flatten() {
        let _ = (&mut p.0).await;
    }
    stdout.set_eof();
    stderr.set_eof();

    let reaped = match waited {
        Ok(Ok((status, ru))) => Ok(Reaped::new(status, &ru)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    // The memory check reads the groups' counters: before they are removed.
    let signal = reaped.as_ref().ok().and_then(|r| r.signal());
    let oom = (stop.is_none() && limits.oom_killed(signal)).then(|| limits.oom_message());
    let l = Arc::clone(&limits);
    // Leftovers in the groups go with them (a limited command leaves nothing behind).
    let _ = tokio::task::spawn_blocking(move || l.cleanup()).await;
    let mut notes = limits.notes.clone();
    notes.extend(stdout.error());
    notes.extend(stderr.error());
    let paused = stdout.paused().max(stderr.paused());
    if !paused.is_zero() {
        notes.push(stdout.spool_note(paused));
    }
    assemble_result(Ending {
        stop,
        timeout_secs,
        reaped,
        oom,
        started_at_ms,
        finished_at_ms,
        stdout_bytes: stdout.total_len(),
        stderr_bytes: stderr.total_len(),
        limits_applied: limits.mechanism,
        notes,
    })
}

/// The main process as `wait4` left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Reaped {
    /// The wait status.
    status: i32,
    cpu_user_ms: u64,
    cpu_system_ms: u64,
    max_rss_kb: u64,
}

impl Reaped {
    fn new(status: i32, ru: &libc::rusage) -> Self {
        Reaped {
            status,
            cpu_user_ms: timeval_ms(ru.ru_utime),
            cpu_system_ms: timeval_ms(ru.ru_stime),
            max_rss_kb: u64::try_from(ru.ru_maxrss).unwrap_or(0),
        }
    }

    /// The signal that ended it, if one did.
    fn signal(&self) -> Option<i32> {
        libc::WIFSIGNALED(self.status).then(|| libc::WTERMSIG(self.status))
    }
}

/// How a started command ended, as [`execute`] gathered it.
#[derive(Debug)]
struct Ending {
    stop: Option<Stop>,
    /// The execution timeout that applied, in seconds.
    timeout_secs: u64,
    /// The main process reaped, or why it was lost track of.
    reaped: Result<Reaped, String>,
    /// The out-of-memory message, when the kernel killed it for its memory limit.
    oom: Option<String>,
    started_at_ms: i64,
    finished_at_ms: i64,
    stdout_bytes: u64,
    stderr_bytes: u64,
    limits_applied: &'static str,
    /// Notes after the ending's own: limits not applied as asked, stream errors, spool pauses.
    notes: Vec<String>,
}

/// The result of a command that started: outcome, exit code (128 + signal when killed), usage,
/// and the note, which says first why it ended (memory, timeout, cancel, signal), then `notes`.
fn assemble_result(e: Ending) -> ExecResult {
    let outcome = match (&e.oom, e.stop) {
        (Some(_), _) => Outcome::MemoryLimitExceeded,
        (None, None) => Outcome::Exited,
        (None, Some(Stop::Timeout)) => Outcome::TimedOut,
        (None, Some(Stop::Cancel)) => Outcome::Cancelled,
    };
    let mut notes: Vec<String> = e.oom.into_iter().collect();
    match e.stop {
        Some(Stop::Timeout) => notes.push(format!("timed out after {} s", e.timeout_secs)),
        Some(Stop::Cancel) => notes.push("cancelled".to_owned()),
        None => {}
    }
    let mut result = ExecResult {
        limits_applied: e.limits_applied.into(),
        outcome,
        exit_code: -1,
        signal: None,
        started_at_ms: e.started_at_ms,
        finished_at_ms: e.finished_at_ms,
        cpu_user_ms: 0,
        cpu_system_ms: 0,
        max_rss_kb: 0,
        stdout_bytes: e.stdout_bytes,
        stderr_bytes: e.stderr_bytes,
        message: String::new(),
    };
    match e.reaped {
        Ok(r) => {
            result.cpu_user_ms = r.cpu_user_ms;
            result.cpu_system_ms = r.cpu_system_ms;
            result.max_rss_kb = r.max_rss_kb;
            if libc::WIFEXITED(r.status) {
                result.exit_code = libc::WEXITSTATUS(r.status);
            } else if let Some(sig) = r.signal() {
                result.signal = Some(sig);
                result.exit_code = 128 + sig;
                let name = Signal::try_from(sig)
                    .map(Signal::as_str)
                    .unwrap_or("unknown");
                notes.push(format!("killed by signal {sig} ({name})"));
            }
        }
        Err(why) => notes.push(format!("lost track of the process: {why}")),
    }
    notes.extend(e.notes);
    result.message = notes.join("; ");
    result
}

fn start_pump(
    fd: Option<OwnedFd>,
    stream: Arc<OutputStream>,
    stop_at: watch::Receiver<Option<Instant>>,
) -> Option<AbortOnDrop> {
    let rx = fd.map(pipe::Receiver::from_owned_fd);
    match rx {
        Some(Ok(rx)) => Some(AbortOnDrop(tokio::spawn(pump(rx, stream, stop_at)))),
        Some(Err(e)) => {
            tracing::error!(stream = ?stream.id(), error = %e, "cannot read the command's pipe");
            None
        }
        None => None,
    }
}

/// The directory to run in: the request's (absolute, existing) or the work directory.
fn check_working_dir(working_dir: &str, work: &Path) -> Result<PathBuf, String> {
    if working_dir.is_empty() {
        return Ok(work.to_owned());
    }
    let dir = Path::new(working_dir);
    if !dir.is_absolute() {
        return Err(format!(
            "working directory {working_dir} is not an absolute path"
        ));
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(dir.to_owned()),
        Ok(_) => Err(format!(
            "working directory {working_dir} is not a directory"
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(format!("working directory {working_dir} does not exist"))
        }
        Err(e) => Err(format!("working directory {working_dir}: {e}")),
    }
}

/// Creates the work directory and writes the script (mode 0700) into it; returns its path.
fn write_script(work: &Path, script: &str) -> io::Result<PathBuf> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(work)?;
    let path = std::path::absolute(work.join(SCRIPT_FILE))?;
    // A leftover from an earlier agent process must not keep its mode or content.
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .open(&path)?;
    f.write_all(script.as_bytes())?;
    Ok(path)
}

/// Stops the group: SIGTERM, up to `grace` for the main process, then SIGKILL.
async fn kill_group(
    pgid: i32,
    wait: &mut JoinHandle<io::Result<(i32, libc::rusage)>>,
    grace: Duration,
) -> Result<io::Result<(i32, libc::rusage)>, tokio::task::JoinError> {
    signal_group(pgid, Signal::SIGTERM);
    match tokio::time::timeout(grace, &mut *wait).await {
        Ok(r) => r,
        Err(_) => {
            signal_group(pgid, Signal::SIGKILL);
            wait.await
        }
    }
}

/// Signals a process group; a group that is already gone is fine.
pub(crate) fn signal_group(pgid: i32, sig: Signal) {
    match killpg(Pid::from_raw(pgid), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pgid, signal = %sig, error = %e, "cannot signal process group"),
    }
}

/// Sends SIGKILL to a process group (used when the agent stops with commands still running).
pub fn kill_process_group(pgid: i32) {
    signal_group(pgid, Signal::SIGKILL);
}

/// Waits for `pid` (blocking) and returns its wait status and resource usage.
pub(crate) fn wait4(pid: i32) -> io::Result<(i32, libc::rusage)> {
    let mut status = 0;
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: both pointers are valid for the duration of the call.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            return Ok((status, ru));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn timeval_ms(tv: libc::timeval) -> u64 {
    let secs = u64::try_from(tv.tv_sec).unwrap_or(0);
    let micros = u64::try_from(tv.tv_usec).unwrap_or(0);
    secs.saturating_mul(1_000).saturating_add(micros / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wait status: exited with `code`.
    fn exited(code: i32) -> i32 {
        code << 8
    }

    fn ending(stop: Option<Stop>, reaped: Result<Reaped, String>) -> Ending {
        Ending {
            stop,
            timeout_secs: 5,
            reaped,
            oom: None,
            started_at_ms: 10,
            finished_at_ms: 20,
            stdout_bytes: 3,
            stderr_bytes: 4,
            limits_applied: "cgroup2",
            notes: vec![],
        }
    }

    fn reaped(status: i32) -> Result<Reaped, String> {
        Ok(Reaped {
            status,
            cpu_user_ms: 7,
            cpu_system_ms: 8,
            max_rss_kb: 9,
        })
    }

    #[test]
    fn a_result_says_how_the_command_ended() {
        let r = assemble_result(ending(None, reaped(exited(3))));
        let want = ExecResult {
            outcome: Outcome::Exited,
            exit_code: 3,
            signal: None,
            started_at_ms: 10,
            finished_at_ms: 20,
            cpu_user_ms: 7,
            cpu_system_ms: 8,
            max_rss_kb: 9,
            stdout_bytes: 3,
            stderr_bytes: 4,
            message: String::new(),
            limits_applied: "cgroup2".into(),
        };
        assert_eq!(r, want);

        // Killed by a signal: 128 + the signal, named in the note.
        let r = assemble_result(ending(None, reaped(libc::SIGSEGV)));
        assert_eq!(
            (r.outcome, r.exit_code, r.signal),
            (Outcome::Exited, 139, Some(11))
        );
        assert_eq!(r.message, "killed by signal 11 (SIGSEGV)");

        // Timed out: the timeout first, then the TERM that ended it, then the other notes.
        let mut e = ending(Some(Stop::Timeout), reaped(libc::SIGTERM));
        e.notes = vec!["CPU limit not applied".into()];
        let r = assemble_result(e);
        assert_eq!((r.outcome, r.exit_code), (Outcome::TimedOut, 143));
        assert_eq!(
            r.message,
            "timed out after 5 s; killed by signal 15 (SIGTERM); CPU limit not applied"
        );

        // Cancelled, though the script exited by itself on the TERM.
        let r = assemble_result(ending(Some(Stop::Cancel), reaped(exited(0))));
        assert_eq!((r.outcome, r.exit_code), (Outcome::Cancelled, 0));
        assert_eq!(r.message, "cancelled");

        // The memory limit's kill is the outcome and the first note.
        let mut e = ending(None, reaped(libc::SIGKILL));
        e.oom = Some("killed: memory limit of 64 MiB exceeded".into());
        let r = assemble_result(e);
        assert_eq!(
            (r.outcome, r.exit_code),
            (Outcome::MemoryLimitExceeded, 137)
        );
        assert_eq!(
            r.message,
            "killed: memory limit of 64 MiB exceeded; killed by signal 9 (SIGKILL)"
        );

        // Lost track of: no exit code, no usage.
        let r = assemble_result(ending(None, Err("ECHILD".into())));
        assert_eq!((r.exit_code, r.cpu_user_ms, r.max_rss_kb), (-1, 0, 0));
        assert_eq!(r.message, "lost track of the process: ECHILD");
    }

    #[test]
    fn reaped_usage_comes_from_rusage() {
        // SAFETY: rusage is plain old data; all-zero is a valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        ru.ru_utime.tv_sec = 2;
        ru.ru_utime.tv_usec = 345_678;
        ru.ru_stime.tv_usec = 1_999;
        ru.ru_maxrss = 4096;
        let r = Reaped::new(exited(1), &ru);
        assert_eq!(
            (r.cpu_user_ms, r.cpu_system_ms, r.max_rss_kb),
            (2_345, 1, 4096)
        );
        assert_eq!(r.signal(), None);
        assert_eq!(Reaped::new(libc::SIGKILL, &ru).signal(), Some(9));
    }
}
