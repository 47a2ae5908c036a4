//! The executor against real child processes: output, exit codes, working directories, timeouts,
//! cancels, rusage, the spool bound, run-as and resource limits, without any server.

use fleetrun_agent::exec::{ExecEvent, ExecOptions, execute};
use fleetrun_agent::stream::{OutputStream, Spool};
use fleetrun_proto::CommandId;
use fleetrun_proto::channel::{ExecResult, Outcome, Pipe, RunRequest, StreamId};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Bound on any single wait in these tests.
const DEADLINE: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// A command being run by `execute`, with its streams.
struct Running {
    _dir: tempfile::TempDir,
    ready: Arc<Notify>,
    stdout: Arc<OutputStream>,
    stderr: Arc<OutputStream>,
    cancel: Option<oneshot::Sender<()>>,
    events: mpsc::UnboundedReceiver<ExecEvent>,
    result: JoinHandle<ExecResult>,
}

/// A command's stdout and stderr.
type Output = (Vec<u8>, Vec<u8>);

/// Everything a command left behind.
struct Done {
    result: ExecResult,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    pgid: Option<i32>,
}

fn request(script: &str) -> RunRequest {
    RunRequest {
        command_id: CommandId::from_random(rand_u128()),
        script: script.to_owned(),
        working_dir: String::new(),
        execution_timeout_secs: 60,
        run_as: None,
        memory_limit_bytes: None,
        cpu_limit_percent: None,
    }
}

fn start(script: &str, working_dir: &str, timeout_secs: u64, grace: Duration) -> Running {
    let mut req = request(script);
    req.working_dir = working_dir.to_owned();
    req.execution_timeout_secs = timeout_secs;
    start_req(req, grace, Spool::new(1 << 30))
}

fn start_req(req: RunRequest, grace: Duration, spool: Arc<Spool>) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let ready = Arc::new(Notify::new());
    let opts = ExecOptions {
        run_dir: dir.path().join("runs").join(req.command_id.as_str()),
        node_id: "mi-0123456789abcdef0".into(),
        kill_grace: grace,
    };
    std::fs::create_dir_all(&opts.run_dir).unwrap();
    let stream = |pipe| {
        let id = StreamId::Output {
            command_id: req.command_id.clone(),
            pipe,
        };
        Arc::new(OutputStream::create(
            id,
            opts.run_dir.clone(),
            Arc::clone(&spool),
            Arc::clone(&ready),
        ))
    };
    let (stdout, stderr) = (stream(Pipe::Stdout), stream(Pipe::Stderr));
    let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
    let (ev_tx, events) = mpsc::unbounded_channel();
    let (o, e) = (Arc::clone(&stdout), Arc::clone(&stderr));
    let result = tokio::spawn(async move {
        let cancel = async {
            if cancel_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        execute(&req, &opts, o, e, cancel, |ev| {
            let _ = ev_tx.send(ev);
            Ok(())
        })
        .await
    });
    Running {
        _dir: dir,
        ready,
        stdout,
        stderr,
        cancel: Some(cancel_tx),
        events,
        result,
    }
}

fn rand_u128() -> u128 {
    use std::hash::{BuildHasher, RandomState};
    let s = RandomState::new();
    (u128::from(s.hash_one(1u8)) << 64) | u128::from(s.hash_one(2u8))
}

/// Acts as the server: takes every byte as it comes, acknowledges it at once, and publishes the
/// stdout seen so far. Checks offsets are contiguous and the window is never exceeded.
fn drain(r: &Running) -> (JoinHandle<Output>, watch::Receiver<Vec<u8>>) {
    let (seen_tx, seen_rx) = watch::channel(Vec::new());
    let (ready, out, err) = (
        Arc::clone(&r.ready),
        Arc::clone(&r.stdout),
        Arc::clone(&r.stderr),
    );
    let task = tokio::spawn(async move {
        let mut bufs = (Vec::new(), Vec::new());
        loop {
            let mut progressed = false;
            for (s, buf) in [(&out, &mut bufs.0), (&err, &mut bufs.1)] {
                while let Some((offset, data)) = s.next_chunk(64 * 1024) {
                    assert_eq!(offset, buf.len() as u64, "contiguous offsets");
                    buf.extend_from_slice(&data);
                    s.ack(buf.len() as u64);
                    progressed = true;
                }
            }
            if progressed {
                seen_tx.send_replace(bufs.0.clone());
            }
            if out.all_sent() && err.all_sent() {
                return bufs;
            }
            ready.notified().await;
        }
    });
    (task, seen_rx)
}

async fn finish(mut r: Running, drained: JoinHandle<Output>) -> Done {
    let result = within("the result", &mut r.result).await.unwrap();
    let (stdout, stderr) = within("the output", drained).await.unwrap();
    let mut pgid = None;
    while let Ok(ev) = r.events.try_recv() {
        if let ExecEvent::Started { pgid: p, .. } = ev {
            pgid = Some(p);
        }
    }
    assert_eq!(result.stdout_bytes, stdout.len() as u64);
    assert_eq!(result.stderr_bytes, stderr.len() as u64);
    Done {
        result,
        stdout,
        stderr,
        pgid,
    }
}

async fn run(script: &str) -> Done {
    run_in(script, "").await
}

async fn run_in(script: &str, working_dir: &str) -> Done {
    let r = start(script, working_dir, 60, Duration::from_secs(5));
    let (drained, _) = drain(&r);
    finish(r, drained).await
}

/// Live (non-zombie) processes in process group `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the `(comm)` field: state, ppid, pgrp.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[2] == pgid.to_string() && !matches!(fields[0], "Z" | "X") {
            found.push(pid);
        }
    }
    found
}

/// Waits (bounded) until no live process is left in the group: SIGKILL is delivered
/// asynchronously, so a member may take a moment to disappear.
async fn assert_group_gone(pgid: i32) {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let left = group_members(pgid);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < until,
            "processes survived in group {pgid}: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn echo_exits_zero_with_its_output() {
    let d = run("echo hello").await;
    assert_eq!(d.result.outcome, Outcome::Exited);
    assert_eq!(d.result.exit_code, 0);
    assert_eq!(d.result.signal, None);
    assert_eq!(d.stdout, b"hello\n");
    assert!(d.stderr.is_empty());
    assert!(d.result.finished_at_ms >= d.result.started_at_ms);
    assert_eq!(d.result.message, "");
}

#[tokio::test]
async fn non_utf8_bytes_survive() {
    let d = run(r"printf '\377\376\000x'").await;
    assert_eq!(d.stdout, [0xff, 0xfe, 0x00, b'x']);
}

#[tokio::test]
async fn exit_code_and_stderr_are_separate() {
    let d = run("echo out; echo err >&2; exit 3").await;
    assert_eq!(d.result.outcome, Outcome::Exited);
    assert_eq!(d.result.exit_code, 3);
    assert_eq!(d.stdout, b"out\n");
    assert_eq!(d.stderr, b"err\n");
}

#[tokio::test]
async fn shebang_scripts_and_environment() {
    let d =
        run("#!/bin/sh\necho \"$FLEETRUN_NODE_ID\"; test -n \"$FLEETRUN_COMMAND_ID\" && echo ok")
            .await;
    assert_eq!(d.stdout, b"mi-0123456789abcdef0\nok\n");
}

#[tokio::test]
async fn working_directory_is_honoured() {
    let wd = tempfile::tempdir().unwrap();
    let wd_path = wd.path().canonicalize().unwrap();
    let d = run_in("pwd -P", wd_path.to_str().unwrap()).await;
    assert_eq!(d.stdout, format!("{}\n", wd_path.display()).as_bytes());
    // Without one, the command runs in its own run directory, next to its script.
    let d = run("ls").await;
    assert_eq!(d.stdout, b"script.sh\n");
}

#[tokio::test]
async fn missing_working_directory_does_not_start() {
    let d = run_in("echo never", "/no/such/dir").await;
    assert_eq!(d.result.outcome, Outcome::NotStarted);
    assert_eq!(d.result.exit_code, -1);
    assert_eq!(
        d.result.message,
        "working directory /no/such/dir does not exist"
    );
    assert_eq!(d.pgid, None, "no Started for a command that never ran");
    assert!(d.stdout.is_empty());
    let d = run_in("echo never", "relative/dir").await;
    assert_eq!(d.result.outcome, Outcome::NotStarted);
    assert!(
        d.result.message.contains("not an absolute path"),
        "{}",
        d.result.message
    );
}

/// Waits until the command has printed `ready` (its background children exist by then).
async fn wait_ready(seen: &mut watch::Receiver<Vec<u8>>) {
    within(
        "ready",
        seen.wait_for(|s| s.windows(5).any(|w| w == b"ready")),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn timeout_kills_the_whole_group() {
    let r = start(
        "sleep 1000 & sleep 1000 & echo ready; sleep 1000",
        "",
        1,
        Duration::from_secs(5),
    );
    let (drained, mut seen) = drain(&r);
    wait_ready(&mut seen).await;
    let d = finish(r, drained).await;
    assert_eq!(d.result.outcome, Outcome::TimedOut);
    assert_eq!(d.result.signal, Some(15));
    assert_eq!(d.result.exit_code, 128 + 15);
    assert!(
        d.result.message.contains("timed out after 1 s"),
        "{}",
        d.result.message
    );
    assert!(d.result.message.contains("SIGTERM"), "{}", d.result.message);
    assert_group_gone(d.pgid.unwrap()).await;
}

#[tokio::test]
async fn cancel_kills_the_whole_group() {
    let mut r = start(
        "sleep 1000 & echo ready; sleep 1000",
        "",
        600,
        Duration::from_secs(5),
    );
    let (drained, mut seen) = drain(&r);
    wait_ready(&mut seen).await;
    r.cancel.take().unwrap().send(()).unwrap();
    let d = finish(r, drained).await;
    assert_eq!(d.result.outcome, Outcome::Cancelled);
    assert_eq!(d.result.signal, Some(15));
    assert!(
        d.result.message.starts_with("cancelled"),
        "{}",
        d.result.message
    );
    assert_group_gone(d.pgid.unwrap()).await;
}

#[tokio::test]
async fn a_script_ignoring_term_dies_by_kill_after_the_grace() {
    let grace = Duration::from_millis(300);
    let mut r = start(
        "trap '' TERM; sleep 1000 & echo ready; sleep 1000",
        "",
        600,
        grace,
    );
    let (drained, mut seen) = drain(&r);
    wait_ready(&mut seen).await;
    let cancelled_at = Instant::now();
    r.cancel.take().unwrap().send(()).unwrap();
    let d = finish(r, drained).await;
    assert!(cancelled_at.elapsed() >= grace, "{:?}", d.result);
    assert_eq!(d.result.outcome, Outcome::Cancelled);
    assert_eq!(d.result.signal, Some(9));
    assert_eq!(d.result.exit_code, 137);
    assert!(
        d.result.message.contains("signal 9 (SIGKILL)"),
        "{}",
        d.result.message
    );
    assert_group_gone(d.pgid.unwrap()).await;
}

#[tokio::test]
async fn background_child_holding_the_pipe_does_not_hold_the_result() {
    // The main process exits at once; the background sleep keeps stdout open. The result comes
    // about 2 s later with what was written before.
    let started = Instant::now();
    let d = run("sleep 1000 & echo bye").await;
    assert_eq!(d.result.outcome, Outcome::Exited);
    assert_eq!(d.stdout, b"bye\n");
    assert!(started.elapsed() < Duration::from_secs(10));
    let pgid = d.pgid.unwrap();
    // The background sleep is still alive (this also shows `group_members` sees survivors).
    assert!(!group_members(pgid).is_empty());
    // Left running by design (a normal exit does not kill the group); clean up here.
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[tokio::test]
async fn rusage_is_reported_for_a_busy_script() {
    let d = run("i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; echo $i").await;
    assert_eq!(d.stdout, b"300000\n");
    assert!(
        d.result.cpu_user_ms + d.result.cpu_system_ms > 0,
        "{:?}",
        d.result
    );
    assert!(d.result.max_rss_kb > 0);
}

#[tokio::test]
async fn five_commands_run_at_once() {
    // Each command waits until all five have announced themselves: this passes only if they
    // run concurrently (bounded by the loop, not by the test's patience).
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let script = format!(
        "touch {d}/$FLEETRUN_COMMAND_ID; i=0; \
         while [ $(ls {d} | wc -l) -lt 5 ]; do i=$((i+1)); [ $i -gt 400 ] && exit 1; sleep 0.05; done"
    );
    let runs: Vec<_> = (0..5)
        .map(|_| start(&script, "", 60, Duration::from_secs(5)))
        .collect();
    let mut pending = Vec::new();
    for r in runs {
        let (drained, _) = drain(&r);
        pending.push(finish(r, drained));
    }
    for d in futures_util::future::join_all(pending).await {
        assert_eq!(d.result.exit_code, 0, "{:?}", d.result);
    }
}

/// Regression test for "Nothing lost": with the spool full and no acks, the command blocks on
/// its output (nothing is dropped, the bound holds), and its result says it was held up.
#[tokio::test]
async fn a_full_spool_blocks_the_producer_and_is_reported() {
    const MAX: u64 = 256 * 1024;
    const TOTAL: u64 = 3 * 1024 * 1024 + 17;
    let spool = Spool::new(MAX);
    let mut r = start_req(
        request(&format!("head -c {TOTAL} /dev/zero | tr '\\000' x")),
        Duration::from_secs(5),
        Arc::clone(&spool),
    );
    // Nobody acknowledges: the spool fills to exactly its bound and stays there.
    within("a full spool", async {
        loop {
            let n = spool.used();
            assert!(n <= MAX, "{n} > {MAX}");
            if r.stdout.spooled() == MAX {
                break;
            }
            r.ready.notified().await;
        }
    })
    .await;
    assert!(!r.result.is_finished(), "the producer must be blocked");
    assert!(matches!(r.events.try_recv(), Ok(ExecEvent::Spawning)));
    assert!(matches!(r.events.try_recv(), Ok(ExecEvent::Started { .. })));
    assert!(
        r.events.try_recv().is_err(),
        "the process must not have exited"
    );
    // Sending without acks frees nothing.
    while r.stdout.next_chunk(64 * 1024).is_some() {}
    assert_eq!(spool.used(), MAX);
    r.stdout.rewind();
    // Acks come: everything arrives, byte-exact, the command ends, and its result says why it
    // was slow.
    let (drained, _) = drain(&r);
    let d = finish(r, drained).await;
    assert_eq!(d.result.exit_code, 0);
    assert_eq!(d.stdout.len() as u64, TOTAL);
    assert!(d.stdout.iter().all(|&b| b == b'x'));
    assert!(
        d.result
            .message
            .contains("because the agent's spool (256 KiB) was full"),
        "{}",
        d.result.message
    );
    assert_eq!(spool.used(), 0);
}

async fn run_req(req: RunRequest) -> Done {
    let r = start_req(req, Duration::from_secs(5), Spool::new(1 << 30));
    let (drained, _) = drain(&r);
    finish(r, drained).await
}

#[tokio::test]
async fn run_as_nobody() {
    let mut req = request("id -u; echo \"$USER $LOGNAME\"; pwd");
    req.run_as = Some("nobody".into());
    let d = run_req(req).await;
    assert_eq!(d.result.outcome, Outcome::Exited, "{:?}", d.result);
    let out = String::from_utf8(d.stdout).unwrap();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("65534"));
    assert_eq!(lines.next(), Some("nobody nobody"));
    assert!(lines.next().unwrap().ends_with("/work"), "{out}");
    // By uid too.
    let mut req = request("id -un");
    req.run_as = Some("65534".into());
    assert_eq!(run_req(req).await.stdout, b"nobody\n");
}

#[tokio::test]
async fn run_as_an_unknown_user_does_not_start() {
    let mut req = request("echo never");
    req.run_as = Some("fleetrun-no-such-user".into());
    let d = run_req(req).await;
    assert_eq!(d.result.outcome, Outcome::NotStarted);
    assert_eq!(d.result.message, "no such user fleetrun-no-such-user");
    assert_eq!(d.pgid, None);
}

#[tokio::test]
async fn a_memory_hog_ends_memory_limit_exceeded() {
    let mut req = request("exec python3 -c 'b = bytearray(400 * 1024 * 1024); print(len(b))'");
    req.memory_limit_bytes = Some(64 * 1024 * 1024);
    let d = run_req(req).await;
    assert!(
        ["cgroup1", "cgroup2"].contains(&d.result.limits_applied.as_str()),
        "{:?}",
        d.result
    );
    assert_eq!(
        d.result.outcome,
        Outcome::MemoryLimitExceeded,
        "{:?}",
        d.result
    );
    assert_eq!(d.result.signal, Some(9));
    assert!(
        d.result
            .message
            .starts_with("killed: memory limit of 64 MiB exceeded"),
        "{}",
        d.result.message
    );
    assert!(d.stdout.is_empty());
}

#[tokio::test]
async fn a_cpu_limit_is_a_cgroup_quota() {
    // The command reads its own cgroup's quota (cgroup v1 here; v2 keeps it in cpu.max).
    let mut req = request(
        "p=$(grep -E '^[0-9]+:(cpu|cpu,cpuacct):' /proc/self/cgroup | head -n1 | cut -d: -f3); \
         if [ -n \"$p\" ]; then cat /sys/fs/cgroup/cpu$p/cpu.cfs_quota_us; \
         else cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/cpu.max; fi",
    );
    req.cpu_limit_percent = Some(25);
    let id = req.command_id.clone();
    let d = run_req(req).await;
    assert_eq!(d.result.exit_code, 0, "{:?}", d.result);
    let out = String::from_utf8(d.stdout).unwrap();
    assert!(
        out == "25000\n" || out == "25000 100000\n",
        "{out:?} {:?}",
        d.result
    );
    assert!(["cgroup1", "cgroup2"].contains(&d.result.limits_applied.as_str()));
    // The group is gone afterwards.
    for h in ["", "cpu"] {
        let dir = std::path::Path::new("/sys/fs/cgroup")
            .join(h)
            .join("fleetrun")
            .join(id.as_str());
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[tokio::test]
async fn no_limits_asked_means_none() {
    let d = run("true").await;
    assert_eq!(d.result.limits_applied, "none");
}
