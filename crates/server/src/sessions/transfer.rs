//! Session streams driven by the server itself (no client socket): a one-shot command
//! ([`exec_oneshot`]), an object of the store put to a node's file ([`put_object`]) and a node's
//! file got into an object ([`get_object`]). They ride the same streams, credits and agent code
//! as `fleetrun exec` and `fleetrun cp`; the saved script runner uses them. Bytes are streamed
//! chunk by chunk within the stream's window, never whole in memory, and every wait on the agent
//! has a timeout.

use super::streams::{AgentEvent, Input, StreamHandle, Streams};
use fleetrun_proto::limits::STREAM_FRAME_MAX;
use fleetrun_proto::stream::{STREAM_WINDOW_BULK, StreamKind};
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Output a one-shot command may print before it is cut off (it is a helper, not a job).
pub const ONESHOT_OUTPUT_MAX: usize = 64 * 1024;

/// What a one-shot command did.
#[derive(Debug)]
pub struct Oneshot {
    /// Its exit code (128 + signal for a signal).
    pub code: i32,
    /// Its stdout and stderr, interleaved, at most [`ONESHOT_OUTPUT_MAX`] bytes.
    pub output: Vec<u8>,
}

impl Oneshot {
    /// The output as text, trimmed.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).trim().to_owned()
    }
}

fn open(streams: &Arc<Streams>, kind: StreamKind) -> Result<StreamHandle, String> {
    streams
        .open(kind, STREAM_WINDOW_BULK)
        .map_err(|e| e.to_string())
}

/// The next event within `limit`; an error naming `what` otherwise or when the agent left.
async fn next(
    stream: &mut StreamHandle,
    limit: Duration,
    what: &str,
) -> Result<AgentEvent, String> {
    match tokio::time::timeout(limit, stream.next()).await {
        Err(_) => {
            stream.close("timed out");
            Err(format!(
                "{what}: no word from the node's agent within {} s",
                limit.as_secs()
            ))
        }
        Ok(None) => Err(format!("{what}: the node's agent disconnected")),
        Ok(Some(e)) => Ok(e),
    }
}

/// Runs `command` with `sh -c` on the node as `run_as` (the agent's user when `None`), with no
/// input, and waits for it to end, at most `limit` in all.
pub async fn exec_oneshot(
    streams: &Arc<Streams>,
    command: String,
    run_as: Option<String>,
    limit: Duration,
) -> Result<Oneshot, String> {
    let kind = StreamKind::Exec {
        command,
        run_as,
        env: vec![],
        working_dir: String::new(),
        pty: false,
    };
    let mut stream = open(streams, kind)?;
    let deadline = Instant::now() + limit;
    let mut output = Vec::new();
    let mut code = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next(&mut stream, left, "a helper command").await? {
            AgentEvent::Credit(_) => stream.send_eof(),
            AgentEvent::Data(_, bytes) => {
                let room = ONESHOT_OUTPUT_MAX.saturating_sub(output.len());
                output.extend_from_slice(&bytes[..bytes.len().min(room)]);
                stream.consumed(bytes.len());
            }
            AgentEvent::Exit { code: c, .. } => code = Some(c),
            AgentEvent::Close(error) => {
                return match (code, error) {
                    (Some(code), None) => Ok(Oneshot { code, output }),
                    (_, Some(e)) => Err(format!("a helper command: {e}")),
                    (None, None) => Err("a helper command ended without an exit code".into()),
                };
            }
            AgentEvent::FileInfo { .. } | AgentEvent::FileDone(_) => {
                stream.close("file frames on an exec stream");
                return Err("a helper command: the agent sent file frames".into());
            }
        }
    }
}

/// What a file put writes on the node.
pub struct PutTarget {
    /// Absolute path.
    pub path: String,
    /// Permission bits.
    pub mode: u32,
    /// Owner (a root agent only), `None` for the agent's user.
    pub owner: Option<String>,
}

/// Streams the object at `source` (`size` bytes, SHA-256 `sha256`) to `target` on the node; the
/// agent writes a temp file beside it, checks the hash and renames. `idle` bounds every wait.
pub async fn put_object(
    streams: &Arc<Streams>,
    objects: &dyn ObjectStore,
    source: &ObjectPath,
    size: u64,
    sha256: &str,
    target: PutTarget,
    idle: Duration,
) -> Result<(), String> {
    let kind = StreamKind::FilePut {
        path: target.path.clone(),
        mode: Some(target.mode),
        owner: target.owner,
        group: None,
        size,
        sha256: sha256.to_owned(),
        resume: false,
        parents: false,
    };
    let what = format!("putting {}", target.path);
    let mut stream = open(streams, kind)?;
    let mut held: Option<bytes::Bytes> = None;
    let mut chunks = objects
        .get(source)
        .await
        .map_err(|e| format!("{what}: cannot read {source}: {e}"))?
        .into_stream();
    let mut input = Input::default();
    let mut started = false;
    let mut ended = false;
    let mut done = None;
    loop {
        if !input.flush(&stream) {
            return Err(format!("{what}: the node's agent disconnected"));
        }
        if started && input.ready() && !ended {
            // The next frame's worth, gathered from the store's chunks (small ones would make
            // a frame each).
            let mut frame = bytes::BytesMut::new();
            while frame.len() < STREAM_FRAME_MAX {
                let chunk = match held.take() {
                    Some(c) => c,
                    None => match tokio::time::timeout(idle, chunks.next()).await {
                        Err(_) => return Err(format!("{what}: reading {source} timed out")),
                        Ok(Some(Ok(c))) => c,
                        Ok(Some(Err(e))) => return Err(format!("{what}: reading {source}: {e}")),
                        Ok(None) => {
                            ended = true;
                            break;
                        }
                    },
                };
                let room = STREAM_FRAME_MAX - frame.len();
                if chunk.len() > room {
                    let mut chunk = chunk;
                    held = Some(chunk.split_off(room));
                    frame.extend_from_slice(&chunk);
                } else {
                    frame.extend_from_slice(&chunk);
                }
            }
            if !frame.is_empty() {
                input
                    .push(frame.freeze())
                    .map_err(|e| format!("{what}: {e:?}"))?;
            }
            if ended {
                input.end().map_err(|e| format!("{what}: {e:?}"))?;
            }
            continue;
        }
        match next(&mut stream, idle, &what).await? {
            AgentEvent::Credit(n) => {
                started |= input.credit(n).map_err(|e| format!("{what}: {e}"))?;
            }
            AgentEvent::FileDone(sha) => done = Some(sha),
            AgentEvent::Close(Some(e)) => return Err(format!("{what}: {e}")),
            AgentEvent::Close(None) => {
                return match done {
                    Some(s) if s == sha256 => Ok(()),
                    Some(s) => Err(format!("{what}: the node wrote SHA-256 {s}, not {sha256}")),
                    None => Err(format!(
                        "{what}: the agent ended the put without finishing it"
                    )),
                };
            }
            AgentEvent::Data(..) => {
                stream.close("bytes on a put");
                return Err(format!("{what}: the agent sent bytes on a put"));
            }
            AgentEvent::FileInfo { .. } | AgentEvent::Exit { .. } => {}
        }
    }
}

/// Why a get stored nothing.
#[derive(Debug)]
pub enum GetError {
    /// The file is larger than the limit.
    TooLarge(u64),
    /// Anything else, said.
    Failed(String),
}

/// Streams the file at `path` on the node into the object at `dest`, at most `max` bytes: its
/// size and SHA-256 (checked against the agent's). `idle` bounds every wait.
pub async fn get_object(
    streams: &Arc<Streams>,
    objects: &dyn ObjectStore,
    path: &str,
    dest: &ObjectPath,
    max: u64,
    idle: Duration,
) -> Result<(u64, String), GetError> {
    let what = format!("getting {path}");
    let kind = StreamKind::FileGet {
        path: path.to_owned(),
        offset: 0,
    };
    let mut stream = open(streams, kind).map_err(GetError::Failed)?;
    // The file's size comes first: too large is refused before a byte moves.
    let size = loop {
        match next(&mut stream, idle, &what)
            .await
            .map_err(GetError::Failed)?
        {
            AgentEvent::FileInfo { size, .. } => break size,
            AgentEvent::Close(e) => {
                let e = e.unwrap_or_else(|| "the agent ended the get".into());
                return Err(GetError::Failed(e));
            }
            _ => {}
        }
    };
    if size > max {
        stream.close("too large");
        return Err(GetError::TooLarge(size));
    }
    let agent_sha: Arc<parking_lot::Mutex<Option<String>>> = Arc::default();
    let seen = agent_sha.clone();
    let what2 = what.clone();
    let chunks = futures_util::stream::unfold(Some(stream), move |s| {
        let seen = seen.clone();
        let what = what2.clone();
        async move {
            let mut stream = s?;
            loop {
                match next(&mut stream, idle, &what).await {
                    Err(e) => return Some((Err(e), None)),
                    Ok(AgentEvent::Data(_, bytes)) => {
                        stream.consumed(bytes.len());
                        return Some((Ok(bytes::Bytes::from(bytes)), Some(stream)));
                    }
                    Ok(AgentEvent::FileDone(sha)) => *seen.lock() = Some(sha),
                    Ok(AgentEvent::Close(None)) if seen.lock().is_some() => return None,
                    Ok(AgentEvent::Close(e)) => {
                        let e = e.unwrap_or_else(|| "the agent ended the get unfinished".into());
                        return Some((Err(format!("{what}: {e}")), None));
                    }
                    Ok(_) => {}
                }
            }
        }
    });
    let written = crate::objects::write_streamed(objects, dest, Box::pin(chunks), max).await;
    let (got, sha) = written.map_err(|e| match e {
        crate::objects::WriteError::Source(e) => GetError::Failed(e),
        crate::objects::WriteError::TooLarge => GetError::TooLarge(max.saturating_add(1)),
        crate::objects::WriteError::Store(e) => {
            GetError::Failed(format!("{what}: the object store did not take it: {e}"))
        }
    })?;
    let agent = agent_sha.lock().clone();
    if agent.as_deref() != Some(sha.as_str()) || got != size {
        let _ = objects.delete(dest).await;
        return Err(GetError::Failed(format!(
            "{what}: {got} bytes with SHA-256 {sha} arrived; the node said {size} bytes, {}",
            agent.unwrap_or_default()
        )));
    }
    Ok((got, sha))
}
