//! Session recordings: an interactive session's output (and, when configured, its input) with
//! timings and terminal resizes, as an asciicast v2 file at `sessions/{session_id}.cast` in the
//! object store, which asciinema plays.
//!
//! The file is line-delimited JSON: a header object (`version`, `width`, `height`, `timestamp`,
//! `env`, `title`), then one `[seconds, code, data]` line per event: `"o"` output, `"i"` input
//! (only with `--record-input`: input holds whatever is typed, passwords included), `"r"` a resize
//! (`"COLSxROWS"`). Output bytes are not UTF-8-aligned: an incomplete sequence at a chunk's end is
//! kept for the next chunk, invalid bytes become U+FFFD, so every line is valid JSON.
//!
//! Cost model: the relay hands events to a writer task over a bounded queue ([`QUEUE`] events, each
//! at most one stream frame or client message) and awaits room in it, so a slow object store slows
//! the session (backpressure) instead of growing a buffer. The writer streams the file with
//! `put_multipart` in parts of [`PART_SIZE`] (S3's smallest but the last) and waits for each part
//! before buffering the next: at most one part plus the queue in memory per recorded session. The
//! object exists only once the upload completes, at the session's end; an upload that fails is
//! aborted. Each part and the completion are bounded by [`WRITE_TIMEOUT`].
//!
//! Failure policy (`--recording-failure`): `close` (the default) refuses a session whose recording
//! cannot start and ends one whose recording fails ("recording failed: ..."); `continue` logs the
//! error and runs (or goes on) without a recording, which its record then says `failed`.

use bytes::Bytes;
use fleetrun_proto::api::RecordingStatus;
use object_store::path::Path as ObjectPath;
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, WriteMultipart};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Size of an upload part: S3's smallest part but the last.
pub const PART_SIZE: usize = 5 * 1024 * 1024;
/// Events queued between a relay and its recording's writer.
pub const QUEUE: usize = 16;
/// Longest a part's upload, the completion or an abort may take; then the recording fails.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// The terminal size a recording without one (an exec without a PTY) declares.
pub const DEFAULT_SIZE: (u16, u16) = (80, 24);

/// What to do when a recording cannot be written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnFailure {
    /// Refuse the session, or end it (fail closed).
    #[default]
    Close,
    /// Log it and go on without a recording.
    Continue,
}

impl std::str::FromStr for OnFailure {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "close" => Ok(OnFailure::Close),
            "continue" => Ok(OnFailure::Continue),
            other => Err(format!(
                "{other:?} is not a recording failure policy: use close or continue"
            )),
        }
    }
}

/// The server's recording settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Whether interactive sessions are recorded (on by default).
    pub enabled: bool,
    /// Whether input is recorded too (off by default: it holds typed passwords).
    pub record_input: bool,
    /// What a recording that cannot be written does to its session.
    pub on_failure: OnFailure,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            enabled: true,
            record_input: false,
            on_failure: OnFailure::Close,
        }
    }
}

/// The object a session's recording is kept in.
pub fn object_path(session_id: &str) -> ObjectPath {
    ObjectPath::from(format!("sessions/{session_id}.cast"))
}

/// What a recording's header says.
#[derive(Clone, Debug)]
pub struct Header {
    /// Terminal columns.
    pub width: u16,
    /// Terminal rows.
    pub height: u16,
    /// Start, epoch seconds.
    pub timestamp: i64,
    /// The session's `TERM`, if it has one.
    pub term: Option<String>,
    /// The session's shell, if known.
    pub shell: Option<String>,
    /// A title: who, where, what.
    pub title: String,
}

impl Header {
    /// The header line (without its newline).
    fn line(&self) -> String {
        let mut env = serde_json::Map::new();
        if let Some(t) = &self.term {
            env.insert("TERM".into(), t.clone().into());
        }
        if let Some(s) = &self.shell {
            env.insert("SHELL".into(), s.clone().into());
        }
        serde_json::json!({
            "version": 2, "width": self.width, "height": self.height,
            "timestamp": self.timestamp, "env": env, "title": self.title,
        })
        .to_string()
    }
}

/// A session's recording, as the relay sees it: off, being written, or lost.
pub enum Recording {
    /// This session is not recorded.
    Off,
    /// Being written.
    On(Recorder),
    /// It failed (why); the session goes on without it (`continue`) or is ending (`close`).
    Lost(String),
}

/// How a recording ended, for the session's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not recorded.
    None,
    /// Stored, this many bytes.
    Complete(u64),
    /// Nothing stored: why.
    Failed(String),
}

impl Outcome {
    /// The record's status and size.
    pub fn status(&self) -> (RecordingStatus, u64) {
        match self {
            Outcome::None => (RecordingStatus::None, 0),
            Outcome::Complete(n) => (RecordingStatus::Complete, *n),
            Outcome::Failed(_) => (RecordingStatus::Failed, 0),
        }
    }
}

impl Recording {
    /// Starts recording session `session_id` when `recorded` and recording is on. A recording
    /// that cannot start is an error (the session is to be refused) when failing closed, else
    /// logged and [`Recording::Lost`].
    pub async fn start(
        objects: &dyn ObjectStore,
        settings: Settings,
        recorded: bool,
        session_id: &str,
        header: Header,
    ) -> Result<Recording, String> {
        if !recorded || !settings.enabled {
            return Ok(Recording::Off);
        }
        let path = object_path(session_id);
        let upload = tokio::time::timeout(WRITE_TIMEOUT, objects.put_multipart(&path))
            .await
            .map_err(|_| format!("the object store took over {WRITE_TIMEOUT:?}"))
            .and_then(|r| r.map_err(|e| e.to_string()));
        match upload {
            Ok(upload) => Ok(Recording::On(Recorder::new(
                upload, PART_SIZE, header, settings,
            ))),
            Err(e) => {
                let why = format!("cannot start the session's recording: {e}");
                match settings.on_failure {
                    OnFailure::Close => Err(why),
                    OnFailure::Continue => {
                        tracing::error!(
                            session = session_id,
                            "{why}; the session goes on unrecorded"
                        );
                        Ok(Recording::Lost(why))
                    }
                }
            }
        }
    }

    /// The status the session's record starts with.
    pub fn status(&self) -> RecordingStatus {
        match self {
            Recording::Off => RecordingStatus::None,
            Recording::On(_) => RecordingStatus::Recording,
            Recording::Lost(_) => RecordingStatus::Failed,
        }
    }

    /// Records output; an error (the session is to end with it) when the recording failed and
    /// failing closed.
    pub async fn output(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.event(|r| Some(Event::Output(r.now(), Bytes::copy_from_slice(bytes))))
            .await
    }

    /// Records input, when input is recorded; errors as [`Recording::output`].
    pub async fn input(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.event(|r| {
            r.settings
                .record_input
                .then(|| Event::Input(r.now(), Bytes::copy_from_slice(bytes)))
        })
        .await
    }

    /// Records a terminal resize; errors as [`Recording::output`].
    pub async fn resize(&mut self, cols: u16, rows: u16) -> Result<(), String> {
        self.event(|r| Some(Event::Resize(r.now(), cols, rows)))
            .await
    }

    async fn event(&mut self, make: impl FnOnce(&Recorder) -> Option<Event>) -> Result<(), String> {
        let Recording::On(r) = self else {
            return Ok(());
        };
        let Some(event) = make(r) else {
            return Ok(());
        };
        if r.tx.send(event).await.is_ok() {
            return Ok(());
        }
        // The writer stopped: it failed.
        let Recording::On(r) = std::mem::replace(self, Recording::Off) else {
            return Ok(());
        };
        let why = match r.writer.await {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => "the writer ended early".into(),
            Err(e) => format!("the writer failed: {e}"),
        };
        let why = format!("recording failed: {why}");
        let policy = r.settings.on_failure;
        *self = Recording::Lost(why.clone());
        match policy {
            OnFailure::Close => Err(why),
            OnFailure::Continue => {
                tracing::error!("{why}; the session goes on unrecorded");
                Ok(())
            }
        }
    }

    /// Completes the recording (the object then exists); an upload that fails is aborted.
    pub async fn finish(self) -> Outcome {
        match self {
            Recording::Off => Outcome::None,
            Recording::Lost(why) => Outcome::Failed(why),
            Recording::On(r) => {
                drop(r.tx);
                match r.writer.await {
                    Ok(Ok(n)) => Outcome::Complete(n),
                    Ok(Err(e)) => Outcome::Failed(format!("recording failed: {e}")),
                    Err(e) => Outcome::Failed(format!("recording failed: {e}")),
                }
            }
        }
    }

    /// Drops the recording of a session that never started: the upload is aborted, nothing stored.
    pub async fn abort(self) {
        if let Recording::On(r) = self
            && r.tx.send(Event::Abort).await.is_ok()
        {
            let _ = r.writer.await;
        }
    }
}

/// One event, stamped with its time from the recording's start.
#[derive(Debug)]
enum Event {
    Output(f64, Bytes),
    Input(f64, Bytes),
    Resize(f64, u16, u16),
    /// Drop the upload.
    Abort,
}

/// A recording being written: the queue to its writer task.
pub struct Recorder {
    tx: mpsc::Sender<Event>,
    writer: JoinHandle<Result<u64, String>>,
    started: Instant,
    settings: Settings,
}

impl Recorder {
    fn new(
        upload: Box<dyn MultipartUpload>,
        part_size: usize,
        header: Header,
        settings: Settings,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let upload = WriteMultipart::new_with_chunk_size(upload, part_size);
        let writer = tokio::spawn(write(upload, header.line(), rx));
        Recorder {
            tx,
            writer,
            started: Instant::now(),
            settings,
        }
    }

    /// Seconds since the start, to the microsecond (monotonic: the clock is `Instant`).
    fn now(&self) -> f64 {
        (self.started.elapsed().as_micros() as f64) / 1e6
    }
}

/// The writer task: turns events into lines and streams them into the upload; returns the bytes
/// written once it completed, or why it failed (the upload then aborted).
async fn write(
    mut upload: WriteMultipart,
    header: String,
    mut rx: mpsc::Receiver<Event>,
) -> Result<u64, String> {
    let mut lines = Lines::default();
    let mut written = 0u64;
    let mut put = async |upload: &mut WriteMultipart, line: String| -> Result<(), String> {
        upload.write(line.as_bytes());
        upload.write(b"\n");
        written += line.len() as u64 + 1;
        // Waits for the part this may have started: errors surface here, memory stays bounded.
        bounded(upload.wait_for_capacity(1)).await
    };
    let mut r = put(&mut upload, header).await;
    while r.is_ok() {
        let Some(event) = rx.recv().await else { break };
        let line = match event {
            Event::Output(t, b) => lines.output(t, &b),
            Event::Input(t, b) => lines.input(t, &b),
            Event::Resize(t, c, rows) => Some(lines.resize(t, c, rows)),
            Event::Abort => {
                let _ = bounded(upload.abort()).await;
                return Err("aborted".into());
            }
        };
        if let Some(line) = line {
            r = put(&mut upload, line).await;
        }
    }
    for line in lines.finish() {
        if r.is_ok() {
            r = put(&mut upload, line).await;
        }
    }
    if let Err(e) = r {
        let _ = bounded(upload.abort()).await;
        return Err(e);
    }
    bounded(upload.finish()).await?;
    Ok(written)
}

/// An object store call within [`WRITE_TIMEOUT`], its error as text.
async fn bounded<T>(
    f: impl std::future::Future<Output = object_store::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(WRITE_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "the object store took over {} s",
            WRITE_TIMEOUT.as_secs()
        )),
    }
}

/// Events as asciicast lines: output and input decoded to text across chunk boundaries, times
/// never going back.
#[derive(Default)]
struct Lines {
    out: Utf8Carry,
    input: Utf8Carry,
    last: f64,
}

impl Lines {
    fn output(&mut self, t: f64, bytes: &[u8]) -> Option<String> {
        let text = self.out.push(bytes);
        (!text.is_empty()).then(|| self.line(t, "o", &text))
    }

    fn input(&mut self, t: f64, bytes: &[u8]) -> Option<String> {
        let text = self.input.push(bytes);
        (!text.is_empty()).then(|| self.line(t, "i", &text))
    }

    fn resize(&mut self, t: f64, cols: u16, rows: u16) -> String {
        self.line(t, "r", &format!("{cols}x{rows}"))
    }

    /// The held-back tails (incomplete sequences at the end), as replacement characters.
    fn finish(&mut self) -> Vec<String> {
        let t = self.last;
        let mut lines = Vec::new();
        let out = self.out.finish();
        if !out.is_empty() {
            lines.push(self.line(t, "o", &out));
        }
        let input = self.input.finish();
        if !input.is_empty() {
            lines.push(self.line(t, "i", &input));
        }
        lines
    }

    fn line(&mut self, t: f64, code: &str, data: &str) -> String {
        self.last = self.last.max(t);
        serde_json::json!([self.last, code, data]).to_string()
    }
}

/// Bytes to text across chunks: an incomplete UTF-8 sequence at a chunk's end (at most 3 bytes)
/// waits for the next chunk; invalid bytes become U+FFFD.
#[derive(Default)]
struct Utf8Carry {
    tail: Vec<u8>,
}

impl Utf8Carry {
    fn push(&mut self, chunk: &[u8]) -> String {
        let mut joined;
        let mut rest = if self.tail.is_empty() {
            chunk
        } else {
            joined = std::mem::take(&mut self.tail);
            joined.extend_from_slice(chunk);
            &joined[..]
        };
        let mut out = String::with_capacity(rest.len());
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    return out;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    out.push_str(&String::from_utf8_lossy(good));
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &bad[n..];
                        }
                        None => {
                            self.tail = bad.to_vec();
                            return out;
                        }
                    }
                }
            }
        }
    }

    fn finish(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.tail)).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::{PutPayload, PutResult, UploadPart};
    use parking_lot::Mutex;
    use std::sync::Arc;

    fn header() -> Header {
        Header {
            width: 100,
            height: 30,
            timestamp: 1_700_000_000,
            term: Some("xterm-256color".into()),
            shell: Some("/bin/bash".into()),
            title: "admin@web-1: bash".into(),
        }
    }

    fn settings(record_input: bool) -> Settings {
        Settings {
            record_input,
            ..Settings::default()
        }
    }

    /// The lines of a stored recording, parsed.
    async fn stored(objects: &InMemory, id: &str) -> Vec<serde_json::Value> {
        let bytes = objects
            .get(&object_path(id))
            .await
            .expect("the object")
            .bytes()
            .await
            .expect("its bytes");
        let text = std::str::from_utf8(&bytes).expect("UTF-8");
        assert!(text.ends_with('\n'), "{text:?}");
        text.lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    /// The "o" data of a recording, concatenated.
    fn output_of(lines: &[serde_json::Value]) -> String {
        lines[1..]
            .iter()
            .filter(|l| l[1] == "o")
            .map(|l| l[2].as_str().expect("text"))
            .collect()
    }

    #[tokio::test]
    async fn utf8_split_across_chunks_and_invalid_bytes_make_valid_lines() {
        let objects = InMemory::new();
        let mut rec = Recording::start(&objects, settings(false), true, "s1", header())
            .await
            .expect("start");
        assert_eq!(rec.status(), RecordingStatus::Recording);
        // "héllo €" with é and € cut across chunks, then invalid bytes, then a cut at the very end.
        let text = "héllo € ok".as_bytes();
        let (a, b) = text.split_at(2); // inside é
        let (b, c) = b.split_at(6); // inside €
        for chunk in [a, b, c, b"\xff\xfe bad ", b"\xe2\x82"] {
            rec.output(chunk).await.expect("output");
        }
        let Outcome::Complete(size) = rec.finish().await else {
            panic!("not complete")
        };
        let lines = stored(&objects, "s1").await;
        let h = &lines[0];
        assert_eq!(
            (&h["version"], &h["width"], &h["height"]),
            (&2.into(), &100.into(), &30.into())
        );
        assert_eq!(h["env"]["TERM"], "xterm-256color");
        assert_eq!(h["env"]["SHELL"], "/bin/bash");
        assert_eq!(h["title"], "admin@web-1: bash");
        assert_eq!(h["timestamp"], 1_700_000_000);
        assert_eq!(output_of(&lines), "héllo € ok\u{fffd}\u{fffd} bad \u{fffd}");
        // No line holds half a character: each one's data is whole text.
        assert!(lines[1..].iter().all(|l| l[1] == "o"));
        let meta = objects.head(&object_path("s1")).await.expect("head");
        assert_eq!(meta.size, size);
    }

    #[tokio::test]
    async fn resizes_and_monotone_timings_and_input_only_when_enabled() {
        for record_input in [false, true] {
            let objects = InMemory::new();
            let mut rec = Recording::start(&objects, settings(record_input), true, "s", header())
                .await
                .expect("start");
            rec.output(b"$ ").await.expect("output");
            rec.input(b"secret\r").await.expect("input");
            tokio::time::sleep(Duration::from_millis(20)).await;
            rec.resize(120, 40).await.expect("resize");
            rec.output(b"done\r\n").await.expect("output");
            assert!(matches!(rec.finish().await, Outcome::Complete(_)));
            let lines = stored(&objects, "s").await;
            let codes: Vec<&str> = lines[1..]
                .iter()
                .map(|l| l[1].as_str().expect("code"))
                .collect();
            if record_input {
                assert_eq!(codes, ["o", "i", "r", "o"]);
                assert_eq!(lines[2][2], "secret\r");
            } else {
                assert_eq!(codes, ["o", "r", "o"]);
                let all = lines.iter().map(|l| l.to_string()).collect::<String>();
                assert!(!all.contains("secret"), "{all}");
            }
            let resize = lines.iter().find(|l| l[1] == "r").expect("resize");
            assert_eq!(resize[2], "120x40");
            let times: Vec<f64> = lines[1..]
                .iter()
                .map(|l| l[0].as_f64().expect("time"))
                .collect();
            assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
            assert!(times[times.len() - 1] - times[0] >= 0.02, "{times:?}");
        }
    }

    #[tokio::test]
    async fn off_records_nothing_and_an_abort_stores_nothing() {
        let objects = InMemory::new();
        let off = Settings {
            enabled: false,
            ..Settings::default()
        };
        let mut rec = Recording::start(&objects, off, true, "off", header())
            .await
            .expect("start");
        rec.output(b"x").await.expect("output");
        assert_eq!(rec.status(), RecordingStatus::None);
        assert_eq!(rec.finish().await, Outcome::None);
        let rec = Recording::start(&objects, settings(false), false, "unrecorded", header())
            .await
            .expect("start");
        assert_eq!(rec.finish().await, Outcome::None);
        let mut rec = Recording::start(&objects, settings(false), true, "aborted", header())
            .await
            .expect("start");
        rec.output(b"x").await.expect("output");
        rec.abort().await;
        for id in ["off", "unrecorded", "aborted"] {
            assert!(objects.head(&object_path(id)).await.is_err(), "{id}");
        }
    }

    /// A multipart upload into a real in-memory store that notes each part's size, how many are in
    /// flight at once, and fails from part `fail_at` on.
    #[derive(Debug)]
    struct Watched {
        inner: Box<dyn MultipartUpload>,
        seen: Arc<Mutex<Seen>>,
        fail_at: usize,
    }

    #[derive(Debug, Default)]
    struct Seen {
        parts: Vec<usize>,
        in_flight: usize,
        max_in_flight: usize,
        aborted: bool,
    }

    #[async_trait::async_trait]
    impl MultipartUpload for Watched {
        fn put_part(&mut self, data: PutPayload) -> UploadPart {
            let seen = self.seen.clone();
            let n = {
                let mut s = seen.lock();
                s.parts.push(data.content_length());
                s.in_flight += 1;
                s.max_in_flight = s.max_in_flight.max(s.in_flight);
                s.parts.len()
            };
            let fail = n >= self.fail_at;
            let part = self.inner.put_part(data);
            Box::pin(async move {
                // Slow enough that a writer that did not wait would have several in flight.
                tokio::time::sleep(Duration::from_millis(5)).await;
                let r = if fail {
                    Err(object_store::Error::Generic {
                        store: "test",
                        source: "disk full".into(),
                    })
                } else {
                    part.await
                };
                seen.lock().in_flight -= 1;
                r
            })
        }

        async fn complete(&mut self) -> object_store::Result<PutResult> {
            self.inner.complete().await
        }

        async fn abort(&mut self) -> object_store::Result<()> {
            self.seen.lock().aborted = true;
            self.inner.abort().await
        }
    }

    async fn watched(
        objects: &InMemory,
        id: &str,
        part: usize,
        fail_at: usize,
        settings: Settings,
    ) -> (Recording, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let inner = objects
            .put_multipart(&object_path(id))
            .await
            .expect("upload");
        let upload = Box::new(Watched {
            inner,
            seen: seen.clone(),
            fail_at,
        });
        let rec = Recorder::new(upload, part, header(), settings);
        (Recording::On(rec), seen)
    }

    #[tokio::test]
    async fn the_upload_goes_in_parts_one_at_a_time() {
        let objects = InMemory::new();
        let (mut rec, seen) = watched(&objects, "big", 1024, usize::MAX, settings(false)).await;
        let chunk = vec![b'x'; 300];
        for _ in 0..100 {
            rec.output(&chunk).await.expect("output");
        }
        let Outcome::Complete(size) = rec.finish().await else {
            panic!("not complete")
        };
        let lines = stored(&objects, "big").await;
        assert_eq!(output_of(&lines), "x".repeat(30_000));
        let seen = seen.lock();
        assert!(seen.parts.len() >= 30, "{:?}", seen.parts);
        let (last, full) = seen.parts.split_last().expect("parts");
        assert!(full.iter().all(|&n| n == 1024), "{:?}", seen.parts);
        assert!(*last <= 1024);
        assert_eq!(seen.max_in_flight, 1, "one part in flight at a time");
        assert_eq!(seen.parts.iter().sum::<usize>() as u64, size);
    }

    #[tokio::test]
    async fn a_write_failure_ends_the_session_when_failing_closed_and_not_when_going_on() {
        for policy in [OnFailure::Close, OnFailure::Continue] {
            let objects = InMemory::new();
            let s = Settings {
                on_failure: policy,
                ..Settings::default()
            };
            let (mut rec, seen) = watched(&objects, "fails", 256, 2, s).await;
            let mut result = Ok(());
            for _ in 0..200 {
                result = rec.output(&[b'y'; 100]).await;
                if result.is_err() {
                    break;
                }
            }
            match policy {
                OnFailure::Close => {
                    let e = result.expect_err("the session is to end");
                    assert!(e.starts_with("recording failed: "), "{e}");
                    assert!(e.contains("disk full"), "{e}");
                }
                OnFailure::Continue => {
                    result.expect("goes on");
                    assert_eq!(rec.status(), RecordingStatus::Failed);
                }
            }
            let Outcome::Failed(why) = rec.finish().await else {
                panic!("not failed")
            };
            assert!(why.contains("disk full"), "{why}");
            assert!(seen.lock().aborted, "the upload is aborted");
            assert!(objects.head(&object_path("fails")).await.is_err());
        }
    }

    #[test]
    fn utf8_carry_keeps_at_most_an_incomplete_sequence() {
        let mut c = Utf8Carry::default();
        // A 4-byte character one byte at a time.
        let crab = "🦀".as_bytes();
        for b in &crab[..3] {
            assert_eq!(c.push(std::slice::from_ref(b)), "");
            assert!(c.tail.len() <= 3);
        }
        assert_eq!(c.push(&crab[3..]), "🦀");
        // A lone continuation byte is invalid at once, not held.
        assert_eq!(c.push(b"\x80a"), "\u{fffd}a");
        assert!(c.tail.is_empty());
        assert_eq!(c.push(b"\xf0\x9f"), "");
        assert_eq!(c.finish(), "\u{fffd}");
    }

    #[test]
    fn failure_policies_parse_or_say_what_is_allowed() {
        assert_eq!("close".parse::<OnFailure>(), Ok(OnFailure::Close));
        assert_eq!(" continue".parse::<OnFailure>(), Ok(OnFailure::Continue));
        let e = "ignore".parse::<OnFailure>().unwrap_err();
        assert!(e.contains("close or continue"), "{e}");
    }
}
