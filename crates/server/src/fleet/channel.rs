//! The agent channel: `GET /v1/agent/connect` upgrades to a WebSocket that carries postcard frames
//! (fleetrun_proto::channel). The first frame (its protocol version read before it is decoded)
//! registers a new node or identifies an enrolled one; then the reader routes frames (output to the
//! invocation's actor, starts and results to storage) and a writer task drains the node's queue in
//! the hub.

use crate::AppState;
use crate::access::audit::{self as trail, ANONYMOUS};
use crate::access::authn;
use crate::access::secrets;
use crate::run::dispatch::DispatchMsg;
use crate::run::invocations::Ender;
use crate::run::output::OutputMsg;
use crate::sessions::streams::Streams;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use fleetrun_proto::auth::NONCE_LEN;
use fleetrun_proto::auth::fingerprint;
use fleetrun_proto::channel::{
    AgentFrame, ErrorCode, NodeInfo, ServerFrame, StreamId, handshake_version,
};
use fleetrun_proto::status::details;
use fleetrun_proto::targets::{check_tag_key, check_tag_value};
use fleetrun_proto::time::now_ms;
use fleetrun_proto::version::{PROTOCOL_VERSION, PROTOCOL_VERSION_HEADER, PROTOCOL_VERSION_MIN};
use fleetrun_proto::{InvocationStatus, NodeId};
use fleetrun_store::{AuditEntry, Finish, NewNode, RegisterError, Store};
use futures_util::{SinkExt, StreamExt};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, mpsc};

/// Longest time a refusal (an `Error` frame, then the close) may take to leave: a client that reads
/// nothing must not hold the connection open.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Initial read and write buffer of an agent's WebSocket.
const SOCKET_BUFFER: usize = 4 * 1024;

/// Upgrades the request to the agent channel. When too many handshakes are in progress (a reconnect
/// storm after a restart), answers 503 with a jittered Retry-After instead, so the server sheds load
/// rather than falling over; agents wait that long before re-dialling.
pub async fn connect(
    State(state): State<Arc<AppState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    if let Err(retry) = state.auth_guard.check(addr.ip()) {
        let headers = [(header::RETRY_AFTER, retry.as_secs().max(1).to_string())];
        return (
            StatusCode::TOO_MANY_REQUESTS,
            headers,
            "too many failed registrations or identifications from this address; retry later\n",
        )
            .into_response();
    }
    let Ok(permit) = state.handshakes.clone().try_acquire_owned() else {
        return busy("too many agent handshakes in progress; retry later\n".into());
    };
    let by_address = match state.handshakes_by_address.acquire(
        addr.ip(),
        state.max_handshakes_per_address,
        0,
    ) {
        Ok(slot) => slot,
        Err(_) => {
            return busy(format!(
                "too many agent handshakes in progress from this address (limit {}); retry later\n",
                state.max_handshakes_per_address
            ));
        }
    };
    let permit = Handshake {
        _global: permit,
        _by_address: by_address,
    };
    let upgraded = ws
        .max_message_size(fleetrun_proto::limits::CHANNEL_MESSAGE_MAX)
        .max_frame_size(fleetrun_proto::limits::CHANNEL_MESSAGE_MAX)
        // tungstenite's defaults (128 KiB each way) cost 256 KiB per idle agent; big frames grow
        // the buffers only while they pass.
        .read_buffer_size(SOCKET_BUFFER)
        .write_buffer_size(SOCKET_BUFFER)
        .on_upgrade(move |socket| serve(state, socket, permit, addr));
    // The server's version, for an agent that is refused to name both (docs/protocol.md).
    let version = [(PROTOCOL_VERSION_HEADER, PROTOCOL_VERSION.to_string())];
    (version, upgraded).into_response()
}

/// 503 with a jittered Retry-After: agents wait that long before re-dialling.
fn busy(message: String) -> Response {
    let retry_after = 1 + rand::random::<u64>() % 5;
    let headers = [(header::RETRY_AFTER, retry_after.to_string())];
    (StatusCode::SERVICE_UNAVAILABLE, headers, message).into_response()
}

/// A handshake's slots: one of `max_handshakes`, one of its address's; both freed together once
/// the agent is identified (or refused).
struct Handshake {
    _global: OwnedSemaphorePermit,
    _by_address: crate::net::conn::Slot,
}

/// Audits a channel action (waiting for its commit: handshakes are not the hot path).
async fn audit(
    store: &Store,
    source: &str,
    principal: &str,
    action: &str,
    node: Option<&NodeId>,
    params: serde_json::Value,
    result: &str,
) {
    let entry = AuditEntry {
        at: now_ms(),
        principal: principal.into(),
        source: source.into(),
        action: action.into(),
        node_ids: node.map(|n| vec![n.to_string()]).unwrap_or_default(),
        params,
        result: result.into(),
        ..AuditEntry::default()
    };
    trail::record(store, entry, true).await;
}

/// Where a handshake comes from and what its first frame must sign.
struct Peer {
    addr: SocketAddr,
    /// `addr` as the audit trail records it.
    source: String,
    /// This connection's challenge.
    nonce: [u8; NONCE_LEN],
}

/// A refusal of the handshake: the `Error` frame's code and message.
type Refused = (ErrorCode, String);

/// One connection: the challenge and the first frame, then the arm for it (register, hello, or a
/// refusal). A peer that leaves during the handshake is let go without an answer.
async fn serve(state: Arc<AppState>, mut socket: WebSocket, permit: Handshake, addr: SocketAddr) {
    let peer = Peer {
        addr,
        source: addr.to_string(),
        nonce: authn::node::challenge(),
    };
    let first = match first_frame(&state, &mut socket, &peer).await {
        Ok(Some(frame)) => frame,
        Ok(None) => return,
        Err((code, message)) => return refuse(socket, code, &message).await,
    };
    match first {
        AgentFrame::Register {
            protocol_version: _,
            activation_code,
            public_key,
            signature,
            info,
            tags,
        } => {
            let register = RegisterFrame {
                activation_code,
                public_key,
                signature,
                info,
                tags,
                instance_id: None,
            };
            on_register(&state, socket, &peer, register).await;
        }
        AgentFrame::RegisterInstance {
            protocol_version: _,
            activation_code,
            public_key,
            signature,
            info,
            tags,
            instance_id,
        } => {
            let register = RegisterFrame {
                activation_code,
                public_key,
                signature,
                info,
                tags,
                instance_id: Some(instance_id),
            };
            on_register(&state, socket, &peer, register).await;
        }
        AgentFrame::Hello {
            protocol_version,
            node_id,
            public_key,
            signature,
            info,
            known,
        } => {
            let hello = HelloFrame {
                protocol_version,
                node_id,
                public_key,
                signature,
                info,
                known,
            };
            on_hello(state, socket, peer, hello, permit).await;
        }
        _ => {
            let message = "the first frame must be Hello, Register or RegisterInstance";
            refuse(socket, ErrorCode::BadFrame, message).await;
        }
    }
}

/// Sends the challenge and reads the agent's first frame, both within the handshake timeout (a
/// silent or unreading client gives its handshake slots back when it passes). The challenge goes
/// out at once, so it costs no round trip: it travels while the agent finishes its side of the
/// upgrade. The protocol version is checked before the frame is decoded, from the frozen start of
/// the frame (`handshake_version`): an agent of another version, whose frame may not decode here,
/// hears `ProtocolVersion`, not `BadFrame`. `None`: the peer left.
async fn first_frame(
    state: &AppState,
    socket: &mut WebSocket,
    peer: &Peer,
) -> Result<Option<AgentFrame>, Refused> {
    let challenge = ServerFrame::Challenge {
        nonce: peer.nonce.to_vec(),
    };
    let limit = state.agent_handshake_timeout;
    let first = tokio::time::timeout(limit, async {
        if socket.send(binary(challenge)).await.is_err() {
            return None;
        }
        next_message(socket).await
    })
    .await;
    let bytes = match first {
        Ok(Some(Ok(bytes))) => bytes,
        Ok(Some(Err(message))) => return Err((ErrorCode::BadFrame, message)),
        Ok(None) => return Ok(None),
        Err(_) => {
            tracing::debug!(addr = %peer.addr, "agent handshake timed out");
            let message = format!(
                "no Hello or Register frame within {} (the agent handshake timeout)",
                humantime::format_duration(limit)
            );
            return Err((ErrorCode::HandshakeTimeout, message));
        }
    };
    if let Some(version) = handshake_version(&bytes) {
        check_version(version).map_err(|m| (ErrorCode::ProtocolVersion, m))?;
    }
    AgentFrame::decode(&bytes)
        .map(Some)
        .map_err(|e| (ErrorCode::BadFrame, e.to_string()))
}

/// The fields of a `Register` (its version already checked).
struct RegisterFrame {
    activation_code: String,
    public_key: Vec<u8>,
    signature: Vec<u8>,
    info: NodeInfo,
    tags: BTreeMap<String, String>,
    /// A `RegisterInstance`'s EC2 instance id, unchecked.
    instance_id: Option<String>,
}

/// A new node enrols: the key's proof, the activation, the node stored; audited either way.
/// Answers `Registered` and closes (the agent comes back with `Hello`), or refuses.
async fn on_register(state: &AppState, mut socket: WebSocket, peer: &Peer, frame: RegisterFrame) {
    let mut params = serde_json::json!({
        "name": frame.info.name, "hostname": frame.info.hostname, "tags": frame.tags,
        "key": fingerprint(&frame.public_key),
    });
    if let Some(id) = &frame.instance_id {
        // At most a frame's worth of text: the audit trail keeps a bounded prefix of a bad one.
        params["instance_id"] = id.chars().take(64).collect::<String>().into();
    }
    let instance_id = frame.instance_id.as_deref();
    let registered = match authn::node::check_register(
        &peer.nonce,
        &frame.public_key,
        &frame.signature,
        instance_id,
    ) {
        Ok(key) => {
            let code = &frame.activation_code;
            let node = NewRegistration {
                public_key: key,
                info: frame.info,
                tags: frame.tags,
                instance_id: frame.instance_id,
            };
            register(state, code, node).await
        }
        Err(r) => Err((r.code, r.message)),
    };
    let (principal, node, result) = match &registered {
        Ok(id) => (id.to_string(), Some(id), "Registered"),
        Err((code, _)) => (ANONYMOUS.to_owned(), None, code.as_str()),
    };
    let action = "agent.register";
    audit(
        &state.store,
        &peer.source,
        &principal,
        action,
        node,
        params,
        result,
    )
    .await;
    match registered {
        Ok(node_id) => {
            tracing::info!(%node_id, "node registered");
            let _ = socket
                .send(binary(ServerFrame::Registered { node_id }))
                .await;
            let _ = socket.close().await;
        }
        Err((code, message)) => {
            if matches!(code, ErrorCode::InvalidActivation | ErrorCode::BadSignature) {
                state.auth_guard.failed(peer.addr.ip());
            }
            refuse(socket, code, &message).await
        }
    }
}

/// The fields of a `Hello` (its version already checked).
struct HelloFrame {
    /// Checked already: session streams are opened only from `STREAMS_SINCE` on.
    protocol_version: u32,
    node_id: NodeId,
    public_key: Vec<u8>,
    signature: Vec<u8>,
    info: NodeInfo,
    known: Vec<fleetrun_proto::CommandId>,
}

/// An enrolled node connects: identified (guard, signature, node info), audited, then served as
/// a session until it drops; or refused.
async fn on_hello(
    state: Arc<AppState>,
    socket: WebSocket,
    peer: Peer,
    frame: HelloFrame,
    permit: Handshake,
) {
    let session_key = match identify(&state, &peer, &frame).await {
        Ok(key) => key,
        Err((code, message)) => return refuse(socket, code, &message).await,
    };
    let info = frame.info;
    if let Err(message) = check_info(&info) {
        return refuse(socket, ErrorCode::BadNodeInfo, &message).await;
    }
    let node_id = frame.node_id;
    let params = serde_json::json!({
        "name": info.name, "hostname": info.hostname, "agent_version": info.agent_version,
    });
    let principal = node_id.to_string();
    let (source, action) = (&peer.source, "agent.hello");
    audit(
        &state.store,
        source,
        &principal,
        action,
        Some(&node_id),
        params,
        "Connected",
    )
    .await;
    let auth = SessionAuth {
        key: session_key,
        source: peer.source,
        version: frame.protocol_version,
    };
    let known = frame.known.into_iter().collect();
    session(state, socket, node_id, auth, info, known, permit).await;
}

/// Who a `Hello` is: refused when its node id is locked by the brute-force guard (a node id
/// guessed at too often is locked from every address, as tokens are), or when the signature is not
/// the node's (counted for the guard when it says so, and audited). The session's key.
async fn identify(state: &AppState, peer: &Peer, frame: &HelloFrame) -> Result<String, Refused> {
    let node_id = &frame.node_id;
    let credential = format!("node:{node_id}");
    let ip = peer.addr.ip();
    if let Err(retry) = state.auth_guard.check_credential(ip, Some(&credential)) {
        let message = format!(
            "too many failed identifications as this node; retry in {} s",
            retry.as_secs().max(1)
        );
        return Err((ErrorCode::TooManyFailedAuthentications, message));
    }
    let (key, signature) = (&frame.public_key, &frame.signature);
    let r = match authn::node::check_hello(&state.store, node_id, &peer.nonce, key, signature).await
    {
        Ok(session_key) => return Ok(session_key),
        Err(r) => r,
    };
    if r.counts {
        state.auth_guard.failed_credential(ip, Some(&credential));
    }
    let code = r.code;
    if code != ErrorCode::InternalError {
        let params = serde_json::json!({ "claimed_node_id": node_id.to_string() });
        let (source, action) = (&peer.source, "agent.hello");
        audit(
            &state.store,
            source,
            ANONYMOUS,
            action,
            Some(node_id),
            params,
            &r.audit,
        )
        .await;
    }
    Err((code, r.message))
}

/// How a session was authenticated: the node's key it proved (changed by a rotation), the peer,
/// and the protocol version the agent said (session streams only from `STREAMS_SINCE` on).
struct SessionAuth {
    key: String,
    source: String,
    version: u32,
}

/// An identified agent's connection, until it drops.
async fn session(
    state: Arc<AppState>,
    socket: WebSocket,
    node: NodeId,
    mut auth: SessionAuth,
    info: NodeInfo,
    known: HashSet<fleetrun_proto::CommandId>,
    permit: Handshake,
) {
    if let Err(e) = state
        .store
        .node_connected(&node, &info, state.replica.id())
        .await
    {
        tracing::error!(%node, "cannot record connect: {e}");
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<ServerFrame>();
    let streams = Arc::new(Streams::new(auth.version, tx.clone()));
    let (conn_id, mut revoked) = state.hub.connect(&node, tx.clone(), streams.clone());
    // A deregistration between the handshake's check and this connect would have found no connection
    // to close: look again now that the connection is in the hub.
    if let Ok(Some(keys)) = state.store.node_keys(&node).await
        && keys.deregistered
    {
        state
            .hub
            .revoke(&node, &format!("node {node} was deregistered"));
    }
    let _ = tx.send(ServerFrame::Welcome {
        protocol_version: PROTOCOL_VERSION,
        heartbeat_secs: state.heartbeat_secs,
    });
    tracing::info!(%node, name = %info.name, "agent connected");

    let (mut sink, mut stream) = socket.split();
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if sink.send(binary(frame)).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });

    if let Err(e) = reconcile(
        &state.store,
        &state.outputs,
        &state.dispatchers,
        &node,
        &known,
    )
    .await
    {
        tracing::error!(%node, "cannot reconcile deliveries: {e}");
    }
    // Other replicas reach the node through this one while it is connected here.
    let serving = match &state.bus {
        Some(bus) => match bus.serve_node(&state, &node).await {
            Ok(serving) => {
                bus.announce_online(&node);
                Some(serving)
            }
            Err(e) => {
                tracing::warn!(%node, "other replicas cannot reach the node through NATS: {e}");
                None
            }
        },
        None => None,
    };
    state.hub.announce_online(&node);
    // The handshake's work is done; the session itself costs little.
    drop(permit);

    let silence = Duration::from_secs(state.heartbeat_secs.max(1) * 3);
    let mut owned = Owned::default();
    loop {
        let next = tokio::select! {
            r = tokio::time::timeout(silence, stream.next()) => r,
            _ = &mut revoked => {
                // Revoked by a deregistration, or every session closed by a shutdown.
                let why = if state.hub.is_closing() { "server shutting down" } else { "node revoked" };
                tracing::info!(%node, "{why}; closing its connection");
                break;
            }
        };
        let msg = match next {
            Err(_) => {
                tracing::info!(%node, "agent silent for {silence:?}; dropping connection");
                break;
            }
            Ok(None) | Ok(Some(Err(_))) => break,
            Ok(Some(Ok(m))) => m,
        };
        let bytes = match msg {
            Message::Binary(b) => b,
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Text(_) => {
                let _ = tx.send(error_frame(
                    ErrorCode::BadFrame,
                    "text messages are not part of the protocol",
                ));
                break;
            }
        };
        let frame = match AgentFrame::decode(&bytes) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(%node, "bad frame: {e}");
                let _ = tx.send(error_frame(ErrorCode::BadFrame, &e.to_string()));
                break;
            }
        };
        let frame = match key_frame(&state, &node, &mut auth, frame).await {
            Ok(KeyFrame::Handled(reply)) => {
                if let Some(reply) = reply {
                    let _ = tx.send(reply);
                }
                continue;
            }
            Ok(KeyFrame::Other(f)) => f,
            Err(msg) => {
                tracing::warn!(%node, "protocol error: {msg}");
                let _ = tx.send(error_frame(ErrorCode::ProtocolError, &msg));
                break;
            }
        };
        if let Err(msg) = route(&state, &node, &mut owned, &streams, frame, bytes).await {
            tracing::warn!(%node, "protocol error: {msg}");
            let _ = tx.send(error_frame(ErrorCode::ProtocolError, &msg));
            break;
        }
    }

    if owned.foreign_frames > 0 {
        tracing::warn!(
            %node,
            frames = owned.foreign_frames,
            commands = owned.foreign_commands,
            "this connection sent {} output or result frames for {} commands the node has no invocation of; acknowledged, not stored",
            owned.foreign_frames,
            owned.foreign_commands
        );
    }
    drop(serving);
    state.hub.disconnect(&node, conn_id);
    // The relays of its streams hear that the agent is gone.
    streams.close_all();
    drop(tx);
    // Give queued frames (an error, acks) a moment to leave, then close.
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    if let Err(e) = state.store.node_seen(&node, state.replica.id()).await {
        tracing::error!(%node, "cannot record disconnect: {e}");
    }
    tracing::info!(%node, "agent disconnected");
}

/// A frame after [`key_frame`].
enum KeyFrame {
    /// A key rotation frame, done, with the answer if there is one.
    Handled(Option<ServerFrame>),
    /// Any other frame, for [`route`].
    Other(AgentFrame),
}

/// Handles the key rotation frames of a session (they change how it is authenticated), audited.
async fn key_frame(
    state: &AppState,
    node: &NodeId,
    auth: &mut SessionAuth,
    frame: AgentFrame,
) -> Result<KeyFrame, String> {
    match frame {
        AgentFrame::RotateKey {
            old_public_key,
            new_public_key,
            signature,
        } => {
            let before = auth.key.clone();
            let rotated = authn::node::rotate(
                &state.store,
                node,
                &mut auth.key,
                &old_public_key,
                &new_public_key,
                &signature,
            )
            .await;
            let params = serde_json::json!({
                "old_key": fingerprint(&old_public_key),
                "new_key": fingerprint(&new_public_key),
            });
            let result = match &rotated {
                Ok(_) if before == auth.key => "Unchanged".to_owned(),
                Ok(_) => "KeyRotated".to_owned(),
                Err(e) => e.clone(),
            };
            let principal = node.to_string();
            let action = "agent.rotate_key";
            audit(
                &state.store,
                &auth.source,
                &principal,
                action,
                Some(node),
                params,
                &result,
            )
            .await;
            rotated.map(|f| KeyFrame::Handled(Some(f)))
        }
        AgentFrame::KeyConfirmed { public_key } => {
            authn::node::confirmed(&state.store, node, &auth.key, &public_key).await?;
            Ok(KeyFrame::Handled(None))
        }
        other => Ok(KeyFrame::Other(other)),
    }
}

/// Most commands a connection remembers the ownership of (see [`Owned`]); past it the memory is
/// cleared and rebuilt from lookups.
const OWNED_CACHE_MAX: usize = 4096;

/// Which commands a connection's node has an invocation of, looked up once per command and
/// connection (a running invocation's actor is proof enough and needs no lookup), and what was sent
/// for commands it has none of.
#[derive(Default)]
struct Owned {
    known: std::collections::HashMap<fleetrun_proto::CommandId, bool>,
    /// Output and result frames for commands the node has no invocation of.
    foreign_frames: u64,
    /// Distinct such commands (as far as the memory reaches).
    foreign_commands: u64,
}

impl Owned {
    /// Whether the node has an invocation of the command. A new lookup that finds one starts the
    /// invocation's actor primed with what it read, so the actor need not read it again.
    async fn check(
        &mut self,
        state: &Arc<AppState>,
        key: &crate::run::output::InvocationKey,
    ) -> Result<bool, String> {
        if state.outputs.has(key) {
            return Ok(true);
        }
        if let Some(&owned) = self.known.get(&key.0) {
            return Ok(owned);
        }
        let stored = state
            .store
            .invocation_output_state(&key.0, &key.1)
            .await
            .map_err(|e| {
                tracing::error!(node = %key.1, command = %key.0, "cannot look up invocation: {e}");
                "the server cannot read its database".to_string()
            })?;
        if self.known.len() >= OWNED_CACHE_MAX {
            self.known.clear();
        }
        let owned = stored.is_some();
        self.known.insert(key.0.clone(), owned);
        match stored {
            Some(stored) => {
                let (actor, new) = state.outputs.ensure(state, key);
                if new {
                    let _ = actor.send(OutputMsg::Primed(stored));
                }
            }
            None => {
                if self.foreign_commands == 0 {
                    tracing::warn!(node = %key.1, command = %key.0, "node sent output or a result for a command it has no invocation of; acknowledged, not stored (further ones are counted, and logged when the connection ends)");
                }
                self.foreign_commands += 1;
            }
        }
        Ok(owned)
    }
}

/// Handles one frame of an identified agent.
async fn route(
    state: &Arc<AppState>,
    node: &NodeId,
    owned: &mut Owned,
    streams: &Streams,
    frame: AgentFrame,
    _raw: Bytes,
) -> Result<(), String> {
    match frame {
        AgentFrame::Started {
            command_id,
            started_at_ms,
        } => {
            // The output actor starts first, so the stored output read with the start is current
            // for it (it is the only writer of it) and it need not read it again.
            let key = (command_id.clone(), node.clone());
            let (actor, new) = state.outputs.ensure(state, &key);
            match state
                .store
                .mark_started(&command_id, node, started_at_ms)
                .await
            {
                Ok(Some(stored)) => {
                    let _ = actor.send(OutputMsg::Primed(stored));
                    state.dispatchers.bump(&command_id);
                }
                Ok(None) => {
                    // Ended already (or unknown): nothing more will come for a new actor.
                    if new {
                        let _ = actor.send(OutputMsg::Close { done: None });
                    }
                }
                Err(e) => tracing::error!(%node, %command_id, "cannot record start: {e}"),
            }
        }
        AgentFrame::Output {
            stream: StreamId::Output { command_id, pipe },
            offset,
            data,
        } => {
            if data.len() > fleetrun_proto::limits::OUTPUT_FRAME_MAX {
                return Err(format!(
                    "output frame of {} bytes exceeds {}",
                    data.len(),
                    fleetrun_proto::limits::OUTPUT_FRAME_MAX
                ));
            }
            let key = (command_id, node.clone());
            if !owned.check(state, &key).await? {
                // Acknowledged all the same, so a confused agent's spool drains.
                owned.foreign_frames += 1;
                let stream = StreamId::Output {
                    command_id: key.0,
                    pipe,
                };
                let offset = offset.saturating_add(data.len() as u64);
                state.hub.send(node, ServerFrame::Ack { stream, offset });
                return Ok(());
            }
            state.outputs.send(
                state,
                &key,
                OutputMsg::Data {
                    pipe,
                    offset,
                    data: Bytes::from(data),
                },
            );
        }
        AgentFrame::Finished { command_id, result } => {
            let key = (command_id, node.clone());
            if !owned.check(state, &key).await? {
                owned.foreign_frames += 1;
                let command_id = key.0;
                state.hub.send(node, ServerFrame::ResultAck { command_id });
                return Ok(());
            }
            state.outputs.send(state, &key, OutputMsg::Finished(result));
        }
        AgentFrame::Hello { .. }
        | AgentFrame::Register { .. }
        | AgentFrame::RegisterInstance { .. } => {
            return Err("Hello and Register are only valid as the first frame".into());
        }
        AgentFrame::RotateKey { .. } | AgentFrame::KeyConfirmed { .. } => {
            return Err("key rotation frames are handled by the session".into());
        }
        // To the stream's owner; a frame for a stream this connection never opened is refused.
        f @ (AgentFrame::StreamData { .. }
        | AgentFrame::StreamCredit { .. }
        | AgentFrame::StreamExit { .. }
        | AgentFrame::StreamClose { .. }
        | AgentFrame::StreamFileInfo { .. }
        | AgentFrame::StreamFileDone { .. }) => streams.route(f)?,
    }
    Ok(())
}

/// Squares the server's view of a node's deliveries with what its agent still holds: a delivery the
/// agent does not know was lost before it started (deliver again) or while it ran (Terminated).
async fn reconcile(
    store: &fleetrun_store::Store,
    outputs: &crate::run::output::Outputs,
    dispatchers: &crate::run::dispatch::Dispatchers,
    node: &NodeId,
    known: &HashSet<fleetrun_proto::CommandId>,
) -> Result<(), fleetrun_store::StoreError> {
    for (cmd, started) in store.open_invocations(node, true).await? {
        if known.contains(&cmd) {
            continue;
        }
        if started {
            let f = Finish::without_running(
                InvocationStatus::Failed,
                details::TERMINATED,
                now_ms(),
                "the agent restarted while the command ran; its result is unknown",
            );
            Ender::new(store, outputs, dispatchers)
                .end(&cmd, vec![(node.clone(), f)])
                .await?;
        } else {
            store.mark_undelivered(&cmd, node, None).await?;
            dispatchers.send(&cmd, DispatchMsg::Undelivered(node.clone()));
        }
    }
    Ok(())
}

/// A registration whose key is proven.
struct NewRegistration {
    /// Hex.
    public_key: String,
    info: NodeInfo,
    tags: BTreeMap<String, String>,
    /// The EC2 instance id asked for (unchecked); `None` gets a new `mi-` id.
    instance_id: Option<String>,
}

async fn register(state: &AppState, code: &str, node: NewRegistration) -> Result<NodeId, Refused> {
    let NewRegistration {
        public_key,
        info,
        tags,
        instance_id,
    } = node;
    check_info(&info).map_err(|m| (ErrorCode::BadNodeInfo, m))?;
    for (k, v) in &tags {
        check_tag_key(k).map_err(|e| (ErrorCode::InvalidTag, e.0))?;
        check_tag_value(v).map_err(|e| (ErrorCode::InvalidTag, e.0))?;
    }
    let node_id = match instance_id {
        Some(id) => NodeId::ec2(&id).map_err(|_| {
            // Shown cut short: the frame may hold up to a message's worth of it.
            let shown: String = id.chars().take(64).collect();
            let message = format!(
                "registration refused: instance id {shown:?} is not an EC2 instance id (`i-` followed by 17 lowercase hex digits, or 8)"
            );
            (ErrorCode::BadNodeInfo, message)
        })?,
        None => NodeId::from_random(secrets::random_u128()),
    };
    let new = NewNode {
        node_id: node_id.clone(),
        public_key,
        info,
        tags,
    };
    match state.store.register_node(&secrets::hash(code), new).await {
        Ok(()) => {
            state.fleet_changed();
            Ok(node_id)
        }
        Err(RegisterError::IdTaken) => Err((
            ErrorCode::NodeIdTaken,
            format!(
                "registration refused: node id {node_id} is already another node's (a node registered under it before; deregistered nodes keep their ids)"
            ),
        )),
        Err(RegisterError::Store(e)) => {
            tracing::error!("cannot register node: {e}");
            Err((
                ErrorCode::InternalError,
                "the server cannot write its database".into(),
            ))
        }
        Err(e) => Err((
            ErrorCode::InvalidActivation,
            format!("registration refused: {e}"),
        )),
    }
}

fn check_version(v: u32) -> Result<(), String> {
    // Version 3 only appended frames to version 2 (session streams, opened only to agents of
    // version 3 and later): agents of both are served.
    if (PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION).contains(&v) {
        Ok(())
    } else {
        Err(format!(
            "agent speaks protocol version {v}, this server speaks {PROTOCOL_VERSION} (and serves agents of version {PROTOCOL_VERSION_MIN} and later)"
        ))
    }
}

fn check_info(info: &NodeInfo) -> Result<(), String> {
    info.check()
}

/// The next binary message, undecoded; `None` when the peer is gone.
async fn next_message(socket: &mut WebSocket) -> Option<Result<Bytes, String>> {
    loop {
        match socket.recv().await? {
            Ok(Message::Binary(b)) => return Some(Ok(b)),
            Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(Message::Text(_)) => {
                return Some(Err("text messages are not part of the protocol".into()));
            }
        }
    }
}

async fn refuse(mut socket: WebSocket, code: ErrorCode, message: &str) {
    tracing::info!(code = code.as_str(), "agent connection refused: {message}");
    let _ = tokio::time::timeout(REFUSE_TIMEOUT, async {
        let _ = socket.send(binary(error_frame(code, message))).await;
        let _ = socket.close().await;
    })
    .await;
}

fn error_frame(code: ErrorCode, message: &str) -> ServerFrame {
    ServerFrame::error(code, message)
}

fn binary(frame: ServerFrame) -> Message {
    Message::Binary(frame.encode().into())
}
