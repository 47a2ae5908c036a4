//! One agent connection's session streams: the numbers it opened (a counter, never reused), and
//! for each open stream its owner (the relay that opened it) and the credit the agent holds for
//! its output. The connection's reader hands stream frames here ([`Streams::route`]); owners
//! send through the connection's writer queue.

use fleetrun_proto::channel::{AgentFrame, ServerFrame};
use fleetrun_proto::stream::{
    RecvWindow, STREAM_FRAME_MAX, STREAMS_PER_CONNECTION_MAX, SendWindow, StreamFd, StreamKind,
    StreamNo,
};
use fleetrun_proto::version::STREAMS_SINCE;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;

/// What the agent said about a stream, for its owner.
#[derive(Debug, PartialEq, Eq)]
pub enum AgentEvent {
    /// The server may send `bytes` more input (the first one: the stream started).
    Credit(u64),
    /// Output (within the credit the server granted).
    Data(StreamFd, Vec<u8>),
    /// The process ended.
    Exit {
        /// Exit code (128 + signal for a signal).
        code: i32,
        /// The signal, if one ended it.
        signal: Option<i32>,
    },
    /// The agent ended the stream: `None` after `Exit` or a hang-up, else why it refused or broke it.
    Close(Option<String>),
    /// A file stream's facts (since version 5): where its bytes start, the file's size and mode.
    FileInfo {
        /// Where the bytes start (at most `size`).
        offset: u64,
        /// The whole file's length.
        size: u64,
        /// Permission bits (a get).
        mode: u32,
    },
    /// A file stream succeeded: the whole file's SHA-256 (checked hex).
    FileDone(String),
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The node's agent speaks a protocol without streams.
    #[error(
        "the node's agent speaks channel protocol version {0}, without session streams (version {STREAMS_SINCE} or later is needed: upgrade the agent)"
    )]
    TooOld(u32),
    /// The node's agent speaks a protocol without this kind of stream.
    #[error(
        "the node's agent speaks channel protocol version {version}, without {kind} sessions (version {since} or later is needed: upgrade the agent)"
    )]
    KindTooNew {
        /// The kind's name.
        kind: &'static str,
        /// The version that has it.
        since: u32,
        /// The agent's.
        version: u32,
    },
    /// The connection ended.
    #[error("the node's agent disconnected")]
    Gone,
    /// Too many streams on this connection.
    #[error("too many session streams open to this node (at most {STREAMS_PER_CONNECTION_MAX})")]
    TooMany,
    /// The kind is not valid.
    #[error("bad session: {0}")]
    Bad(String),
}

/// The stream table of one agent connection.
pub struct Streams {
    version: u32,
    tx: mpsc::UnboundedSender<ServerFrame>,
    inner: Mutex<Inner>,
}

struct Inner {
    /// The next number to give; numbers below it were used.
    next: StreamNo,
    open: HashMap<StreamNo, Entry>,
    /// The connection ended: nothing more opens.
    closed: bool,
}

struct Entry {
    events: mpsc::UnboundedSender<AgentEvent>,
    /// The agent's credit for output, granted back as the owner consumes it.
    recv: RecvWindow,
}

impl Streams {
    /// The table of a connection whose agent speaks `version`, sending through `tx` (the
    /// connection's writer queue).
    pub fn new(version: u32, tx: mpsc::UnboundedSender<ServerFrame>) -> Self {
        Streams {
            version,
            tx,
            inner: Mutex::new(Inner {
                next: 1,
                open: HashMap::new(),
                closed: false,
            }),
        }
    }

    /// The agent's protocol version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Opens a stream running `kind`, granting the agent `window` bytes of output credit.
    pub fn open(
        self: &Arc<Self>,
        kind: StreamKind,
        window: u64,
    ) -> Result<StreamHandle, OpenError> {
        if self.version < STREAMS_SINCE {
            return Err(OpenError::TooOld(self.version));
        }
        if self.version < kind.since() {
            return Err(OpenError::KindTooNew {
                kind: kind.name(),
                since: kind.since(),
                version: self.version,
            });
        }
        kind.check().map_err(OpenError::Bad)?;
        let recv = RecvWindow::new(window);
        let window = recv.window();
        let (events, rx) = mpsc::unbounded_channel();
        let mut inner = self.inner.lock();
        if inner.closed {
            return Err(OpenError::Gone);
        }
        if inner.open.len() >= STREAMS_PER_CONNECTION_MAX {
            return Err(OpenError::TooMany);
        }
        let Some(after) = inner.next.checked_add(1) else {
            // 4 billion streams on one connection: refuse rather than reuse a number.
            return Err(OpenError::TooMany);
        };
        let stream = std::mem::replace(&mut inner.next, after);
        inner.open.insert(stream, Entry { events, recv });
        let frame = ServerFrame::StreamOpen {
            stream,
            kind,
            window,
        };
        if self.tx.send(frame).is_err() {
            inner.open.remove(&stream);
            return Err(OpenError::Gone);
        }
        Ok(StreamHandle {
            stream,
            streams: self.clone(),
            events: rx,
        })
    }

    /// Hands an agent's stream frame to the stream's owner. Frames for a number this connection
    /// used but has ended are dropped (they crossed the end on the wire); a number it never opened,
    /// output past the credit or over a frame's size is a protocol error (the `Err`).
    pub fn route(&self, frame: AgentFrame) -> Result<(), String> {
        let (stream, event) = match frame {
            AgentFrame::StreamData { stream, fd, bytes } => (stream, AgentEvent::Data(fd, bytes)),
            AgentFrame::StreamCredit { stream, bytes } => (stream, AgentEvent::Credit(bytes)),
            AgentFrame::StreamExit {
                stream,
                code,
                signal,
            } => (stream, AgentEvent::Exit { code, signal }),
            AgentFrame::StreamClose { stream, error } => (stream, AgentEvent::Close(error)),
            AgentFrame::StreamFileInfo {
                stream,
                offset,
                size,
                mode,
            } => {
                if offset > size || mode > fleetrun_proto::stream::FILE_MODE_MAX {
                    return Err(format!(
                        "session stream {stream}: bad file info (offset {offset}, size {size}, mode {mode:o})"
                    ));
                }
                (stream, AgentEvent::FileInfo { offset, size, mode })
            }
            AgentFrame::StreamFileDone { stream, sha256 } => {
                fleetrun_proto::stream::check_sha256(&sha256)
                    .map_err(|e| format!("session stream {stream}: {e}"))?;
                (stream, AgentEvent::FileDone(sha256))
            }
            _ => return Err("not a session stream frame".into()),
        };
        let mut inner = self.inner.lock();
        if stream >= inner.next || stream == 0 {
            return Err(format!(
                "a frame for session stream {stream}, which this server never opened"
            ));
        }
        let Some(entry) = inner.open.get_mut(&stream) else {
            return Ok(());
        };
        if let AgentEvent::Data(_, bytes) = &event {
            if bytes.len() > STREAM_FRAME_MAX {
                return Err(format!(
                    "session stream {stream}: a data frame of {} bytes, more than {STREAM_FRAME_MAX}",
                    bytes.len()
                ));
            }
            entry
                .recv
                .receive(bytes.len())
                .map_err(|e| format!("session stream {stream}: {e}"))?;
        }
        let last = matches!(event, AgentEvent::Close(_));
        // An owner that is gone removes its entry first; a failed send means it is going now.
        let _ = entry.events.send(event);
        if last {
            inner.open.remove(&stream);
        }
        Ok(())
    }

    /// The connection ended: every owner hears it (its events end), and nothing more opens.
    pub fn close_all(&self) {
        let mut inner = self.inner.lock();
        inner.closed = true;
        inner.open.clear();
    }

    /// Streams open now.
    pub fn open_count(&self) -> usize {
        self.inner.lock().open.len()
    }
}

/// The owner's side of an open stream. Dropped while the agent still runs it, it hangs the
/// stream up (`StreamClose`), so the agent stops the process group.
pub struct StreamHandle {
    stream: StreamNo,
    streams: Arc<Streams>,
    events: mpsc::UnboundedReceiver<AgentEvent>,
}

impl StreamHandle {
    /// The stream's number on its connection.
    pub fn number(&self) -> StreamNo {
        self.stream
    }

    /// The next thing the agent said; `None` when the connection is gone (the agent with it).
    pub async fn next(&mut self) -> Option<AgentEvent> {
        self.events.recv().await
    }

    /// Sends input (the caller keeps within the agent's credit); false when the connection is gone.
    pub fn send_data(&self, bytes: Vec<u8>) -> bool {
        let stream = self.stream;
        self.streams
            .tx
            .send(ServerFrame::StreamData { stream, bytes })
            .is_ok()
    }

    /// The client's window changed size (a `Shell` stream's PTY follows it).
    pub fn send_resize(&self, rows: u16, cols: u16) {
        let stream = self.stream;
        let _ = self
            .streams
            .tx
            .send(ServerFrame::StreamResize { stream, rows, cols });
    }

    /// The input ends.
    pub fn send_eof(&self) {
        let stream = self.stream;
        let _ = self.streams.tx.send(ServerFrame::StreamEof { stream });
    }

    /// `bytes` of output were passed on: grants the agent credit once half its window is used.
    pub fn consumed(&self, bytes: usize) {
        let mut inner = self.streams.inner.lock();
        let Some(entry) = inner.open.get_mut(&self.stream) else {
            return;
        };
        if let Some(bytes) = entry.recv.consume(bytes) {
            let stream = self.stream;
            let _ = self
                .streams
                .tx
                .send(ServerFrame::StreamCredit { stream, bytes });
        }
    }

    /// Hangs the stream up, saying why (for the agent's log); what the agent says after is dropped.
    pub fn close(&self, reason: &str) {
        let removed = self.streams.inner.lock().open.remove(&self.stream);
        if removed.is_some() {
            let stream = self.stream;
            let reason = reason.to_owned();
            let _ = self
                .streams
                .tx
                .send(ServerFrame::StreamClose { stream, reason });
        }
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        self.close("the session ended");
    }
}

/// A stream's input on its way to the agent: what the client sent, held until the agent's credit
/// takes it, then the end of input once everything before it went. An owner reads the client's
/// next message only when [`Input::ready`], so at most one message waits here.
#[derive(Default)]
pub struct Input {
    /// The agent's credit; `None` until the stream started.
    credit: Option<SendWindow>,
    /// A client's message (or what is left of it): sent without a copy when the credit takes it
    /// whole.
    pending: bytes::Bytes,
    eof: bool,
    eof_sent: bool,
}

/// What the client did wrong with its input.
#[derive(Debug, PartialEq, Eq)]
pub enum InputError {
    /// Bytes after the end of input.
    AfterEnd,
    /// The end of input, twice.
    EndedTwice,
}

impl Input {
    /// The agent granted `bytes` of credit: `Ok(true)` for its first grant (the stream started).
    pub fn credit(&mut self, bytes: u64) -> Result<bool, String> {
        let bad = |e| format!("the agent granted bad credit: {e}");
        match self.credit.as_mut() {
            None => {
                self.credit = Some(SendWindow::new(bytes).map_err(bad)?);
                Ok(true)
            }
            Some(w) => w.grant(bytes).map(|()| false).map_err(bad),
        }
    }

    /// Whether the client's next message may be read: nothing waits for credit.
    pub fn ready(&self) -> bool {
        self.pending.is_empty()
    }

    /// Queues the client's bytes (call only when [`Input::ready`]: what waits is replaced).
    pub fn push(&mut self, bytes: bytes::Bytes) -> Result<(), InputError> {
        if self.eof {
            return Err(InputError::AfterEnd);
        }
        self.pending = bytes;
        Ok(())
    }

    /// The client's input ended.
    pub fn end(&mut self) -> Result<(), InputError> {
        if std::mem::replace(&mut self.eof, true) {
            return Err(InputError::EndedTwice);
        }
        Ok(())
    }

    /// Sends what the credit allows (and the end of input once all before it went); false when
    /// the connection is gone.
    pub fn flush(&mut self, stream: &StreamHandle) -> bool {
        let Some(w) = self.credit.as_mut() else {
            return true;
        };
        while !self.pending.is_empty() {
            let n = w.take(self.pending.len());
            if n == 0 {
                return true;
            }
            let bytes = if n == self.pending.len() {
                Vec::from(std::mem::take(&mut self.pending))
            } else {
                self.pending.split_to(n).to_vec()
            };
            if !stream.send_data(bytes) {
                return false;
            }
        }
        if self.eof && !self.eof_sent {
            stream.send_eof();
            self.eof_sent = true;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec() -> StreamKind {
        StreamKind::Exec {
            command: "true".into(),
            run_as: None,
            env: vec![],
            working_dir: String::new(),
            pty: false,
        }
    }

    fn data(stream: StreamNo, n: usize) -> AgentFrame {
        AgentFrame::StreamData {
            stream,
            fd: StreamFd::Stdout,
            bytes: vec![0; n],
        }
    }

    #[test]
    fn numbers_are_never_reused_and_output_is_held_to_its_credit() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let streams = Arc::new(Streams::new(STREAMS_SINCE, tx));
        let a = streams.open(exec(), 100).unwrap();
        assert!(matches!(
            rx.try_recv(),
            Ok(ServerFrame::StreamOpen {
                stream: 1,
                window: 100,
                ..
            })
        ));
        drop(a);
        assert!(matches!(
            rx.try_recv(),
            Ok(ServerFrame::StreamClose { stream: 1, .. })
        ));
        let b = streams.open(exec(), 100).unwrap();
        assert_eq!(b.number(), 2);
        // A late frame for stream 1 is dropped; stream 3 was never opened.
        assert_eq!(streams.route(data(1, 10)), Ok(()));
        assert!(
            streams
                .route(data(3, 1))
                .unwrap_err()
                .contains("never opened")
        );
        streams.route(data(2, 60)).unwrap();
        b.consumed(60);
        assert!(matches!(
            rx.try_recv(),
            Ok(ServerFrame::StreamOpen { stream: 2, .. })
        ));
        assert!(matches!(
            rx.try_recv(),
            Ok(ServerFrame::StreamCredit {
                stream: 2,
                bytes: 60
            })
        ));
        streams.route(data(2, 100)).unwrap();
        let e = streams.route(data(2, 1)).unwrap_err();
        assert!(e.contains("credit"), "{e}");
        // File frames with bad values are refused.
        let info = AgentFrame::StreamFileInfo {
            stream: 2,
            offset: 5,
            size: 4,
            mode: 0,
        };
        assert!(streams.route(info).unwrap_err().contains("bad file info"));
        let done = AgentFrame::StreamFileDone {
            stream: 2,
            sha256: "xyz".into(),
        };
        assert!(streams.route(done).unwrap_err().contains("bad sha256"));
    }

    #[test]
    fn old_agents_get_no_streams_and_a_closed_connection_none_either() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let old = Arc::new(Streams::new(STREAMS_SINCE - 1, tx.clone()));
        assert!(matches!(old.open(exec(), 1), Err(OpenError::TooOld(_))));
        // A version 3 agent gets exec streams, but no shells or TCP connections.
        let v3 = Arc::new(Streams::new(STREAMS_SINCE, tx.clone()));
        let tcp = StreamKind::Tcp {
            host: "localhost".into(),
            port: 22,
        };
        let e = v3.open(tcp, 1).err().map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("without tcp sessions")),
            "{e:?}"
        );
        let streams = Arc::new(Streams::new(STREAMS_SINCE, tx));
        let mut h = streams.open(exec(), 1).unwrap();
        streams.close_all();
        assert!(h.events.try_recv().is_err());
        assert!(matches!(streams.open(exec(), 1), Err(OpenError::Gone)));
        assert_eq!(streams.open_count(), 0);
    }

    #[test]
    fn input_waits_for_credit_and_ends_after_its_bytes() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let streams = Arc::new(Streams::new(STREAMS_SINCE, tx));
        let h = streams.open(exec(), 1).unwrap();
        let _open = rx.try_recv();
        let mut input = Input::default();
        input.push(bytes::Bytes::from_static(b"hello")).unwrap();
        input.end().unwrap();
        assert_eq!(
            input.push(bytes::Bytes::from_static(b"x")),
            Err(InputError::AfterEnd)
        );
        assert_eq!(input.end(), Err(InputError::EndedTwice));
        // Nothing goes before the stream started.
        assert!(input.flush(&h));
        assert!(rx.try_recv().is_err());
        assert_eq!(input.credit(3), Ok(true));
        assert!(input.flush(&h));
        assert!(
            matches!(rx.try_recv(), Ok(ServerFrame::StreamData { bytes, .. }) if bytes == b"hel")
        );
        assert!(
            rx.try_recv().is_err(),
            "no end of input before the last bytes"
        );
        assert!(!input.ready());
        assert_eq!(input.credit(10), Ok(false));
        assert!(input.flush(&h));
        assert!(
            matches!(rx.try_recv(), Ok(ServerFrame::StreamData { bytes, .. }) if bytes == b"lo")
        );
        assert!(matches!(rx.try_recv(), Ok(ServerFrame::StreamEof { .. })));
        assert!(input.ready());
        assert!(input.flush(&h));
        assert!(rx.try_recv().is_err(), "the end of input goes once");
    }
}
