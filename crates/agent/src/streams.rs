//! Session streams on the agent (protocol versions 3 and 4): the multiplexer that runs what a
//! `StreamOpen` asks for (a one-shot `Exec` on pipes, a `Shell` on a PTY, a `Tcp` connection from
//! the node) and moves its bytes within each stream's credit (see `fleetrun_proto::stream` and
//! docs/protocol.md, "Session streams").
//!
//! A `Tcp` stream shares the same machinery: one pump (the socket's read half) and one feeder
//! (its write half, shut down at `StreamEof`); it ends with `StreamClose` when the peer closes,
//! without `StreamExit`, and a hang-up closes the socket.
//!
//! Each stream has a task, the same for both kinds once the process exists (`Streams::run`):
//! an `Exec` is `sh -c COMMAND` in its own session and process group on three pipes, a `Shell`
//! the user's login shell leading a new session on a PTY (`shell.rs`). Pumps send what the
//! process writes (its stdout and stderr, or the PTY master's reads) as `StreamData`, never past
//! the server's credit; a feeder writes the server's input to stdin or the PTY and grants credit
//! back as it is taken, and resizes the PTY in order with that input. The stream ends with
//! `StreamExit` and `StreamClose`. A server's `StreamClose`, a bad frame for the stream or the loss
//! of the connection hangs it up: SIGHUP first for a shell (as a terminal's hang-up), SIGTERM to
//! the group, SIGKILL after the grace. The frames wait in a queue the connection's writer drains;
//! what one stream can queue is bounded by its credit, so a stream the server does not read holds
//! up nothing else.

use crate::exec::{signal_group, wait4};
use crate::outbox::Outbox;
use crate::shell::{self, ShellSpec};
use crate::user;
use fleetrun_proto::channel::AgentFrame;
use fleetrun_proto::stream::{
    RecvWindow, STREAM_FRAME_MAX, STREAM_WINDOW_BULK, STREAM_WINDOW_DEFAULT, SendWindow, StreamFd,
    StreamKind, StreamNo,
};
use nix::sys::signal::Signal;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::unix::pipe;
use tokio::sync::{Notify, mpsc, watch};

/// Default of the agent's cap on session streams open at once (`--max-streams`).
pub const MAX_STREAMS_DEFAULT: usize = 32;
/// How long a shell's PTY is still read after the shell exited: what it wrote last arrives, and a
/// background job that keeps the terminal open does not keep the stream open with it.
pub const PTY_DRAIN: Duration = Duration::from_secs(1);

/// Why a stream is hung up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The server closed it.
    Server(String),
    /// The server broke the stream's rules; the `StreamClose` says how.
    Violation(String),
    /// The connection is gone (nobody hears the stream's frames any more) or the agent stops.
    Lost,
}

/// Input for a stream's process, in the order the server sent it.
pub(crate) enum Input {
    Data(Vec<u8>),
    Eof,
    /// A new window size (rows, columns): only a PTY has one.
    Resize(u16, u16),
}

/// The credit the server granted for a stream's output, shared by its two pumps.
pub(crate) struct Credit {
    pub(crate) window: Mutex<SendWindow>,
    more: Notify,
}

impl Credit {
    /// Waits for credit and takes up to `want` bytes of it (never 0).
    pub(crate) async fn take(&self, want: usize) -> usize {
        loop {
            let more = self.more.notified();
            tokio::pin!(more);
            // Registered before the check, so a grant between the check and the wait is seen.
            more.as_mut().enable();
            let n = self.window.lock().take(want);
            if n > 0 {
                return n;
            }
            more.await;
        }
    }
}

/// An open stream, as the frame handler sees it.
struct Handle {
    /// Tells this stream from a later one with the same number (after a reconnect).
    serial: u64,
    input: mpsc::UnboundedSender<Input>,
    recv: RecvWindow,
    credit: Arc<Credit>,
    stop: watch::Sender<Option<Stop>>,
}

#[derive(Default)]
struct Inner {
    open: HashMap<StreamNo, Handle>,
    /// Frames for the writer, of the current connection only.
    out: VecDeque<AgentFrame>,
    /// Bumped when a connection ends: frames of older connections are dropped.
    generation: u64,
    next_serial: u64,
    /// Process groups of every stream still running (by serial), hung up or not.
    groups: HashMap<u64, i32>,
    /// Stream tasks still running, of any connection: what `--max-streams` counts, so the
    /// streams of a lost connection, still stopping, leave no room for more on the next one.
    running: usize,
}

/// The agent's session streams.
pub struct Streams {
    inner: Mutex<Inner>,
    /// Its `ready` wakes the connection's writer.
    outbox: Arc<Outbox>,
    max_streams: usize,
    kill_grace: Duration,
}

impl Streams {
    /// Streams that wake the writer through `outbox` when frames are due; at most `max_streams`
    /// open at once.
    pub fn new(outbox: Arc<Outbox>, max_streams: usize, kill_grace: Duration) -> Arc<Self> {
        Arc::new(Streams {
            inner: Mutex::default(),
            outbox,
            max_streams,
            kill_grace,
        })
    }

    /// The frames due for the server, in order.
    pub fn take_frames(&self) -> Vec<AgentFrame> {
        self.inner.lock().out.drain(..).collect()
    }

    /// Streams open now.
    pub fn open_count(&self) -> usize {
        self.inner.lock().open.len()
    }

    /// The connection ended (or the agent stops): every stream is hung up and its frames dropped.
    pub fn hang_up_all(&self) {
        let mut inner = self.inner.lock();
        inner.generation += 1;
        inner.out.clear();
        for (_, h) in inner.open.drain() {
            let _ = h.stop.send(Some(Stop::Lost));
        }
    }

    /// The agent stops: every stream's process group is killed at once (no grace: nothing is
    /// left to wait for it).
    pub fn shutdown(&self) {
        self.hang_up_all();
        for (_, pgid) in self.inner.lock().groups.drain() {
            signal_group(pgid, Signal::SIGKILL);
        }
    }

    pub(crate) fn push(&self, generation: u64, frames: impl IntoIterator<Item = AgentFrame>) {
        {
            let mut inner = self.inner.lock();
            if inner.generation != generation {
                return;
            }
            inner.out.extend(frames);
        }
        self.outbox.ready().notify_one();
    }

    fn close_frame(stream: StreamNo, error: impl Into<String>) -> AgentFrame {
        AgentFrame::StreamClose {
            stream,
            error: Some(error.into()),
        }
    }

    /// Refuses a frame for `stream` with a `StreamClose` naming why.
    fn refuse(&self, stream: StreamNo, why: String) {
        tracing::warn!(stream, "session stream refused: {why}");
        let generation = self.inner.lock().generation;
        self.push(generation, [Self::close_frame(stream, why)]);
    }

    /// `StreamOpen`: starts the stream, or refuses it with a `StreamClose`.
    pub fn open(self: &Arc<Self>, stream: StreamNo, kind: StreamKind, window: u64) {
        // A number in use: any answer would read as the open stream's end, so that stream ends
        // (one StreamClose, naming why). Frames come from one reader: no race with the insert.
        if let Some(h) = self.inner.lock().open.get(&stream) {
            let why = format!("stream {stream} was opened again while open");
            let _ = h.stop.send(Some(Stop::Violation(why)));
            return;
        }
        let refused = |why: String| self.refuse(stream, why);
        if let Err(e) = kind.check() {
            return refused(format!("bad stream: {e}"));
        }
        // Port forwards may be many at once: they keep the smaller window.
        let input_window = if matches!(kind, StreamKind::Tcp { .. }) {
            STREAM_WINDOW_DEFAULT
        } else {
            STREAM_WINDOW_BULK
        };
        let what = match kind {
            StreamKind::Exec { pty: true, .. } => {
                return refused(
                    "PTY streams are not supported as Exec streams (a PTY is a Shell stream)"
                        .into(),
                );
            }
            StreamKind::Exec {
                command,
                run_as,
                env,
                working_dir,
                pty: false,
            } => What::Exec(Exec {
                command,
                run_as,
                env,
                working_dir,
            }),
            StreamKind::Shell {
                command,
                run_as,
                term,
                rows,
                cols,
                env,
            } => What::Shell(ShellSpec {
                command,
                run_as,
                term,
                rows,
                cols,
                env,
            }),
            StreamKind::Tcp { host, port } => What::Tcp { host, port },
            StreamKind::FilePut {
                path,
                mode,
                owner,
                group,
                size,
                sha256,
                resume,
                parents,
            } => What::FilePut(crate::files::Put {
                path,
                mode,
                owner,
                group,
                size,
                sha256,
                resume,
                parents,
            }),
            StreamKind::FileGet { path, offset } => What::FileGet { path, offset },
            StreamKind::FileList { path } => What::FileList { path },
        };
        let send = match SendWindow::new(window) {
            Ok(w) => w,
            Err(e) => return refused(format!("bad window: {e}")),
        };
        let (input_tx, input_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = watch::channel(None);
        let credit = Arc::new(Credit {
            window: Mutex::new(send),
            more: Notify::new(),
        });
        let (serial, generation) = {
            let mut inner = self.inner.lock();
            if inner.running >= self.max_streams {
                let max = self.max_streams;
                drop(inner);
                return refused(format!(
                    "too many session streams: this agent runs at most {max} at once (--max-streams; those of a lost connection count until they have stopped)"
                ));
            }
            inner.running += 1;
            inner.next_serial += 1;
            let serial = inner.next_serial;
            inner.open.insert(
                stream,
                Handle {
                    serial,
                    input: input_tx,
                    recv: RecvWindow::new(input_window),
                    credit: Arc::clone(&credit),
                    stop: stop_tx,
                },
            );
            (serial, inner.generation)
        };
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let tag = Tag {
                stream,
                serial,
                generation,
            };
            let ended = match what {
                What::Tcp { host, port } => {
                    me.run_tcp(tag, &host, port, credit, input_rx, stop_rx)
                        .await
                }
                What::FilePut(put) => me.run_put(tag, put, input_rx, stop_rx).await,
                What::FileGet { path, offset } => {
                    me.run_get(tag, path, offset, credit, input_rx, stop_rx)
                        .await
                }
                What::FileList { path } => me.run_list(tag, path, credit, input_rx, stop_rx).await,
                process => me.run(tag, process, credit, input_rx, stop_rx).await,
            };
            me.finish(stream, serial, generation, ended);
        });
    }

    /// `StreamData` from the server: input within the stream's credit.
    pub fn data(&self, stream: StreamNo, bytes: Vec<u8>) {
        let mut inner = self.inner.lock();
        let Some(h) = inner.open.get_mut(&stream) else {
            drop(inner);
            return self.refuse(stream, format!("data for unknown session stream {stream}"));
        };
        let check = if bytes.len() > STREAM_FRAME_MAX {
            Err(format!(
                "a data frame of {} bytes, more than {STREAM_FRAME_MAX}",
                bytes.len()
            ))
        } else {
            h.recv.receive(bytes.len()).map_err(|e| e.to_string())
        };
        match check {
            Ok(()) => {
                let _ = h.input.send(Input::Data(bytes));
            }
            Err(e) => {
                let _ = h
                    .stop
                    .send(Some(Stop::Violation(format!("bad input: {e}"))));
            }
        }
    }

    /// `StreamCredit` from the server: more room for the stream's output.
    pub fn credit(&self, stream: StreamNo, bytes: u64) {
        let inner = self.inner.lock();
        // Credit can cross a stream's end on the wire: unknown streams are ignored.
        let Some(h) = inner.open.get(&stream) else {
            return;
        };
        let granted = h.credit.window.lock().grant(bytes);
        match granted {
            Ok(()) => h.credit.more.notify_waiters(),
            Err(e) => {
                let _ = h
                    .stop
                    .send(Some(Stop::Violation(format!("bad credit: {e}"))));
            }
        }
    }

    /// `StreamEof` from the server: the process's stdin is closed after the input before it.
    pub fn eof(&self, stream: StreamNo) {
        if let Some(h) = self.inner.lock().open.get(&stream) {
            let _ = h.input.send(Input::Eof);
        }
    }

    /// `StreamResize` from the server: the client's window changed. A `Shell`'s PTY takes it
    /// after the input before it; other kinds ignore it. A bad size breaks the stream's rules;
    /// an unknown number is ignored (a resize can cross a stream's end on the wire).
    pub fn resize(&self, stream: StreamNo, rows: u16, cols: u16) {
        let inner = self.inner.lock();
        let Some(h) = inner.open.get(&stream) else {
            return;
        };
        match fleetrun_proto::stream::check_window(rows, cols) {
            Ok(()) => {
                let _ = h.input.send(Input::Resize(rows, cols));
            }
            Err(e) => {
                let _ = h
                    .stop
                    .send(Some(Stop::Violation(format!("bad resize: {e}"))));
            }
        }
    }

    /// `StreamClose` from the server: hang the stream up.
    pub fn close(&self, stream: StreamNo, reason: String) {
        if let Some(h) = self.inner.lock().open.get(&stream) {
            tracing::info!(stream, "session stream closed by the server: {reason}");
            let _ = h.stop.send(Some(Stop::Server(reason)));
        }
    }

    /// Input consumed: grants credit back when due.
    pub(crate) fn consumed(&self, stream: StreamNo, serial: u64, generation: u64, bytes: usize) {
        let grant = {
            let mut inner = self.inner.lock();
            match inner.open.get_mut(&stream) {
                Some(h) if h.serial == serial => h.recv.consume(bytes),
                _ => None,
            }
        };
        if let Some(bytes) = grant {
            self.push(generation, [AgentFrame::StreamCredit { stream, bytes }]);
        }
    }

    /// The stream's task ended: forget it and tell the server.
    fn finish(&self, stream: StreamNo, serial: u64, generation: u64, ended: Ended) {
        {
            let mut inner = self.inner.lock();
            if inner.open.get(&stream).is_some_and(|h| h.serial == serial) {
                inner.open.remove(&stream);
            }
            inner.running = inner.running.saturating_sub(1);
        }
        let mut frames = Vec::new();
        if let Some((code, signal)) = ended.exit {
            frames.push(AgentFrame::StreamExit {
                stream,
                code,
                signal,
            });
        }
        frames.push(AgentFrame::StreamClose {
            stream,
            error: ended.error,
        });
        self.push(generation, frames);
    }
}

/// Which stream a task serves: its number, its serial (tells it from a later stream of the same
/// number) and the connection it belongs to.
#[derive(Clone, Copy)]
pub(crate) struct Tag {
    pub(crate) stream: StreamNo,
    pub(crate) serial: u64,
    pub(crate) generation: u64,
}

/// What a stream runs.
enum What {
    Exec(Exec),
    Shell(ShellSpec),
    /// A TCP connection from the node to `host:port`.
    Tcp {
        host: String,
        port: u16,
    },
    /// A file written on the node.
    FilePut(crate::files::Put),
    /// A file read from the node.
    FileGet {
        path: String,
        offset: u64,
    },
    /// A directory's tree listed.
    FileList {
        path: String,
    },
}

/// What an `Exec` stream runs.
struct Exec {
    command: String,
    run_as: Option<String>,
    env: Vec<(String, String)>,
    working_dir: String,
}

/// A stream's process once it exists: its pid (the leader of its own session and process group,
/// reaped by `wait4`) and the ends its bytes go through.
struct Spawned {
    pid: i32,
    io: Io,
}

enum Io {
    /// An `Exec`'s stdin, stdout and stderr.
    Pipes([Option<OwnedFd>; 3]),
    /// A `Shell`'s PTY master.
    Pty(pty_process::Pty),
}

/// How a stream's task ended.
pub(crate) struct Ended {
    /// Exit code and signal, when the process ran.
    exit: Option<(i32, Option<i32>)>,
    /// Why it did not end normally.
    error: Option<String>,
}

impl Ended {
    pub(crate) fn failed(error: String) -> Self {
        Ended {
            exit: None,
            error: Some(error),
        }
    }

    /// Ended well, without an exit status (a connection closed, a file sent).
    pub(crate) fn ok() -> Self {
        Ended {
            exit: None,
            error: None,
        }
    }

    /// Ended well with an exit status of its own (a listing's 0).
    pub(crate) fn exited(code: i32) -> Self {
        Ended {
            exit: Some((code, None)),
            error: None,
        }
    }
}

/// Where a stream's input goes: an `Exec`'s stdin pipe, a `Shell`'s PTY master, a `Tcp`
/// stream's socket.
trait InputSink: AsyncWrite + Unpin + Send + 'static {
    /// Whether `StreamEof` shuts it down: a pipe (closed) and a socket (a half-close), yes; a
    /// terminal has no end of input of its own (what is typed, Ctrl-D included, is the input).
    const CLOSES_AT_EOF: bool;

    /// Applies a new window size (only a PTY has one).
    fn resize(&self, _rows: u16, _cols: u16) {}
}

impl InputSink for pipe::Sender {
    const CLOSES_AT_EOF: bool = true;
}

impl InputSink for tokio::net::tcp::OwnedWriteHalf {
    const CLOSES_AT_EOF: bool = true;
}

impl InputSink for pty_process::OwnedWritePty {
    const CLOSES_AT_EOF: bool = false;

    fn resize(&self, rows: u16, cols: u16) {
        // The kernel sends the foreground job SIGWINCH.
        if let Err(e) = pty_process::OwnedWritePty::resize(self, pty_process::Size::new(rows, cols))
        {
            tracing::debug!("cannot resize the PTY: {e}");
        }
    }
}

/// Reads one output of the stream's process (a pipe, or the PTY master) and queues it as
/// `StreamData`, never past the credit. Ends at EOF, or EIO: a PTY's master reads EIO once no
/// process holds the terminal any more.
async fn pump(
    streams: Arc<Streams>,
    stream: StreamNo,
    generation: u64,
    fd: StreamFd,
    mut rx: impl AsyncRead + Unpin,
    credit: Arc<Credit>,
) {
    let mut buf = vec![0u8; STREAM_FRAME_MAX];
    loop {
        let got = match rx.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::EIO) => return,
            Err(e) => {
                tracing::warn!(stream, ?fd, "cannot read the stream's output: {e}");
                return;
            }
        };
        // At most one read's bytes wait here for credit; the pipe (and the process) waits with them.
        let mut sent = 0;
        while sent < got {
            let n = credit.take(got - sent).await;
            let bytes = buf[sent..sent + n].to_vec();
            sent += n;
            streams.push(generation, [AgentFrame::StreamData { stream, fd, bytes }]);
        }
    }
}

/// Writes the server's input to the process (stdin or the PTY), granting credit back as it is
/// taken, and resizes the PTY between the bytes it came between. Input after the process closed
/// its end is dropped (and still credited, so the server never stalls).
async fn feed<W: InputSink>(
    streams: Arc<Streams>,
    tag: Tag,
    mut sink: Option<W>,
    mut input: mpsc::UnboundedReceiver<Input>,
) {
    let Tag {
        stream,
        serial,
        generation,
    } = tag;
    while let Some(msg) = input.recv().await {
        match msg {
            Input::Data(bytes) => {
                if let Some(tx) = &mut sink
                    && let Err(e) = tx.write_all(&bytes).await
                {
                    tracing::debug!(stream, "input closed by the process: {e}");
                    sink = None;
                }
                streams.consumed(stream, serial, generation, bytes.len());
            }
            Input::Eof if W::CLOSES_AT_EOF => {
                if let Some(mut tx) = sink.take() {
                    let _ = tx.shutdown().await;
                }
            }
            Input::Eof => {}
            Input::Resize(rows, cols) => {
                if let Some(tx) = &sink {
                    tx.resize(rows, cols);
                }
            }
        }
    }
}

/// Starts an `Exec`: `sh -c COMMAND` in its own session and process group, on three pipes.
fn spawn_exec(exec: Exec) -> Result<Spawned, String> {
    let run_as = exec.run_as.as_deref().map(user::resolve).transpose()?;
    let cwd = if !exec.working_dir.is_empty() {
        let dir = std::path::PathBuf::from(&exec.working_dir);
        if !dir.is_absolute() || !dir.is_dir() {
            return Err(format!(
                "working directory {} is not an absolute path to a directory",
                exec.working_dir
            ));
        }
        dir
    } else {
        // The user's home, or / when it has none.
        let home = match &run_as {
            Some(u) => Some(u.home.clone()),
            None => std::env::var_os("HOME").map(Into::into),
        };
        home.filter(|h| h.is_dir()).unwrap_or_else(|| "/".into())
    };
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(&exec.command)
        .current_dir(&cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(u) = &run_as {
        cmd.env("HOME", &u.home)
            .env("USER", &u.name)
            .env("LOGNAME", &u.name);
    }
    cmd.envs(exec.env.iter().map(|(k, v)| (k, v)));
    let in_child = run_as;
    // SAFETY: only async-signal-safe system calls on data prepared before the fork (setsid,
    // setgroups/setgid/setuid).
    unsafe {
        cmd.pre_exec(move || {
            // Its own session and process group (pgid = pid): a hang-up reaches all of it.
            nix::unistd::setsid().map_err(io::Error::from)?;
            match &in_child {
                Some(u) => u.enter(),
                None => Ok(()),
            }
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot start sh: {e}"))?;
    let pid = i32::try_from(child.id()).map_err(|_| "the process id does not fit a pid")?;
    let pipes = [
        child.stdin.take().map(OwnedFd::from),
        child.stdout.take().map(OwnedFd::from),
        child.stderr.take().map(OwnedFd::from),
    ];
    // Reaped by wait4 (as exec.rs does: the std Child is never waited on).
    drop(child);
    for fd in pipes.iter().flatten() {
        widen_pipe(fd);
    }
    Ok(Spawned {
        pid,
        io: Io::Pipes(pipes),
    })
}

/// A pipe's buffer as large as the system lets a process make it without privilege (1 MiB by
/// default): with the 64 KiB default, a stream of stdin into the child or of output out of it
/// costs a wake-up per 64 KiB on each side and stalls below the throughput target. Best effort:
/// a smaller limit leaves the pipe as it is.
fn widen_pipe(fd: &OwnedFd) {
    const WANTED: i32 = 1 << 20;
    let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(WANTED));
}

/// The process groups a hang-up signals: the stream's own and, on a PTY, the terminal's
/// foreground job (a job-control shell runs each job in a group of its own).
fn hang_up_groups(pid: i32, master: Option<&OwnedFd>) -> Vec<i32> {
    let mut groups = vec![pid];
    if let Some(fg) = master.and_then(|m| nix::unistd::tcgetpgrp(m).ok())
        && fg.as_raw() > 0
        && fg.as_raw() != pid
    {
        groups.push(fg.as_raw());
    }
    groups
}

fn signal_groups(groups: &[i32], sig: Signal) {
    for &g in groups {
        signal_group(g, sig);
    }
}

impl Streams {
    /// Runs a stream to its end: starts its process, then moves its bytes until it exits (and
    /// its output is drained) or it is hung up.
    async fn run(
        self: &Arc<Self>,
        tag: Tag,
        what: What,
        credit: Arc<Credit>,
        input: mpsc::UnboundedReceiver<Input>,
        mut stop: watch::Receiver<Option<Stop>>,
    ) -> Ended {
        let spawned = match what {
            What::Exec(exec) => spawn_exec(exec),
            What::Shell(spec) => shell::spawn(spec).map(|(pid, pty)| Spawned {
                pid,
                io: Io::Pty(pty),
            }),
            What::Tcp { .. } | What::FilePut(_) | What::FileGet { .. } | What::FileList { .. } => {
                Err("a TCP or file stream runs no process".into())
            }
        };
        let Spawned { pid, io } = match spawned {
            Ok(s) => s,
            Err(e) => return Ended::failed(e),
        };
        let Tag {
            stream,
            serial,
            generation,
        } = tag;
        let mut wait = tokio::task::spawn_blocking(move || wait4(pid));
        self.inner.lock().groups.insert(serial, pid);
        // Started: the first grant of the input window tells the server so.
        self.push(
            generation,
            [AgentFrame::StreamCredit {
                stream,
                bytes: STREAM_WINDOW_BULK,
            }],
        );

        let spawn_pump = |fd, rx: Box<dyn AsyncRead + Unpin + Send>| {
            AbortOnDrop(tokio::spawn(pump(
                Arc::clone(self),
                stream,
                generation,
                fd,
                rx,
                Arc::clone(&credit),
            )))
        };
        let mut pumps = Vec::new();
        // A PTY's output is still read for a moment after the shell exits, then the stream ends
        // even if a background job holds the terminal; pipes are read to their end.
        let (feeder, master, drain) = match io {
            Io::Pipes([stdin, stdout, stderr]) => {
                for (fd, which) in [(stdout, StreamFd::Stdout), (stderr, StreamFd::Stderr)] {
                    if let Some(rx) = fd.and_then(|fd| pipe::Receiver::from_owned_fd(fd).ok()) {
                        pumps.push(spawn_pump(which, Box::new(rx)));
                    }
                }
                let stdin = stdin.and_then(|fd| pipe::Sender::from_owned_fd(fd).ok());
                let feeder = tokio::spawn(feed(Arc::clone(self), tag, stdin, input));
                (AbortOnDrop(feeder), None, None)
            }
            Io::Pty(pty) => {
                // A second descriptor of the master, to find the foreground job at a hang-up.
                let master = pty.as_fd().try_clone_to_owned().ok();
                let (rx, tx) = pty.into_split();
                pumps.push(spawn_pump(StreamFd::Stdout, Box::new(rx)));
                let feeder = tokio::spawn(feed(Arc::clone(self), tag, Some(tx), input));
                (AbortOnDrop(feeder), master, Some(PTY_DRAIN))
            }
        };
        let pumps_done = async {
            for p in &mut pumps {
                let _ = (&mut p.0).await;
            }
        };
        tokio::pin!(pumps_done);

        let mut status: Option<io::Result<(i32, libc::rusage)>> = None;
        let mut output_closed = false;
        let mut stopped: Option<Stop> = None;
        // The groups the hang-up signalled (the foreground job may change after it).
        let mut hung_up = vec![pid];
        let far = || tokio::time::Instant::now() + Duration::from_secs(86_400);
        let kill_at = tokio::time::sleep_until(far());
        tokio::pin!(kill_at);
        let drain_at = tokio::time::sleep_until(far());
        tokio::pin!(drain_at);
        let mut drained = false;
        loop {
            if status.is_some() && (output_closed || drained || stopped.is_some()) {
                break;
            }
            tokio::select! {
                r = &mut wait, if status.is_none() => {
                    status = Some(r.unwrap_or_else(|e| Err(io::Error::other(e))));
                    if stopped.is_some() {
                        // Members that outlived the main process go too.
                        signal_groups(&hung_up, Signal::SIGKILL);
                    }
                    if let Some(d) = drain {
                        drain_at.as_mut().reset(tokio::time::Instant::now() + d);
                    }
                }
                () = &mut pumps_done, if !output_closed => output_closed = true,
                () = &mut drain_at, if status.is_some() && !drained => drained = true,
                changed = stop.changed(), if stopped.is_none() => {
                    let why = match changed {
                        Ok(()) => stop.borrow().clone().unwrap_or(Stop::Lost),
                        Err(_) => Stop::Lost,
                    };
                    hung_up = hang_up_groups(pid, master.as_ref());
                    if master.is_some() {
                        // As a terminal's hang-up: a shell passes SIGHUP on to its jobs; a
                        // stopped job is woken to hear it.
                        signal_groups(&hung_up, Signal::SIGHUP);
                        signal_groups(&hung_up, Signal::SIGCONT);
                    }
                    signal_groups(&hung_up, Signal::SIGTERM);
                    if status.is_some() {
                        signal_groups(&hung_up, Signal::SIGKILL);
                    }
                    kill_at.as_mut().reset(tokio::time::Instant::now() + self.kill_grace);
                    stopped = Some(why);
                }
                () = &mut kill_at, if stopped.is_some() => {
                    signal_groups(&hung_up, Signal::SIGKILL);
                    kill_at.as_mut().reset(far());
                }
            }
        }
        drop(feeder);
        self.inner.lock().groups.remove(&serial);
        let exit = match status {
            Some(Ok((st, _))) if libc::WIFEXITED(st) => Some((libc::WEXITSTATUS(st), None)),
            Some(Ok((st, _))) if libc::WIFSIGNALED(st) => {
                let sig = libc::WTERMSIG(st);
                Some((128 + sig, Some(sig)))
            }
            Some(Ok(_)) | None => None,
            Some(Err(e)) => {
                return Ended::failed(format!("cannot wait for the process: {e}"));
            }
        };
        let error = match stopped {
            Some(Stop::Violation(why)) => Some(why),
            Some(Stop::Server(_)) | Some(Stop::Lost) | None => None,
        };
        Ended { exit, error }
    }
}

impl Streams {
    /// Runs a `Tcp` stream to its end: connects to `host:port` from the node (within
    /// [`TCP_CONNECT_TIMEOUT`]), then relays both ways until the peer closes (after its last
    /// bytes) or the stream is hung up (the socket is closed).
    async fn run_tcp(
        self: &Arc<Self>,
        tag: Tag,
        host: &str,
        port: u16,
        credit: Arc<Credit>,
        input: mpsc::UnboundedReceiver<Input>,
        mut stop: watch::Receiver<Option<Stop>>,
    ) -> Ended {
        let connect = tokio::time::timeout(TCP_CONNECT_TIMEOUT, TcpStream::connect((host, port)));
        let socket = tokio::select! {
            r = connect => match r {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Ended::failed(format!("cannot connect to {host}:{port}: {e}")),
                Err(_) => return Ended::failed(format!(
                    "cannot connect to {host}:{port}: no answer within {} s",
                    TCP_CONNECT_TIMEOUT.as_secs()
                )),
            },
            _ = stop.changed() => return stopped(&stop),
        };
        // Interactive protocols (ssh) over a forward want their small writes sent at once.
        let _ = socket.set_nodelay(true);
        // Connected: the first grant of the input window tells the server so.
        self.push(
            tag.generation,
            [AgentFrame::StreamCredit {
                stream: tag.stream,
                bytes: STREAM_WINDOW_DEFAULT,
            }],
        );
        let (rx, tx) = socket.into_split();
        let _feeder = AbortOnDrop(tokio::spawn(feed(Arc::clone(self), tag, Some(tx), input)));
        let mut pump = AbortOnDrop(tokio::spawn(pump(
            Arc::clone(self),
            tag.stream,
            tag.generation,
            StreamFd::Stdout,
            rx,
            credit,
        )));
        tokio::select! {
            // The peer closed (or the read failed): its last bytes are queued before the close.
            _ = &mut pump.0 => Ended { exit: None, error: None },
            _ = stop.changed() => stopped(&stop),
        }
        // Both halves go with their tasks: the socket is closed.
    }
}

/// How long a `Tcp` stream's connect may take (name lookup included).
pub const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How a stream without a process ended once hung up: a violation says why, else no error.
pub(crate) fn stopped(stop: &watch::Receiver<Option<Stop>>) -> Ended {
    let error = match stop.borrow().clone() {
        Some(Stop::Violation(why)) => Some(why),
        Some(Stop::Server(_)) | Some(Stop::Lost) | None => None,
    };
    Ended { exit: None, error }
}

/// Aborts the task when dropped (a stream's helpers never outlive it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
