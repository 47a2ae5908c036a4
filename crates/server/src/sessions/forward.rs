//! Port forwards (`fleetrun_proto::forward`): one session carries many TCP connections from a
//! node, each its own `Tcp` stream with its own credit.
//!
//! - `GET /v1/nodes/{node_id}/port-forward?host=H&port=P` is the **control** socket: the session's
//!   life. It records the session (kind `port-forward`, command `host:port`), audits
//!   `port-forward.open` / `.end`, and ends on a terminate, the idle timeout (no bytes over any of
//!   its connections), the max duration or its client leaving; its end ends every connection.
//! - `GET /v1/sessions/{session_id}/tcp` is a **data** socket, one per TCP connection, for the
//!   session's own user only: it opens a `Tcp` stream on the node's connection and relays raw
//!   bytes both ways, counted into the session.
//!
//! Flow control as for exec: the agent gets output credit back only once the client's socket took
//! the bytes, and a client's next message is read only when the agent's credit took the last, so a
//! connection holds at most one window per direction here.

use super::exec::{Sink, Source, refuse, sleep_until_or_never, text};
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
use fleetrun_proto::api::SessionStatus;
use fleetrun_proto::forward::{DATA_MESSAGE_MAX, DEFAULT_HOST, ForwardEvent, bare_host};
use fleetrun_proto::stream::client::{ClientEvent, ServerEvent};
use fleetrun_proto::stream::{STREAM_WINDOW_DEFAULT, StreamKind};
use fleetrun_proto::time::now_ms;
use fleetrun_store::{AuditEntry, NewSession, SessionEnd};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Output credit per connection: what the server may hold of one connection's bytes for a slow
/// client.
pub const OUTPUT_WINDOW: u64 = STREAM_WINDOW_DEFAULT;
/// Largest message a control client may send (it sends none; pings are small).
const CONTROL_MESSAGE_MAX: usize = 1024;
/// How long the end of a session waits for its connections to count their last bytes.
const CONNECTIONS_END_WAIT: Duration = Duration::from_secs(5);

/// A running forward, shared by its control relay and its data sockets.
pub struct Forward {
    /// The session's id (its record's).
    pub session_id: String,
    /// The user who opened it: the only one whose data sockets join it.
    principal: String,
    /// The node it goes through.
    pub node: NodeId,
    host: String,
    port: u16,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    connections: AtomicU64,
    /// Milliseconds since `opened` of the last byte over any connection (the idle timeout).
    last_ms: AtomicU64,
    opened: Instant,
    /// Cancelled when the session ends: every connection ends with it.
    ended: CancellationToken,
    /// The connections running (the end waits for their last counts).
    tracker: TaskTracker,
}

impl Forward {
    /// Bytes moved over a connection: counted into the session, which is not idle.
    fn moved(&self, inbound: usize, outbound: usize) {
        self.bytes_in.fetch_add(inbound as u64, Ordering::Relaxed);
        self.bytes_out.fetch_add(outbound as u64, Ordering::Relaxed);
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// When the session goes idle unless more bytes move.
    fn idle_at(&self, idle: Duration) -> Instant {
        self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle
    }
}

/// The control socket's query: where the node connects.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Host name or address, as the node resolves it; `localhost` when absent.
    host: Option<String>,
    /// The port, 1 to 65535.
    port: u16,
}

/// Upgrades to a forward's control socket, once the caller may forward to that host through the
/// node and the node's agent speaks `Tcp` streams.
pub async fn open(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(node_id): Path<String>,
    target: Result<Query<Target>, axum::extract::rejection::QueryRejection>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let node: NodeId = parse_id(&node_id, Code::InvalidNodeId)?;
    let Query(target) = target.map_err(|e| {
        ApiError::new(
            Code::InvalidParameters,
            format!(
                "a port forward needs ?port=1..65535 and an optional &host=: {}",
                e.body_text()
            ),
        )
    })?;
    let host = bare_host(target.host.as_deref().unwrap_or(DEFAULT_HOST)).to_owned();
    let kind = StreamKind::Tcp {
        host: host.clone(),
        port: target.port,
    };
    kind.check()
        .map_err(|e| ApiError::new(Code::InvalidParameters, e))?;
    require(&state, &p, &node, &host).await?;
    // A known node that cannot forward now is a `Failed` record: the attempt shows.
    let failed = |why: String| {
        let record = NewSession {
            session_id: uuid::Uuid::new_v4().to_string(),
            kind: "port-forward".into(),
            node_id: node.clone(),
            principal: p.name().to_owned(),
            source: addr.to_string(),
            run_as: String::new(),
            command: format!("{host}:{}", target.port),
            started_at: now_ms(),
            recording: Default::default(),
        };
        let state = state.clone();
        async move {
            if let Err(e) = state
                .store
                .insert_failed_session(&record, now_ms(), &why)
                .await
            {
                tracing::warn!(session = %record.session_id, error = %e, "cannot record a failed session");
            }
        }
    };
    let streams = match connected(&state, &node).await {
        Ok(s) => s,
        Err(e) if e.code() == Code::Unavailable => {
            failed(e.error.message.clone()).await;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    if streams.version() < kind.since() {
        let e = OpenError::KindTooNew {
            kind: kind.name(),
            since: kind.since(),
            version: streams.version(),
        };
        failed(e.to_string()).await;
        return Err(ApiError::new(Code::Unavailable, e.to_string()));
    }
    let forward = Arc::new(Forward {
        session_id: uuid::Uuid::new_v4().to_string(),
        principal: p.name().to_owned(),
        node,
        host,
        port: target.port,
        bytes_in: AtomicU64::new(0),
        bytes_out: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        last_ms: AtomicU64::new(0),
        opened: Instant::now(),
        ended: CancellationToken::new(),
        tracker: TaskTracker::new(),
    });
    let source = addr.to_string();
    Ok(ws
        .max_message_size(CONTROL_MESSAGE_MAX)
        .max_frame_size(CONTROL_MESSAGE_MAX)
        .on_upgrade(move |socket| control(state, forward, source, socket)))
}

/// `port-forward` on the node, and `port-forward-remote` too for a host beyond its loopback.
async fn require(
    state: &AppState,
    p: &Principal,
    node: &NodeId,
    host: &str,
) -> Result<(), ApiError> {
    state
        .authz
        .require_node(&state.store, p, Action::PortForward, node)
        .await?;
    if !fleetrun_proto::forward::is_node_local(host) {
        state
            .authz
            .require_node(&state.store, p, Action::PortForwardRemote, node)
            .await?;
    }
    Ok(())
}

/// The control relay: the session's record, its trail, and its end.
async fn control(state: Arc<AppState>, forward: Arc<Forward>, source: String, socket: WebSocket) {
    let (mut sink, mut client) = socket.split();
    let target = format!("{}:{}", forward.host, forward.port);
    let record = NewSession {
        session_id: forward.session_id.clone(),
        kind: "port-forward".into(),
        node_id: forward.node.clone(),
        principal: forward.principal.clone(),
        source: source.clone(),
        run_as: String::new(),
        command: target.clone(),
        started_at: now_ms(),
        // A port forward records metadata only.
        recording: Default::default(),
    };
    if let Err(e) = state.store.insert_session(&record).await {
        tracing::warn!(session = %record.session_id, error = %e, "cannot record session start");
    }
    let audit = |action: &'static str, params: serde_json::Value, result: String| {
        let entry = AuditEntry {
            at: now_ms(),
            principal: forward.principal.clone(),
            source: source.clone(),
            action: action.into(),
            node_ids: vec![forward.node.to_string()],
            params,
            result,
            ..AuditEntry::default()
        };
        trail::record(&state.store, entry, true)
    };
    let params = serde_json::json!({
        "session_id": forward.session_id, "host": forward.host, "port": forward.port,
    });
    audit("port-forward.open", params.clone(), "Opened".into()).await;
    tracing::info!(node = %forward.node, principal = %forward.principal, %target, "port forward opened");
    let mut registration = state.sessions.register_forward(&forward);
    let ready = ForwardEvent::Ready {
        session_id: forward.session_id.clone(),
        host: forward.host.clone(),
        port: forward.port,
    };
    let ended = if sink.send(event(&ready)).await.is_err() {
        Err(LEFT.to_owned())
    } else {
        watch(&state, &forward, &mut client, &mut registration.stop).await
    };
    drop(registration);
    // Every connection ends with the session; their last bytes are counted (bounded).
    forward.ended.cancel();
    forward.tracker.close();
    let _ = tokio::time::timeout(CONNECTIONS_END_WAIT, forward.tracker.wait()).await;
    let (terminated, reason) = match &ended {
        Ok(reason) => (true, reason.clone()),
        Err(reason) => (false, reason.clone()),
    };
    let (bytes_in, bytes_out) = (
        forward.bytes_in.load(Ordering::Relaxed),
        forward.bytes_out.load(Ordering::Relaxed),
    );
    let end = SessionEnd {
        ended_at: now_ms(),
        bytes_in,
        bytes_out,
        exit_code: None,
        recording: Default::default(),
        recording_bytes: 0,
        end_reason: reason.clone(),
        status: if terminated {
            SessionStatus::Terminated
        } else {
            SessionStatus::Ended
        },
    };
    if let Err(e) = state.store.end_session(&forward.session_id, &end).await {
        tracing::warn!(session = %forward.session_id, error = %e, "cannot record session end");
    }
    let mut params = params;
    params["bytes_in"] = bytes_in.into();
    params["bytes_out"] = bytes_out.into();
    params["connections"] = forward.connections.load(Ordering::Relaxed).into();
    params["reason"] = reason.clone().into();
    let result = if terminated { "Terminated" } else { "Ended" };
    audit("port-forward.end", params, result.into()).await;
    if terminated {
        refuse(sink, close_code::NORMAL, &reason).await;
    } else if reason != LEFT {
        refuse(sink, close_code::POLICY, &reason).await;
    }
}

/// Why a session or connection ended when its client went away.
const LEFT: &str = "the client left";

/// Waits for the session's end: `Ok(reason)` when the server ends it (terminate, a timeout),
/// `Err(reason)` when the client does (it left or broke the rules).
async fn watch(
    state: &AppState,
    forward: &Forward,
    client: &mut Source,
    stop: &mut tokio::sync::oneshot::Receiver<String>,
) -> Result<String, String> {
    let live = &state.sessions;
    let max_at = live.max_duration.map(|d| forward.opened + d);
    loop {
        let idle_at = forward.idle_at(live.idle_timeout);
        tokio::select! {
            reason = &mut *stop => {
                return Ok(reason.unwrap_or_else(|_| "the session was ended".into()));
            }
            () = tokio::time::sleep_until(idle_at) => {
                // Bytes may have moved meanwhile: the deadline is read again.
                if forward.idle_at(live.idle_timeout) <= Instant::now() {
                    return Ok("idle timeout".into());
                }
            }
            () = sleep_until_or_never(max_at) => return Ok("max duration".into()),
            msg = client.next() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Err(LEFT.into()),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(_) | Message::Binary(_))) => {
                    return Err("the control socket carries no messages from the client".into());
                }
            },
        }
    }
}

/// Upgrades to a data socket of a running forward of the caller's. Another user's session is not
/// found (as one that does not exist), so a refusal does not tell whether it exists.
pub async fn connect(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(session_id): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let forward = state
        .sessions
        .forward(&session_id)
        .filter(|f| f.principal == p.name())
        .ok_or_else(|| {
            ApiError::new(
                Code::SessionNotFound,
                format!("no running port-forward session {session_id} of yours"),
            )
        })?;
    // Asked again: the user's policies may have changed since the session opened.
    require(&state, &p, &forward.node, &forward.host).await?;
    let token = forward.tracker.token();
    if forward.ended.is_cancelled() {
        return Err(ApiError::new(
            Code::SessionEnded,
            format!("port-forward session {session_id} has ended"),
        ));
    }
    let streams = connected(&state, &forward.node).await?;
    Ok(ws
        .max_message_size(DATA_MESSAGE_MAX)
        .max_frame_size(DATA_MESSAGE_MAX)
        .on_upgrade(move |socket| async move {
            relay(socket, streams, &forward).await;
            drop(token);
        }))
}

/// The node's stream table: 404 for a node that does not exist, 503 for one not connected.
async fn connected(state: &AppState, node: &NodeId) -> Result<Arc<Streams>, ApiError> {
    if let Some(streams) = state.hub.streams(node) {
        return Ok(streams);
    }
    let known = state
        .store
        .node_refs(Some(std::slice::from_ref(node)))
        .await?;
    Err(if known.is_empty() {
        ApiError::new(Code::NodeNotFound, format!("no node {node}"))
    } else {
        ApiError::new(Code::Unavailable, format!("node {node} is not connected"))
    })
}

/// One TCP connection: a `Tcp` stream on the node's connection, relayed to the data socket until
/// either side closes or the session ends.
async fn relay(socket: WebSocket, streams: Arc<Streams>, forward: &Forward) {
    let (mut sink, mut client) = socket.split();
    let kind = StreamKind::Tcp {
        host: forward.host.clone(),
        port: forward.port,
    };
    let mut stream = match streams.open(kind, OUTPUT_WINDOW) {
        Ok(s) => s,
        Err(e) => return refuse(sink, close_code::AGAIN, &e.to_string()).await,
    };
    forward.connections.fetch_add(1, Ordering::Relaxed);
    match pipe(&mut sink, &mut client, &mut stream, forward).await {
        // The node's peer closed, after its last bytes: a normal close.
        Ok(()) => {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let frame = CloseFrame {
                    code: close_code::NORMAL,
                    reason: "".into(),
                };
                let _ = sink.send(Message::Close(Some(frame))).await;
                let _ = sink.close().await;
            })
            .await;
        }
        Err(why) => {
            stream.close(&why);
            refuse(sink, close_code::ERROR, &why).await;
        }
    }
}

/// Moves bytes both ways within each direction's credit: `Ok` when the node's peer closed,
/// `Err(why)` for every other end.
async fn pipe(
    sink: &mut Sink,
    client: &mut Source,
    stream: &mut StreamHandle,
    forward: &Forward,
) -> Result<(), String> {
    let left = |_| LEFT.to_owned();
    let mut input = Input::default();
    loop {
        if !input.flush(stream) {
            return Err("the node's agent disconnected".into());
        }
        tokio::select! {
            () = forward.ended.cancelled() => return Err("the port-forward session ended".into()),
            event = stream.next() => match event {
                None => return Err("the node's agent disconnected".into()),
                // Only file streams have these.
                Some(AgentEvent::FileInfo { .. } | AgentEvent::FileDone(_)) => {}
                Some(AgentEvent::Credit(n)) => if input.credit(n)? {
                    sink.send(text(&ServerEvent::Started)).await.map_err(left)?;
                },
                Some(AgentEvent::Data(_, bytes)) => {
                    let n = bytes.len();
                    // Awaited here: output credit goes back only once the client took the bytes.
                    sink.send(Message::Binary(bytes.into())).await.map_err(left)?;
                    forward.moved(0, n);
                    stream.consumed(n);
                }
                // Not sent for Tcp streams.
                Some(AgentEvent::Exit { .. }) => {}
                Some(AgentEvent::Close(None)) => return Ok(()),
                Some(AgentEvent::Close(Some(error))) => return Err(error),
            },
            msg = client.next(), if input.ready() => match msg {
                None | Some(Ok(Message::Close(_))) => return Err(LEFT.into()),
                Some(Err(e)) => return Err(format!("bad message: {e}")),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Binary(b))) => {
                    forward.moved(b.len(), 0);
                    input.push(b).map_err(|_| "data after the client's end of input".to_owned())?;
                }
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ClientEvent>(t.as_str()) {
                    Ok(ClientEvent::Eof) => input.end().map_err(|_| "the input ended twice".to_owned())?,
                    Ok(ClientEvent::End { .. }) => {
                        return Err("a trailer ({\"type\":\"end\"}) ends a file put, not a connection".into());
                    }
                    // A terminal's message: a TCP connection has no window.
                    Ok(ClientEvent::Resize { .. }) => {
                        return Err("a resize needs a PTY (a TCP connection has none)".into());
                    }
                    Err(e) => return Err(format!("bad message: {e}")),
                },
            },
        }
    }
}

fn event(e: &ForwardEvent) -> Message {
    Message::Text(serde_json::to_string(e).unwrap_or_default().into())
}
