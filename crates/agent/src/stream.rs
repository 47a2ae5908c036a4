//! One output stream of one invocation (its stdout or its stderr), spooled to disk between the
//! pump that reads the command's pipe and the connection that sends and resends it.
//!
//! The bytes from the last acknowledged offset on live in segment files
//! `runs/<id>/<pipe>.<offset:020>` of at most [`SEGMENT_MAX`] bytes, named after the offset of
//! their first byte; `<pipe>.acked` holds the last acknowledged offset. An `Ack` deletes the
//! segments wholly below it. So an agent killed at any moment finds every unacknowledged byte again
//! when it starts ([`OutputStream::recover`]) and resends from the acknowledged offset.
//!
//! Two bounds: the sender has at most [`OUTPUT_WINDOW`] bytes past the last ack on the wire, and
//! all streams of the agent together hold at most the [`Spool`]'s bytes on disk. When the spool is
//! full the pumps stop reading, so a command writing faster than the server stores blocks on its
//! own pipe; the time it was held up is reported in its result. Memory stays bounded: a pump holds
//! one read buffer, the sender one frame.
//!
//! File I/O here is small, synchronous and on the page cache. Output is written, not fsynced,
//! except the last segment when the stream ends: a killed agent loses nothing, a power cut may lose
//! the tail of a running command's output.

use fleetrun_proto::CommandId;
use fleetrun_proto::channel::StreamId;
use fleetrun_proto::limits::OUTPUT_WINDOW;
use parking_lot::Mutex;
use std::collections::{HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::unix::pipe;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// Largest single read from a pipe.
const READ_MAX: usize = 64 * 1024;
/// Largest segment file.
pub const SEGMENT_MAX: u64 = 1024 * 1024;
/// How long the pipes are read after the command's main process ended: a background child may
/// hold them open forever.
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// The agent-wide bound on spooled output: bytes in segment files, over all streams.
#[derive(Debug)]
pub struct Spool {
    max: u64,
    inner: Mutex<SpoolState>,
    /// Wakes pumps waiting for space (all of them: each takes what it can).
    space: Notify,
}

#[derive(Debug, Default)]
struct SpoolState {
    /// Bytes on disk plus bytes reserved by reads in progress.
    used: u64,
    /// Invocations already warned about a full spool.
    warned: HashSet<CommandId>,
}

impl Spool {
    /// A spool of at most `max` bytes.
    pub fn new(max: u64) -> Arc<Self> {
        Arc::new(Spool {
            max,
            inner: Mutex::new(SpoolState::default()),
            space: Notify::new(),
        })
    }

    /// The bound, in bytes.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Bytes spooled (or reserved for a read in progress) now.
    pub fn used(&self) -> u64 {
        self.inner.lock().used
    }

    /// Reserves up to `want` bytes; returns how many were granted (0 when full).
    fn try_reserve(&self, want: u64) -> u64 {
        let mut st = self.inner.lock();
        let granted = want.min(self.max.saturating_sub(st.used));
        st.used += granted;
        granted
    }

    /// Waits until some space is free and reserves up to `want` of it.
    async fn reserve(&self, want: u64) -> u64 {
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            // Registered before the check, so a release in between is not missed.
            notified.as_mut().enable();
            let granted = self.try_reserve(want);
            if granted > 0 {
                return granted;
            }
            notified.await;
        }
    }

    /// Counts bytes found on disk at start-up (may exceed the bound if it was lowered).
    fn add(&self, n: u64) {
        self.inner.lock().used += n;
    }

    fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        let mut st = self.inner.lock();
        st.used = st.used.saturating_sub(n);
        drop(st);
        self.space.notify_waiters();
    }

    /// True the first time it is asked for `command_id` (one warning per invocation).
    fn first_warning(&self, command_id: &CommandId) -> bool {
        self.inner.lock().warned.insert(command_id.clone())
    }

    fn forget(&self, command_id: &CommandId) {
        self.inner.lock().warned.remove(command_id);
    }

    /// The bound in words, e.g. `256 MiB`.
    pub fn describe(&self) -> String {
        const MIB: u64 = 1024 * 1024;
        match self.max {
            m if m >= MIB && m.is_multiple_of(MIB) => format!("{} MiB", m / MIB),
            m if m >= 1024 && m.is_multiple_of(1024) => format!("{} KiB", m / 1024),
            m => format!("{m} bytes"),
        }
    }
}

/// A stream's shared state. See the module docs.
#[derive(Debug)]
pub struct OutputStream {
    id: StreamId,
    dir: PathBuf,
    spool: Arc<Spool>,
    state: Mutex<State>,
    /// Wakes the sender when bytes arrive or the stream ends (shared by all streams of an outbox).
    ready: Arc<Notify>,
}

#[derive(Clone, Copy, Debug)]
struct Segment {
    start: u64,
    len: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Every byte before it is acknowledged.
    acked: u64,
    /// The stream's length so far.
    end: u64,
    /// Next offset to send on the current connection.
    sent: u64,
    /// The pipe is closed (or no longer read): the stream's length is final.
    eof: bool,
    /// Segment files on disk, in order and contiguous, the last one ending at `end`.
    segments: VecDeque<Segment>,
    /// The last segment, open for appending.
    writer: Option<File>,
    /// The segment last read by the sender, and its file.
    reader: Option<(u64, File)>,
    /// Time the pump waited for spool space.
    paused: Duration,
    /// Why the stream ended early, if it did (the spool could not be written).
    error: Option<String>,
}

impl State {
    fn on_disk(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }
}

impl OutputStream {
    /// A new, empty stream spooled in `dir` (the run directory, which must exist);
    /// `ready` is notified whenever there is something new to send.
    pub fn create(id: StreamId, dir: PathBuf, spool: Arc<Spool>, ready: Arc<Notify>) -> Self {
        OutputStream {
            id,
            dir,
            spool,
            state: Mutex::new(State::default()),
            ready,
        }
    }

    /// The stream an earlier agent process left in `dir`: its remaining segments, resent from its
    /// acknowledged offset. It has ended (nothing reads its pipe any more).
    pub fn recover(
        id: StreamId,
        dir: PathBuf,
        spool: Arc<Spool>,
        ready: Arc<Notify>,
    ) -> io::Result<Self> {
        let prefix = format!("{}.", pipe_name(&id));
        let mut found = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
                continue;
            };
            if rest.len() == 20
                && let Ok(start) = rest.parse::<u64>()
            {
                found.push(Segment {
                    start,
                    len: entry.metadata()?.len(),
                });
            }
        }
        found.sort_by_key(|s| s.start);
        let mut st = State {
            eof: true,
            ..State::default()
        };
        for seg in found {
            if let Some(last) = st.segments.back()
                && last.start + last.len != seg.start
            {
                tracing::warn!(stream = ?id, offset = seg.start, "gap in the spool: later segments ignored");
                break;
            }
            st.segments.push_back(seg);
        }
        let recorded = read_acked(&dir.join(format!("{prefix}acked")));
        match (st.segments.front(), st.segments.back()) {
            (Some(first), Some(last)) => {
                st.end = last.start + last.len;
                st.acked = recorded.clamp(first.start, st.end);
            }
            _ => {
                st.end = recorded;
                st.acked = recorded;
            }
        }
        st.sent = st.acked;
        spool.add(st.on_disk());
        Ok(OutputStream {
            id,
            dir,
            spool,
            state: Mutex::new(st),
            ready,
        })
    }

    /// The stream's id.
    pub fn id(&self) -> &StreamId {
        &self.id
    }

    fn segment_path(&self, start: u64) -> PathBuf {
        self.dir
            .join(format!("{}.{start:020}", pipe_name(&self.id)))
    }

    /// Takes the next unsent bytes (at most `max`, never past the window) and their offset, and
    /// counts them as sent.
    pub fn next_chunk(&self, max: usize) -> Option<(u64, Vec<u8>)> {
        let mut st = self.state.lock();
        let limit = (st.acked + OUTPUT_WINDOW).min(st.end);
        if st.sent >= limit {
            return None;
        }
        let sent = st.sent;
        let seg = *st
            .segments
            .iter()
            .find(|s| s.start <= sent && sent < s.start + s.len)?;
        let n = (max as u64)
            .min(limit - sent)
            .min(seg.start + seg.len - sent);
        if st
            .reader
            .as_ref()
            .is_none_or(|(start, _)| *start != seg.start)
        {
            match File::open(self.segment_path(seg.start)) {
                Ok(f) => st.reader = Some((seg.start, f)),
                Err(e) => {
                    tracing::error!(stream = ?self.id, error = %e, "cannot open a spool segment");
                    return None;
                }
            }
        }
        let (_, file) = st.reader.as_ref()?;
        // `n` is at most `max`, a usize.
        let mut data = vec![0; n as usize];
        if let Err(e) = file.read_exact_at(&mut data, sent - seg.start) {
            tracing::error!(stream = ?self.id, error = %e, "cannot read the spool");
            return None;
        }
        st.sent += n;
        Some((sent, data))
    }

    /// The server stored everything before `offset`: delete the segments wholly below it. An
    /// offset past what was sent is clamped (the server cannot have stored unsent bytes).
    pub fn ack(&self, offset: u64) {
        let mut st = self.state.lock();
        let offset = offset.min(st.sent);
        if offset <= st.acked {
            return;
        }
        st.acked = offset;
        let mut freed = 0;
        while let Some(seg) = st.segments.front().copied() {
            if seg.start + seg.len > offset {
                break;
            }
            st.segments.pop_front();
            if st.segments.is_empty() {
                st.writer = None;
            }
            if st.reader.as_ref().is_some_and(|(s, _)| *s == seg.start) {
                st.reader = None;
            }
            remove_quietly(&self.segment_path(seg.start));
            freed += seg.len;
        }
        let acked_path = self.dir.join(format!("{}.acked", pipe_name(&self.id)));
        if let Err(e) = write_acked(&acked_path, offset) {
            tracing::warn!(stream = ?self.id, error = %e, "cannot record the acknowledged offset");
        }
        // The window moved: the writer may be waiting for room to send more (once the command
        // has ended, no pump will wake it).
        let more_to_send = st.sent < st.end;
        drop(st);
        self.spool.release(freed);
        if more_to_send {
            self.ready.notify_one();
        }
    }

    /// Starts over on a new connection: everything not acknowledged is sent again.
    pub fn rewind(&self) {
        let mut st = self.state.lock();
        st.sent = st.acked;
    }

    /// Whether the stream has ended and every byte of it was sent on the current connection.
    pub fn all_sent(&self) -> bool {
        let st = self.state.lock();
        st.eof && st.sent == st.end
    }

    /// Whether the stream has ended.
    pub fn is_eof(&self) -> bool {
        self.state.lock().eof
    }

    /// The stream's length so far (final once [`Self::is_eof`]).
    pub fn total_len(&self) -> u64 {
        self.state.lock().end
    }

    /// The last acknowledged offset.
    pub fn acked(&self) -> u64 {
        self.state.lock().acked
    }

    /// Bytes of this stream in the spool.
    pub fn spooled(&self) -> u64 {
        self.state.lock().on_disk()
    }

    /// How long the pump waited for spool space.
    pub fn paused(&self) -> Duration {
        self.state.lock().paused
    }

    /// The result's note for output held up `paused` by a full spool.
    pub fn spool_note(&self, paused: Duration) -> String {
        format!(
            "output was paused {:.1} s because the agent's spool ({}) was full",
            paused.as_secs_f64(),
            self.spool.describe()
        )
    }

    /// Why the stream ended before its pipe did, if it did.
    pub fn error(&self) -> Option<String> {
        self.state.lock().error.clone()
    }

    /// Marks the stream ended (also when its pipe was never read, e.g. the command did not start)
    /// and syncs its last segment.
    pub fn set_eof(&self) {
        let mut st = self.state.lock();
        st.eof = true;
        if let Some(w) = st.writer.take()
            && let Err(e) = w.sync_data()
        {
            tracing::warn!(stream = ?self.id, error = %e, "cannot sync the spool");
        }
        drop(st);
        self.ready.notify_one();
    }

    /// The invocation is forgotten: give its bytes back to the spool (its directory is removed).
    pub fn discard(&self) {
        let mut st = self.state.lock();
        let freed = st.on_disk();
        st.segments.clear();
        st.writer = None;
        st.reader = None;
        drop(st);
        self.spool.release(freed);
        let StreamId::Output { command_id, .. } = &self.id;
        self.spool.forget(command_id);
    }

    /// Appends bytes read from the pipe (their spool space is already reserved).
    fn append(&self, mut data: &[u8]) -> io::Result<()> {
        let mut st = self.state.lock();
        while !data.is_empty() {
            let room = match st.segments.back() {
                Some(last) if st.writer.is_some() => SEGMENT_MAX - last.len,
                _ => 0,
            };
            if room == 0 {
                let start = st.end;
                let f = OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .open(self.segment_path(start))?;
                st.writer = Some(f);
                st.segments.push_back(Segment { start, len: 0 });
                continue;
            }
            let n = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            let Some(w) = st.writer.as_mut() else {
                continue;
            };
            w.write_all(&data[..n])?;
            if let Some(last) = st.segments.back_mut() {
                last.len += n as u64;
            }
            st.end += n as u64;
            data = &data[n..];
        }
        drop(st);
        self.ready.notify_one();
        Ok(())
    }

    /// Reserves spool space for the next read, waiting (and counting the wait) while it is full.
    async fn reserve(&self) -> u64 {
        let want = READ_MAX as u64;
        let granted = self.spool.try_reserve(want);
        if granted > 0 {
            return granted;
        }
        let StreamId::Output { command_id, .. } = &self.id;
        if self.spool.first_warning(command_id) {
            tracing::warn!(
                %command_id,
                spool_max_bytes = self.spool.max(),
                "the output spool is full: the command's output is paused until the server acknowledges"
            );
        }
        let since = Instant::now();
        let granted = self.spool.reserve(want).await;
        self.state.lock().paused += since.elapsed();
        granted
    }
}

/// `stdout` or `stderr`.
fn pipe_name(id: &StreamId) -> &'static str {
    let StreamId::Output { pipe, .. } = id;
    pipe.as_str()
}

fn read_acked(path: &Path) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Overwrites the offset in place (fixed width, one small write).
fn write_acked(path: &Path, offset: u64) -> io::Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    f.write_all_at(format!("{offset:020}\n").as_bytes(), 0)
}

fn remove_quietly(path: &Path) {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove a spool segment");
        }
        _ => {}
    }
}

/// Reads `pipe` into `stream` until EOF, within the spool's bound. Once `stop_at` holds an
/// instant that has passed, it reads only what is already in the pipe and then stops: the main
/// process has ended and whatever still holds the pipe open is not waited for.
pub async fn pump(
    rx: pipe::Receiver,
    stream: Arc<OutputStream>,
    mut stop_at: watch::Receiver<Option<Instant>>,
) {
    let mut buf = vec![0u8; READ_MAX];
    loop {
        let past = stop_at.borrow().is_some_and(|t| Instant::now() >= t);
        if !past {
            // Readable first, space second: an idle pipe holds no spool space.
            tokio::select! {
                r = rx.readable() => if let Err(e) = r {
                    tracing::warn!(stream = ?stream.id(), error = %e, "reading command output failed");
                    break;
                },
                () = wait_until_set(&mut stop_at) => continue,
            }
        }
        let granted = stream.reserve().await;
        // `granted <= READ_MAX`.
        let want = granted as usize;
        let r = if past {
            // Bypass tokio's readiness cache: a direct non-blocking read says for sure whether
            // bytes are waiting (the fd is O_NONBLOCK since `Receiver::from_owned_fd`).
            nix::unistd::read(rx.as_fd(), &mut buf[..want]).map_err(io::Error::from)
        } else {
            rx.try_read(&mut buf[..want])
        };
        let n = *r.as_ref().unwrap_or(&0);
        stream.spool.release(granted - n as u64);
        if n > 0
            && let Err(e) = stream.append(&buf[..n])
        {
            stream.spool.release(n as u64);
            tracing::error!(stream = ?stream.id(), error = %e, "cannot write the output spool");
            stream.state.lock().error =
                Some(format!("output cut short: cannot write the spool: {e}"));
            break;
        }
        match r {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if past {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(stream = ?stream.id(), error = %e, "reading command output failed");
                break;
            }
        }
    }
    stream.set_eof();
}

/// Resolves when `stop_at` holds an instant and that instant has passed; never if the sender is gone.
async fn wait_until_set(stop_at: &mut watch::Receiver<Option<Instant>>) {
    loop {
        let t = *stop_at.borrow_and_update();
        match t {
            Some(t) => {
                tokio::time::sleep_until(t).await;
                return;
            }
            None => {
                if stop_at.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetrun_proto::channel::Pipe;

    fn stream(dir: &Path, spool: &Arc<Spool>) -> OutputStream {
        let id = StreamId::Output {
            command_id: CommandId::from_random(1),
            pipe: Pipe::Stdout,
        };
        OutputStream::create(
            id,
            dir.to_owned(),
            Arc::clone(spool),
            Arc::new(Notify::new()),
        )
    }

    #[test]
    fn chunks_acks_rewind_and_recovery_keep_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(1 << 30);
        let s = stream(dir.path(), &spool);
        assert_eq!(spool.try_reserve(5), 5);
        s.append(b"hello").unwrap();
        assert_eq!(s.next_chunk(3), Some((0, b"hel".to_vec())));
        assert_eq!(s.next_chunk(3), Some((3, b"lo".to_vec())));
        assert_eq!(s.next_chunk(3), None);
        s.ack(100); // clamped to what was sent; the only segment is wholly acknowledged
        assert_eq!(s.total_len(), 5);
        assert_eq!(s.spooled(), 0);
        assert_eq!(spool.used(), 0);
        assert_eq!(spool.try_reserve(3), 3);
        s.append(b"abc").unwrap();
        assert_eq!(s.next_chunk(64), Some((5, b"abc".to_vec())));
        s.ack(6);
        s.ack(2); // stale ack: ignored
        s.rewind();
        assert_eq!(s.next_chunk(64), Some((6, b"bc".to_vec())));
        assert!(!s.all_sent());
        s.set_eof();
        assert!(s.all_sent());
        assert_eq!(
            spool.used(),
            3,
            "the segment [5, 8) is still partly unacknowledged"
        );

        // A new agent process finds the stream again, from the acknowledged offset.
        let spool2 = Spool::new(1 << 30);
        let r = OutputStream::recover(
            s.id().clone(),
            dir.path().to_owned(),
            Arc::clone(&spool2),
            Arc::new(Notify::new()),
        )
        .unwrap();
        assert!(r.is_eof());
        assert_eq!((r.acked(), r.total_len()), (6, 8));
        assert_eq!(spool2.used(), 3);
        assert_eq!(r.next_chunk(64), Some((6, b"bc".to_vec())));
        r.ack(8);
        assert_eq!(spool2.used(), 0);
        assert!(r.all_sent());
    }

    #[test]
    fn segments_rotate_and_the_window_bounds_sending() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(1 << 30);
        let s = stream(dir.path(), &spool);
        let total = OUTPUT_WINDOW + SEGMENT_MAX / 2;
        let block = vec![7u8; 256 * 1024];
        let mut written = 0;
        while written < total {
            let n = block.len().min((total - written) as usize);
            s.append(&block[..n]).unwrap();
            written += n as u64;
        }
        let files = fs::read_dir(dir.path()).unwrap().count() as u64;
        assert_eq!(files, total.div_ceil(SEGMENT_MAX));
        let mut sent = 0;
        while let Some((offset, data)) = s.next_chunk(64 * 1024) {
            assert_eq!(offset, sent);
            sent += data.len() as u64;
        }
        assert_eq!(sent, OUTPUT_WINDOW, "never past the window");
        s.set_eof();
        // Regression: an ack that opens the window must wake the writer even after the command
        // ended (no pump is left to do it); without it, sending stalled until the next ping.
        let ready = Arc::clone(&s.ready);
        // Take the wake-up the appends left, so only the ack can give another.
        let _ = futures_util::FutureExt::now_or_never(ready.notified());
        let woken = ready.notified();
        tokio::pin!(woken);
        assert!(
            !woken.as_mut().enable(),
            "a wake-up is pending before the ack"
        );
        s.ack(SEGMENT_MAX + 1);
        assert!(
            futures_util::FutureExt::now_or_never(woken).is_some(),
            "the ack did not wake the writer"
        );
        assert_eq!(s.spooled(), total - SEGMENT_MAX);
        assert!(!s.segment_path(0).exists());
        assert!(s.segment_path(SEGMENT_MAX).exists());
    }
}
