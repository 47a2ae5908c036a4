//! File transfers (`fleetrun cp`): `GET /v1/nodes/{node_id}/files/put?path=&size=&key=...`
//! (or `&sha256=` instead of `key`), `GET /v1/nodes/{node_id}/files/get?path=&offset=` and
//! `GET /v1/nodes/{node_id}/files/list?path=` (the tree `cp -r` copies down, protocol version 6),
//! WebSockets speaking the exec socket's messages (`fleetrun_proto::stream::client`) over one
//! `FilePut` / `FileGet` / `FileList` session stream on the node's connection (protocol version
//! 5). Authorized by the `cp` action on the node (tag conditions apply as for `shell`); each is
//! audited as `cp.put` / `cp.get` / `cp.list` with node, path, size, SHA-256 and outcome.
//!
//! A list relays the agent's records (binary tag 1) and ends, as an exec does, with
//! `{"type":"exit","code":0}` and a normal close.
//!
//! A put names its hash up front (`sha256=`, the client hashed the file first; ends with
//! `{"type":"eof"}`) or a resume key (`key=`, since protocol version 6): the client then sends at
//! once, hashing as it goes, and ends with the trailer `{"type":"end","size":N,"sha256":H}`. The
//! relay checks the trailer (the size it declared, the bytes it sent) and hands the hash to the
//! agent as the stream's last 32 bytes of input (`fleetrun_proto::stream::PutHash`), which the
//! agent checks before its rename.
//!
//! Flow control as for exec: the agent's output credit goes back only once the client's socket
//! took the bytes, and the client's next message is read only when the agent's credit took the
//! last, so a transfer holds at most one window per direction here.

use super::exec::{Sink, Source, refuse, text};
use super::streams::{AgentEvent, Input, OpenError, StreamHandle, Streams};
use crate::AppState;
use crate::access::audit as trail;
use crate::access::authz::{Action, Principal};
use crate::api::{ApiError, parse_id};
use crate::errors::Code;
use axum::Extension;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::response::Response;
use fleetrun_proto::NodeId;
use fleetrun_proto::stream::client::{
    CLIENT_MESSAGE_MAX, ClientEvent, ServerEvent, TAG_STDIN, TAG_STDOUT,
};
use fleetrun_proto::stream::{
    FILE_TRAILER_LEN, PutHash, STREAM_WINDOW_BULK, StreamKind, check_file_key, check_sha256,
};
use fleetrun_proto::time::now_ms;
use fleetrun_store::AuditEntry;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::time::Instant;

/// Output credit per transfer: what the server may hold of a get's bytes for a slow client.
pub const OUTPUT_WINDOW: u64 = STREAM_WINDOW_BULK;

/// A put's query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutQuery {
    /// Absolute path on the node.
    path: String,
    /// The file's length.
    size: u64,
    /// Its SHA-256, 64 lowercase hex digits, when the client has it before the bytes.
    sha256: Option<String>,
    /// Instead of `sha256`: 16 lowercase hex digits naming this version of the client's file (a
    /// retry with the same key resumes); the hash then comes in the trailer.
    key: Option<String>,
    /// Permission bits in octal (`0755`).
    mode: Option<String>,
    /// Owner, a user name or uid.
    owner: Option<String>,
    /// Group, a name or gid.
    group: Option<String>,
    /// Continue a partial file an earlier put of the same file left.
    #[serde(default)]
    resume: bool,
    /// Create missing parent directories (`cp -r`).
    #[serde(default)]
    parents: bool,
}

/// A get's query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetQuery {
    /// Absolute path on the node.
    path: String,
    /// Where to start (a resumed download).
    #[serde(default)]
    offset: u64,
}

/// A list's query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Absolute path of the directory on the node.
    path: String,
}

type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

fn bad_query<T>(q: QueryResult<T>, what: &str) -> Result<T, ApiError> {
    q.map(|Query(q)| q).map_err(|e| {
        ApiError::new(
            Code::InvalidParameters,
            format!("a file {what} needs {}", e.body_text()),
        )
    })
}

/// Upgrades to a put's socket once the caller may copy files to the node and its agent speaks
/// file transfers.
pub async fn put(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(node_id): Path<String>,
    q: QueryResult<PutQuery>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let node: NodeId = parse_id(&node_id, Code::InvalidNodeId)?;
    let q = bad_query(q, "put")?;
    let mode = match q.mode.as_deref() {
        None | Some("") => None,
        Some(m) => Some(u32::from_str_radix(m, 8).map_err(|_| {
            ApiError::new(
                Code::InvalidParameters,
                format!("bad mode {m:?} (octal permission bits, e.g. 0755)"),
            )
        })?),
    };
    let empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let hash = match (empty(q.sha256.clone()), empty(q.key.clone())) {
        (Some(sha256), None) => {
            check_sha256(&sha256).map_err(|e| ApiError::new(Code::InvalidParameters, e))?;
            sha256
        }
        (None, Some(key)) => {
            check_file_key(&key).map_err(|e| ApiError::new(Code::InvalidParameters, e))?;
            key
        }
        _ => {
            return Err(ApiError::new(
                Code::InvalidParameters,
                "a file put needs one of sha256= (the file's SHA-256, before its bytes) and key= (16 hex digits naming this version of the file; the hash then follows the bytes)",
            ));
        }
    };
    let kind = StreamKind::FilePut {
        path: q.path.clone(),
        mode,
        owner: empty(q.owner.clone()),
        group: empty(q.group.clone()),
        size: q.size,
        sha256: hash,
        resume: q.resume,
        parents: q.parents,
    };
    let params = serde_json::json!({
        "path": q.path, "size": q.size, "sha256": q.sha256, "key": q.key,
        "mode": mode.map(|m| format!("{m:04o}")),
        "owner": q.owner, "group": q.group, "resume": q.resume, "parents": q.parents,
    });
    start(state, p, node, addr, ws, kind, params, "cp.put").await
}

/// Upgrades to a get's socket once the caller may copy files from the node and its agent speaks
/// file transfers.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(node_id): Path<String>,
    q: QueryResult<GetQuery>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let node: NodeId = parse_id(&node_id, Code::InvalidNodeId)?;
    let q = bad_query(q, "get")?;
    let kind = StreamKind::FileGet {
        path: q.path.clone(),
        offset: q.offset,
    };
    let params = serde_json::json!({ "path": q.path, "offset": q.offset });
    start(state, p, node, addr, ws, kind, params, "cp.get").await
}

/// Upgrades to a list's socket once the caller may copy files from the node and its agent
/// lists directories (version 6).
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(node_id): Path<String>,
    q: QueryResult<ListQuery>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let node: NodeId = parse_id(&node_id, Code::InvalidNodeId)?;
    let q = bad_query(q, "list")?;
    let params = serde_json::json!({ "path": q.path });
    let kind = StreamKind::FileList { path: q.path };
    start(state, p, node, addr, ws, kind, params, "cp.list").await
}

/// A transfer, for its relay and the audit trail.
struct Transfer {
    state: Arc<AppState>,
    principal: String,
    source: String,
    node: NodeId,
    action: &'static str,
    params: serde_json::Value,
}

#[allow(clippy::too_many_arguments)]
async fn start(
    state: Arc<AppState>,
    p: Principal,
    node: NodeId,
    addr: SocketAddr,
    ws: WebSocketUpgrade,
    kind: StreamKind,
    params: serde_json::Value,
    action: &'static str,
) -> Result<Response, ApiError> {
    kind.check()
        .map_err(|e| ApiError::new(Code::InvalidParameters, e))?;
    state
        .authz
        .require_node(&state.store, &p, Action::Cp, &node)
        .await?;
    let transfer = Transfer {
        state: state.clone(),
        principal: p.name().to_owned(),
        source: addr.to_string(),
        node: node.clone(),
        action,
        params,
    };
    let Some(streams) = state.hub.streams(&node) else {
        let known = state
            .store
            .node_refs(Some(std::slice::from_ref(&node)))
            .await?;
        if known.is_empty() {
            return Err(ApiError::new(Code::NodeNotFound, format!("no node {node}")));
        }
        let message = format!("node {node} is not connected");
        transfer.audit(serde_json::json!({}), &message).await;
        return Err(ApiError::new(Code::Unavailable, message));
    };
    if streams.version() < kind.since() {
        let message = match &kind {
            StreamKind::FilePut { .. }
                if streams.version() >= fleetrun_proto::version::FILES_SINCE =>
            {
                format!(
                    "the node's agent speaks channel protocol version {}, which takes a file's SHA-256 only before its bytes: put with sha256= (or upgrade the agent)",
                    streams.version()
                )
            }
            _ => OpenError::KindTooNew {
                kind: kind.name(),
                since: kind.since(),
                version: streams.version(),
            }
            .to_string(),
        };
        transfer.audit(serde_json::json!({}), &message).await;
        return Err(ApiError::new(Code::Unavailable, message));
    }
    Ok(ws
        .max_message_size(CLIENT_MESSAGE_MAX)
        .max_frame_size(CLIENT_MESSAGE_MAX)
        .on_upgrade(move |socket| transfer.run(socket, streams, kind)))
}

/// How a transfer ended.
#[derive(Default)]
struct Ended {
    /// The whole file's SHA-256, when it succeeded.
    done: Option<String>,
    error: Option<String>,
    /// The file's size and the offset its bytes started at, once the agent said.
    info: Option<(u64, u64)>,
    bytes: u64,
    /// A list's exit status, once the agent said.
    exit: Option<i32>,
}

impl Ended {
    /// Whether the agent finished: a transfer with its hash, a list with exit status 0.
    fn finished(&self, is_list: bool) -> bool {
        self.error.is_none()
            && if is_list {
                self.exit == Some(0)
            } else {
                self.done.is_some()
            }
    }
}

impl Transfer {
    async fn run(self, socket: WebSocket, streams: Arc<Streams>, kind: StreamKind) {
        let (mut sink, mut source) = socket.split();
        let is_put = matches!(kind, StreamKind::FilePut { .. });
        let is_list = matches!(kind, StreamKind::FileList { .. });
        // A put whose hash comes in the trailer: its declared size.
        let trailer = match &kind {
            StreamKind::FilePut { sha256, size, .. }
                if matches!(PutHash::parse(sha256), Ok(PutHash::Trailer(_))) =>
            {
                Some(*size)
            }
            _ => None,
        };
        let stream = match streams.open(kind, OUTPUT_WINDOW) {
            Ok(s) => s,
            Err(e) => {
                let message = e.to_string();
                self.audit(serde_json::json!({}), &message).await;
                return refuse(sink, close_code::AGAIN, &message).await;
            }
        };
        tracing::info!(node = %self.node, principal = %self.principal, stream = stream.number(), action = self.action, "file transfer opened");
        let ended = self
            .relay(&mut sink, &mut source, stream, is_put, is_list, trailer)
            .await;
        let mut end = serde_json::json!({ "bytes": ended.bytes });
        if let Some((offset, size)) = ended.info {
            end["offset"] = offset.into();
            end["size"] = size.into();
        }
        let result = match (&ended.done, &ended.error) {
            _ if is_list && ended.finished(true) => {
                let event = ServerEvent::Exit {
                    code: 0,
                    signal: None,
                };
                let _ = sink.send(text(&event)).await;
                let close = CloseFrame {
                    code: close_code::NORMAL,
                    reason: "done".into(),
                };
                let _ = sink.send(Message::Close(Some(close))).await;
                let _ = sink.close().await;
                "Done".to_owned()
            }
            (Some(sha256), None) if !is_list => {
                end["sha256"] = sha256.clone().into();
                let event = ServerEvent::Done {
                    sha256: sha256.clone(),
                };
                let _ = sink.send(text(&event)).await;
                let close = CloseFrame {
                    code: close_code::NORMAL,
                    reason: "done".into(),
                };
                let _ = sink.send(Message::Close(Some(close))).await;
                let _ = sink.close().await;
                "Done".to_owned()
            }
            (_, error) => {
                let message = error.clone().unwrap_or_else(|| "the transfer ended".into());
                refuse(sink, close_code::ERROR, &message).await;
                message
            }
        };
        self.audit(end, &result).await;
    }

    async fn relay(
        &self,
        sink: &mut Sink,
        source: &mut Source,
        mut stream: StreamHandle,
        is_put: bool,
        is_list: bool,
        trailer: Option<u64>,
    ) -> Ended {
        let mut ended = Ended::default();
        let idle = self.state.sessions.idle_timeout;
        let mut last = Instant::now();
        let mut input = Input::default();
        loop {
            let _ = input.flush(&stream);
            tokio::select! {
                () = tokio::time::sleep_until(last + idle) => {
                    return broken(stream, ended, "idle timeout".into());
                }
                event = stream.next() => match event {
                    None => {
                        ended.error = Some("the node's agent disconnected".into());
                        return ended;
                    }
                    Some(AgentEvent::FileInfo { offset, size, mode }) => {
                        ended.info = Some((offset, size));
                        let event = ServerEvent::File { offset, size, mode };
                        if sink.send(text(&event)).await.is_err() {
                            return left(stream, ended);
                        }
                    }
                    Some(AgentEvent::Credit(n)) => match input.credit(n) {
                        Ok(true) => {
                            if sink.send(text(&ServerEvent::Started)).await.is_err() {
                                return left(stream, ended);
                            }
                        }
                        Ok(false) => {}
                        Err(why) => return broken(stream, ended, why),
                    },
                    Some(AgentEvent::Data(_, bytes)) => {
                        if is_put {
                            return broken(stream, ended, "the agent sent bytes on a put".into());
                        }
                        let n = bytes.len();
                        let mut msg = Vec::with_capacity(n + 1);
                        msg.push(TAG_STDOUT);
                        msg.extend_from_slice(&bytes);
                        drop(bytes);
                        // Awaited: credit goes back only once the client took the bytes.
                        if sink.send(Message::Binary(msg.into())).await.is_err() {
                            return left(stream, ended);
                        }
                        ended.bytes += n as u64;
                        last = Instant::now();
                        stream.consumed(n);
                    }
                    Some(AgentEvent::FileDone(sha256)) => ended.done = Some(sha256),
                    Some(AgentEvent::Exit { code, .. }) => ended.exit = Some(code),
                    Some(AgentEvent::Close(error)) => {
                        match error {
                            Some(e) => {
                                ended.done = None;
                                ended.error = Some(e);
                            }
                            None if !ended.finished(is_list) => {
                                ended.error = Some(match ended.exit {
                                    Some(code) if is_list => format!("the listing ended with exit status {code}"),
                                    _ => "the agent ended the transfer without finishing it".into(),
                                });
                            }
                            None => {}
                        }
                        return ended;
                    }
                },
                msg = source.next(), if input.ready() => match msg {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return left(stream, ended),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Binary(b))) => match b.split_first() {
                        Some((&TAG_STDIN, rest)) if is_put => {
                            let n = rest.len() as u64;
                            if input.push(b.slice(1..)).is_err() {
                                return broken(stream, ended, "file bytes after their end".into());
                            }
                            ended.bytes += n;
                            last = Instant::now();
                        }
                        _ if is_list => {
                            return broken(stream, ended, "a list takes no bytes from the client".into());
                        }
                        _ if !is_put => {
                            return broken(stream, ended, "a get takes no bytes from the client".into());
                        }
                        _ => return broken(stream, ended, "a binary message must be a data tag byte (0) and bytes".into()),
                    },
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<ClientEvent>(t.as_str()) {
                        Ok(ClientEvent::Eof) if is_put && trailer.is_some() => {
                            return broken(stream, ended, "the put ended without its trailer ({\"type\":\"end\",\"size\":N,\"sha256\":\"…\"}): a put with key= sends the file's size and SHA-256 after its bytes".into());
                        }
                        Ok(ClientEvent::Eof) if is_put => if input.end().is_err() {
                            return broken(stream, ended, "the file ended twice".into());
                        },
                        Ok(ClientEvent::End { size, sha256 }) if is_put => {
                            let Some(declared) = trailer else {
                                return broken(stream, ended, "a put with sha256= ends with {\"type\":\"eof\"}, not a trailer".into());
                            };
                            let offset = ended.info.map_or(0, |(offset, _)| offset);
                            let sent = offset + ended.bytes;
                            let hash = check_sha256(&sha256).and_then(|()| {
                                hex::decode(&sha256).map_err(|e| format!("bad sha256 in the trailer: {e}"))
                            });
                            let why = match &hash {
                                Err(e) => Some(format!("bad trailer: {e}")),
                                Ok(_) if size != declared => Some(format!(
                                    "bad trailer: size {size}, but the put declared {declared} bytes"
                                )),
                                Ok(_) if sent != size => Some(format!(
                                    "bad trailer: size {size}, but {sent} bytes were sent (from offset {offset})"
                                )),
                                Ok(h) if h.len() != FILE_TRAILER_LEN => Some("bad trailer: a SHA-256 is 32 bytes".into()),
                                Ok(_) => None,
                            };
                            if let Some(why) = why {
                                return broken(stream, ended, why);
                            }
                            // Ready here (nothing waits for credit): the hash is the stream's
                            // last input, then its end.
                            if let Ok(h) = hash
                                && (input.push(h.into()).is_err() || input.end().is_err())
                            {
                                return broken(stream, ended, "the file ended twice".into());
                            }
                        }
                        Ok(_) => return broken(stream, ended, "only a put's end ({\"type\":\"eof\"}, or with key= the trailer {\"type\":\"end\",...}) is a valid text message here".into()),
                        Err(e) => return broken(stream, ended, format!("bad message: {e}")),
                    },
                },
            }
        }
    }

    async fn audit(&self, end: serde_json::Value, result: &str) {
        let mut params = self.params.clone();
        if let (Some(p), serde_json::Value::Object(e)) = (params.as_object_mut(), end) {
            p.extend(e);
        }
        let entry = AuditEntry {
            at: now_ms(),
            principal: self.principal.clone(),
            source: self.source.clone(),
            action: self.action.into(),
            node_ids: vec![self.node.to_string()],
            params,
            result: result.into(),
            ..AuditEntry::default()
        };
        trail::record(&self.state.store, entry, true).await;
    }
}

/// The client left: the stream is hung up (a put's partial file stays on the node for a resume).
fn left(stream: StreamHandle, mut ended: Ended) -> Ended {
    stream.close("the client left");
    ended.done = None;
    ended.error = Some("the client left".into());
    ended
}

/// A side broke the rules: the stream is hung up, the client told why.
fn broken(stream: StreamHandle, mut ended: Ended, why: String) -> Ended {
    stream.close(&why);
    ended.done = None;
    ended.error = Some(why);
    ended
}
