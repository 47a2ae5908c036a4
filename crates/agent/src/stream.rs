//! One output stream of one invocation (its stdout or its stderr): a flow-controlled buffer between
//! the pump that reads the command's pipe and the connection that sends and resends it.
//!
//! The buffer holds the bytes from the last acknowledged offset on, never more than
//! [`OUTPUT_WINDOW`]. When it is full the pump stops reading, so a command writing faster than the
//! server stores blocks on its own pipe and the agent's memory stays bounded. Nothing is dropped
//! before the server acknowledges it, so a reconnect resends from `acked`.

use bytes::{Buf, BytesMut};
use fleetrun_proto::channel::StreamId;
use fleetrun_proto::limits::OUTPUT_WINDOW;
use std::io;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::unix::pipe;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// Largest single read from a pipe.
const READ_MAX: usize = 64 * 1024;
/// The window as a buffer length (4 MiB fits any usize the agent runs on).
const WINDOW: usize = OUTPUT_WINDOW as usize;
/// How long the pipes are read after the command's main process ended: a background child may
/// hold them open forever.
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// A stream's shared state. See the module docs.
#[derive(Debug)]
pub struct OutputStream {
    id: StreamId,
    state: Mutex<State>,
    /// Wakes the pump when an ack frees window space (one waiter: `notify_one` keeps a permit).
    space: Notify,
    /// Wakes the sender when bytes arrive or the stream ends (shared by all streams of an outbox).
    ready: Arc<Notify>,
}

#[derive(Debug, Default)]
struct State {
    /// Offset of `buf[0]`: every byte before it is acknowledged.
    acked: u64,
    /// Bytes from `acked` on; allocated on the first read, released when drained at the end.
    buf: BytesMut,
    /// Next offset to send on the current connection.
    sent: u64,
    /// The pipe is closed (or no longer read): the stream's length is final.
    eof: bool,
}

impl OutputStream {
    /// An empty stream; `ready` is notified whenever there is something new to send.
    pub fn new(id: StreamId, ready: Arc<Notify>) -> Self {
        OutputStream {
            id,
            state: Mutex::new(State::default()),
            space: Notify::new(),
            ready,
        }
    }

    /// The stream's id.
    pub fn id(&self) -> &StreamId {
        &self.id
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain numbers and bytes behind: still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the next unsent bytes (at most `max`) and their offset, and counts them as sent.
    pub fn next_chunk(&self, max: usize) -> Option<(u64, Vec<u8>)> {
        let mut st = self.lock();
        let start = usize::try_from(st.sent - st.acked).ok()?;
        if start >= st.buf.len() {
            return None;
        }
        let end = st.buf.len().min(start + max);
        let data = st.buf[start..end].to_vec();
        let offset = st.sent;
        st.sent += data.len() as u64;
        Some((offset, data))
    }

    /// The server stored everything before `offset`: forget those bytes and let the pump read on.
    /// An offset past what was sent is clamped (the server cannot have stored unsent bytes).
    pub fn ack(&self, offset: u64) {
        let mut st = self.lock();
        let offset = offset.min(st.sent);
        if offset <= st.acked {
            return;
        }
        // `offset - acked <= sent - acked <= buf.len()`, so the cast and the advance are in range.
        let n = (offset - st.acked) as usize;
        st.buf.advance(n);
        st.acked = offset;
        if st.eof && st.buf.is_empty() {
            st.buf = BytesMut::new();
        }
        drop(st);
        self.space.notify_one();
    }

    /// Starts over on a new connection: everything not acknowledged is sent again.
    pub fn rewind(&self) {
        let mut st = self.lock();
        st.sent = st.acked;
    }

    /// Whether the stream has ended and every byte of it was sent on the current connection.
    pub fn all_sent(&self) -> bool {
        let st = self.lock();
        st.eof && st.sent == st.acked + st.buf.len() as u64
    }

    /// Whether the stream has ended.
    pub fn is_eof(&self) -> bool {
        self.lock().eof
    }

    /// The stream's length so far (final once [`Self::is_eof`]).
    pub fn total_len(&self) -> u64 {
        let st = self.lock();
        st.acked + st.buf.len() as u64
    }

    /// Bytes held in memory (never more than [`OUTPUT_WINDOW`]).
    pub fn buffered(&self) -> usize {
        self.lock().buf.len()
    }

    /// Marks the stream ended (also when its pipe was never read, e.g. the command did not start).
    pub fn set_eof(&self) {
        let mut st = self.lock();
        st.eof = true;
        if st.buf.is_empty() {
            st.buf = BytesMut::new();
        }
        drop(st);
        self.ready.notify_one();
    }

    /// Waits until the window has room; returns how many bytes the next read may take.
    async fn wait_for_space(&self) -> usize {
        loop {
            let free = WINDOW.saturating_sub(self.lock().buf.len());
            if free > 0 {
                return free.min(READ_MAX);
            }
            // An ack between the check and here leaves a permit, so no wakeup is lost.
            self.space.notified().await;
        }
    }

    /// Appends up to `want` bytes produced by `read` into the buffer's free space.
    fn fill(
        &self,
        want: usize,
        read: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut st = self.lock();
        let old = st.buf.len();
        let want = want.min(WINDOW.saturating_sub(old));
        st.buf.resize(old + want, 0);
        let r = read(&mut st.buf[old..]);
        let n = *r.as_ref().unwrap_or(&0);
        st.buf.truncate(old + n);
        drop(st);
        if n > 0 {
            self.ready.notify_one();
        }
        r
    }
}

/// Reads `pipe` into `stream` until EOF, within the flow-control window. Once `stop_at` holds an
/// instant that has passed, it reads only what is already in the pipe and then stops: the main
/// process has ended and whatever still holds the pipe open is not waited for.
pub async fn pump(
    rx: pipe::Receiver,
    stream: Arc<OutputStream>,
    mut stop_at: watch::Receiver<Option<Instant>>,
) {
    loop {
        let want = stream.wait_for_space().await;
        let past = stop_at.borrow().is_some_and(|t| Instant::now() >= t);
        let r = if past {
            // Bypass tokio's readiness cache: a direct non-blocking read says for sure whether
            // bytes are waiting (the fd is O_NONBLOCK since `Receiver::from_owned_fd`).
            stream.fill(want, |buf| {
                nix::unistd::read(rx.as_fd(), buf).map_err(io::Error::from)
            })
        } else {
            tokio::select! {
                r = rx.readable() => match r {
                    Ok(()) => stream.fill(want, |buf| rx.try_read(buf)),
                    Err(e) => Err(e),
                },
                () = wait_until_set(&mut stop_at) => continue,
            }
        };
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
    use fleetrun_proto::CommandId;
    use fleetrun_proto::channel::Pipe;

    fn stream() -> OutputStream {
        let id = StreamId::Output {
            command_id: CommandId::from_random(1),
            pipe: Pipe::Stdout,
        };
        OutputStream::new(id, Arc::new(Notify::new()))
    }

    #[test]
    fn chunks_acks_and_rewind_keep_offsets() {
        let s = stream();
        s.fill(10, |b| {
            b[..5].copy_from_slice(b"hello");
            Ok(5)
        })
        .unwrap();
        assert_eq!(s.next_chunk(3), Some((0, b"hel".to_vec())));
        assert_eq!(s.next_chunk(3), Some((3, b"lo".to_vec())));
        assert_eq!(s.next_chunk(3), None);
        s.ack(100); // clamped to what was sent
        assert_eq!(s.total_len(), 5);
        assert_eq!(s.buffered(), 0);
        s.fill(10, |b| {
            b[..3].copy_from_slice(b"abc");
            Ok(3)
        })
        .unwrap();
        assert_eq!(s.next_chunk(64), Some((5, b"abc".to_vec())));
        s.ack(6);
        s.ack(2); // stale ack: ignored
        s.rewind();
        assert_eq!(s.next_chunk(64), Some((6, b"bc".to_vec())));
        assert!(!s.all_sent());
        s.set_eof();
        assert!(s.all_sent());
    }
}
