//! The agent's one connection to the server, as an explicit state machine:
//! Connecting → Connected → Disconnected (jittered exponential backoff) → Connecting.
//!
//! Only transport errors are retried. An `Error` frame whose code refuses the node itself
//! ([`ErrorCode::is_fatal`]: its protocol version, activation, identity or settings) is fatal;
//! any other code is retried like a transport error. A server that sheds load answers the handshake with HTTP 503 and `Retry-After: N`: the agent then waits at
//! least N seconds plus up to N/2 of jitter, so a fleet does not come back all at once.

use crate::error::AgentError;
use crate::identity::{self, Identity};
use crate::outbox::Outbox;
use crate::scheduler::Scheduler;
use crate::streams::Streams;
use fleetrun_proto::NodeId;
use fleetrun_proto::auth;
use fleetrun_proto::channel::{AgentFrame, ErrorCode, NodeInfo, ServerFrame};
use fleetrun_proto::time::now_ms;
use fleetrun_proto::version::{PROTOCOL_VERSION, PROTOCOL_VERSION_HEADER};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use rand::Rng;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest wait for the TCP and WebSocket handshakes.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// First re-dial delay bound; doubled per failure up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(200);
/// Largest re-dial delay bound.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A connection that lasted this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Largest `Retry-After` honoured.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(3_600);

/// Why a connection ended.
#[derive(Debug)]
enum ConnError {
    /// Network trouble, a bad frame or an unexpected answer: re-dial after a backoff.
    Transport(String),
    /// The server is overloaded (HTTP 503): re-dial after the backoff or `retry_after` (plus
    /// jitter), whichever is longer.
    Throttled { why: String, retry_after: Duration },
    /// The server refuses the node: give up.
    Fatal(AgentError),
}

fn transport(what: impl std::fmt::Display) -> ConnError {
    ConnError::Transport(what.to_string())
}

/// The connection's states.
enum State {
    Connecting,
    Connected {
        ws: Box<Ws>,
        heartbeat: Duration,
    },
    /// Waiting to re-dial; at least `retry_after` (plus jitter) if the server asked for it.
    Disconnected {
        retry_after: Option<Duration>,
    },
}

/// Full-jitter exponential backoff.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let bound = BACKOFF_START
            .saturating_mul(1u32 << self.failures.min(16))
            .min(BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        let ms = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(0..=ms))
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// The wait before re-dialling: the backoff's delay, or, when the server sent `Retry-After: N`,
/// at least N plus `jitter` (0 to 1) times N/2.
fn redial_delay(backoff: Duration, retry_after: Option<Duration>, jitter: f64) -> Duration {
    match retry_after {
        None => backoff,
        Some(n) => backoff.max(n + n.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)),
    }
}

/// Seconds of a `Retry-After` header (the HTTP-date form is not used by fleetrun's server).
fn retry_after_secs(value: Option<&str>) -> Option<Duration> {
    let secs: u64 = value?.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(RETRY_AFTER_MAX))
}

/// A failed dial: HTTP 503 is throttling, anything else a transport error.
fn dial_error(e: tokio_tungstenite::tungstenite::Error) -> ConnError {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Http(resp) if resp.status().as_u16() == 503 => {
            let header = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok());
            ConnError::Throttled {
                why: "server busy (HTTP 503)".into(),
                retry_after: retry_after_secs(header).unwrap_or_default(),
            }
        }
        e => match crate::tls::describe_dial_error(&e) {
            Some(why) => transport(why),
            None => transport(e),
        },
    }
}

/// What the connection needs to know and to drive.
pub struct Channel {
    /// The server's channel URLs (several for replicas), and the one dialled now.
    urls: Vec<String>,
    url: String,
    tls: crate::tls::Tls,
    state_dir: PathBuf,
    activation_code: Option<String>,
    /// The EC2 instance id to register under (`RegisterInstance`), if any.
    instance_id: Option<NodeId>,
    tags: BTreeMap<String, String>,
    heartbeat: Duration,
    max_concurrent: usize,
    kill_grace: Duration,
    sweep_after: Duration,
    info: NodeInfo,
    outbox: Arc<Outbox>,
    /// Changed by a key rotation while a connection is served (never locked across an await).
    identity: Mutex<Option<Identity>>,
    scheduler: Option<Scheduler>,
    key_rotation: Duration,
    /// Frames of the key rotation, sent by the writer before the outbox's.
    control: Mutex<Vec<AgentFrame>>,
    /// Notified when a rotation finished.
    rotated: Notify,
    /// The protocol version the server named in its last upgrade response, if it did.
    server_version: Option<u32>,
    /// Session streams; hung up when a connection ends.
    streams: Arc<Streams>,
}

impl Channel {
    /// Registers under this EC2 instance id (when the node registers at all).
    pub fn register_as(&mut self, instance_id: Option<NodeId>) {
        self.instance_id = instance_id;
    }

    /// A channel to `urls` (the WebSocket URLs, tried in turn) for an agent with these settings. With an identity,
    /// it takes over what an earlier agent process left in the state directory.
    pub fn new(
        config: &crate::AgentConfig,
        urls: Vec<String>,
        tls: crate::tls::Tls,
        info: NodeInfo,
        outbox: Arc<Outbox>,
        identity: Option<Identity>,
    ) -> Result<Self, AgentError> {
        let outbox_for_streams = Arc::clone(&outbox);
        let mut channel = Channel {
            url: urls.first().cloned().unwrap_or_default(),
            urls,
            tls,
            state_dir: config.state_dir.clone(),
            activation_code: config.activation_code.clone(),
            instance_id: None,
            tags: config.tags.clone(),
            heartbeat: Duration::from_secs(config.heartbeat_secs.max(1)),
            max_concurrent: config.max_concurrent_commands,
            kill_grace: config.kill_grace,
            sweep_after: config.sweep_after,
            info,
            outbox,
            identity: Mutex::new(None),
            scheduler: None,
            key_rotation: config.key_rotation,
            control: Mutex::default(),
            rotated: Notify::new(),
            server_version: None,
            streams: Streams::new(
                Arc::clone(&outbox_for_streams),
                config.max_streams,
                config.kill_grace,
            ),
        };
        if let Some(identity) = identity {
            channel.adopt(identity)?;
        }
        Ok(channel)
    }

    fn adopt(&mut self, identity: Identity) -> Result<(), AgentError> {
        let scheduler = Scheduler::new(
            Arc::clone(&self.outbox),
            &self.state_dir,
            identity.node_id.to_string(),
            self.max_concurrent,
            self.kill_grace,
            self.sweep_after,
        )
        .map_err(|e| AgentError::Io(format!("cannot read {}", self.state_dir.display()), e))?;
        scheduler.recover()?;
        self.scheduler = Some(scheduler);
        *self.identity.lock() = Some(identity);
        Ok(())
    }

    /// Runs the state machine; returns only for a fatal error.
    pub async fn run(&mut self) -> Result<(), AgentError> {
        let mut state = State::Connecting;
        let mut backoff = Backoff::default();
        loop {
            state = match state {
                State::Connecting => match self.connect().await {
                    Ok(Some((ws, heartbeat))) => {
                        backoff.reset();
                        State::Connected { ws, heartbeat }
                    }
                    // Registered: connect again at once, now with Hello.
                    Ok(None) => State::Connecting,
                    Err(ConnError::Fatal(e)) => return Err(e),
                    Err(ConnError::Transport(why)) => {
                        tracing::warn!(url = %self.url, "cannot connect: {why}");
                        self.next_url();
                        State::Disconnected { retry_after: None }
                    }
                    Err(ConnError::Throttled { why, retry_after }) => {
                        tracing::warn!(url = %self.url, ?retry_after, "cannot connect: {why}");
                        State::Disconnected {
                            retry_after: Some(retry_after),
                        }
                    }
                },
                State::Connected { ws, heartbeat } => {
                    let since = Instant::now();
                    tracing::info!(url = %self.url, "connected");
                    match self.serve(*ws, heartbeat).await {
                        ConnError::Fatal(e) => return Err(e),
                        ConnError::Transport(why) | ConnError::Throttled { why, .. } => {
                            tracing::warn!("disconnected: {why}");
                        }
                    }
                    // The same server first (a blip, a restart); the next one if it cannot be
                    // reached (`connect` failing above).
                    if since.elapsed() > STABLE_AFTER {
                        backoff.reset();
                    }
                    State::Disconnected { retry_after: None }
                }
                State::Disconnected { retry_after } => {
                    let delay = redial_delay(
                        backoff.next_delay(),
                        retry_after,
                        rand::rng().random_range(0.0..=1.0),
                    );
                    tracing::debug!(?delay, "waiting before re-dialing");
                    tokio::time::sleep(delay).await;
                    State::Connecting
                }
            };
        }
    }

    /// Turns to the next server URL (replicas), if there are several.
    fn next_url(&mut self) {
        if self.urls.len() > 1
            && let Some(i) = self.urls.iter().position(|u| *u == self.url)
        {
            self.url = self.urls[(i + 1) % self.urls.len()].clone();
        }
    }

    /// Dials and shakes hands. `Some` with the socket and heartbeat after `Welcome`; `None` after a
    /// successful registration (the caller connects again with `Hello`).
    async fn connect(&mut self) -> Result<Option<(Box<Ws>, Duration)>, ConnError> {
        tracing::debug!(url = %self.url, "connecting");
        let (mut ws, upgraded) = tokio::time::timeout(
            DIAL_TIMEOUT,
            // Nagle off: small frames (Started, Finished, a line of output) must leave at once.
            tokio_tungstenite::connect_async_tls_with_config(
                self.url.as_str(),
                Some(ws_config()),
                true,
                Some(self.tls.connector()),
            ),
        )
        .await
        .map_err(|_| transport("timed out"))?
        .map_err(dial_error)?;
        self.server_version = server_version(upgraded.headers());
        let identity = self.identity.lock().clone();
        // Whom a refusal is for: an `Error` answering `Register` refuses the registration.
        let (server, registering) = (self.server_version, identity.is_none());
        let refused = move |code, message| refusal(code, message, server, registering);
        let answer_timeout = self.heartbeat * 3;
        // The server speaks first: the challenge our first frame signs.
        let nonce = match receive(&mut ws, Instant::now() + answer_timeout).await? {
            ServerFrame::Challenge { nonce } => nonce,
            ServerFrame::Error { code, message } => return Err(refused(code, message)),
            other => {
                return Err(transport(format!(
                    "expected Challenge, got {} (is the server older than this agent?)",
                    frame_name(&other)
                )));
            }
        };
        match identity {
            None => {
                let Some(activation_code) = self.activation_code.clone() else {
                    return Err(ConnError::Fatal(AgentError::NoIdentity(
                        self.state_dir.clone(),
                    )));
                };
                let key = identity::generate_key();
                let public_key = key.public_key();
                let hello = match &self.instance_id {
                    None => AgentFrame::Register {
                        protocol_version: PROTOCOL_VERSION,
                        activation_code,
                        public_key: public_key.to_vec(),
                        signature: key.sign(&auth::register_message(&nonce, &public_key)),
                        info: self.info.clone(),
                        tags: self.tags.clone(),
                    },
                    Some(id) => AgentFrame::RegisterInstance {
                        protocol_version: PROTOCOL_VERSION,
                        activation_code,
                        public_key: public_key.to_vec(),
                        signature: key.sign(&auth::register_instance_message(
                            &nonce,
                            &public_key,
                            id.as_str(),
                        )),
                        info: self.info.clone(),
                        tags: self.tags.clone(),
                        instance_id: id.to_string(),
                    },
                };
                match exchange(&mut ws, hello, answer_timeout).await? {
                    ServerFrame::Registered { node_id } => {
                        // A pinned CA is kept before the identity: a node never holds an
                        // identity without knowing whom to trust.
                        self.tls.confirm().map_err(ConnError::Fatal)?;
                        let identity = Identity::new(node_id, key, now_ms());
                        identity::save(&self.state_dir, &identity).map_err(ConnError::Fatal)?;
                        tracing::info!(node_id = %identity.node_id, "registered");
                        self.adopt(identity).map_err(ConnError::Fatal)?;
                        let _ = ws.close(None).await;
                        Ok(None)
                    }
                    ServerFrame::Error { code, message } => Err(refused(code, message)),
                    other => Err(transport(format!(
                        "unexpected answer to Register: {}",
                        frame_name(&other)
                    ))),
                }
            }
            Some(identity) => {
                let (public_key, signature) = identity.sign_hello(&nonce);
                let hello = AgentFrame::Hello {
                    protocol_version: PROTOCOL_VERSION,
                    node_id: identity.node_id.clone(),
                    public_key,
                    signature,
                    info: self.info.clone(),
                    known: self.outbox.known(),
                };
                match exchange(&mut ws, hello, answer_timeout).await? {
                    ServerFrame::Welcome {
                        protocol_version,
                        heartbeat_secs,
                    } => {
                        tracing::debug!(protocol_version, heartbeat_secs, "welcome");
                        self.tls.confirm().map_err(ConnError::Fatal)?;
                        // The server drops connections silent for 3 of its heartbeats: ping at
                        // least that often.
                        let heartbeat = match heartbeat_secs {
                            0 => self.heartbeat,
                            s => self.heartbeat.min(Duration::from_secs(s)),
                        };
                        Ok(Some((Box::new(ws), heartbeat)))
                    }
                    ServerFrame::Error { code, message } => Err(refused(code, message)),
                    other => Err(transport(format!(
                        "unexpected answer to Hello: {}",
                        frame_name(&other)
                    ))),
                }
            }
        }
    }

    /// Serves a connection after `Welcome` until it fails: a reader handling server frames and
    /// a writer sending due frames and pings, run side by side so neither blocks the other.
    async fn serve(&self, ws: Ws, heartbeat: Duration) -> ConnError {
        self.outbox.rewind();
        // A rotation cut off with the last connection starts again from the identity file's state.
        self.control.lock().clear();
        let (sink, source) = ws.split();
        let ended = tokio::select! {
            r = self.read_loop(source, heartbeat * 3) => r,
            r = self.write_loop(sink, heartbeat) => r,
            r = self.rotate_loop() => r,
        };
        // Nobody hears these streams any more: their processes are hung up.
        self.streams.hang_up_all();
        match ended {
            Err(e) => e,
            Ok(never) => match never {},
        }
    }

    /// Handles server frames; fails when the server is silent for `silence` (no frame, no pong).
    async fn read_loop(
        &self,
        mut source: SplitStream<Ws>,
        silence: Duration,
    ) -> Result<Infallible, ConnError> {
        loop {
            let msg = tokio::time::timeout(silence, source.next())
                .await
                .map_err(|_| transport(format!("nothing from the server for {silence:?}")))?;
            match msg {
                None => return Err(transport("connection closed")),
                Some(Err(e)) => return Err(transport(e)),
                Some(Ok(Message::Binary(bytes))) => {
                    let frame = ServerFrame::decode(&bytes).map_err(transport)?;
                    self.handle(frame)?;
                }
                Some(Ok(Message::Text(_))) => return Err(transport("unexpected text message")),
                Some(Ok(Message::Close(close))) => {
                    return Err(transport(format!(
                        "server closed the connection: {close:?}"
                    )));
                }
                // Pings (answered by tungstenite), pongs and raw frames only prove liveness.
                Some(Ok(_)) => {}
            }
        }
    }

    /// Sends whatever the outbox has due, and a ping every `heartbeat`.
    async fn write_loop(
        &self,
        mut sink: SplitSink<Ws, Message>,
        heartbeat: Duration,
    ) -> Result<Infallible, ConnError> {
        let mut next_ping = Instant::now() + heartbeat;
        loop {
            if Instant::now() >= next_ping {
                sink.send(Message::Ping(Default::default()))
                    .await
                    .map_err(transport)?;
                next_ping = Instant::now() + heartbeat;
            }
            let mut batch = std::mem::take(&mut *self.control.lock());
            batch.extend(self.outbox.next_batch());
            batch.extend(self.streams.take_frames());
            if batch.is_empty() {
                tokio::select! {
                    () = self.outbox.ready().notified() => {}
                    () = tokio::time::sleep_until(next_ping) => {}
                }
                continue;
            }
            for frame in batch {
                sink.feed(Message::Binary(frame.encode().into()))
                    .await
                    .map_err(transport)?;
            }
            sink.flush().await.map_err(transport)?;
        }
    }

    /// Acts on one frame from a live connection.
    fn handle(&self, frame: ServerFrame) -> Result<(), ConnError> {
        match frame {
            ServerFrame::Run(req) => match &self.scheduler {
                Some(s) => s.submit(req),
                None => tracing::warn!("Run before identity: ignored"),
            },
            ServerFrame::Cancel { command_id } => {
                if self.outbox.cancel(&command_id) {
                    tracing::info!(%command_id, "cancel requested");
                } else {
                    tracing::debug!(%command_id, "cancel for a command not running: ignored");
                }
            }
            ServerFrame::Ack { stream, offset } => self.outbox.ack(&stream, offset),
            ServerFrame::ResultAck { command_id } => {
                if let Some(s) = &self.scheduler {
                    s.result_acked(&command_id);
                }
            }
            ServerFrame::Error { code, message } => {
                return Err(refusal(code, message, self.server_version, false));
            }
            ServerFrame::KeyRotated { public_key } => self.key_rotated(&public_key),
            ServerFrame::StreamOpen {
                stream,
                kind,
                window,
            } => self.streams.open(stream, kind, window),
            ServerFrame::StreamData { stream, bytes } => self.streams.data(stream, bytes),
            ServerFrame::StreamCredit { stream, bytes } => self.streams.credit(stream, bytes),
            ServerFrame::StreamEof { stream } => self.streams.eof(stream),
            ServerFrame::StreamClose { stream, reason } => self.streams.close(stream, reason),
            ServerFrame::StreamResize { stream, rows, cols } => {
                self.streams.resize(stream, rows, cols)
            }
            other @ (ServerFrame::Welcome { .. }
            | ServerFrame::Registered { .. }
            | ServerFrame::Challenge { .. }) => {
                tracing::debug!("ignoring unexpected {}", frame_name(&other));
            }
        }
        Ok(())
    }
}

impl Drop for Channel {
    /// The agent stops: no session stream's process outlives it.
    fn drop(&mut self) {
        self.streams.shutdown();
    }
}

impl Channel {
    /// Rotates the node's key whenever it is older than `--key-rotation`, over the live connection:
    /// persist a pending key, send `RotateKey`, and wait for `KeyRotated` (see [`identity`]).
    async fn rotate_loop(&self) -> Result<Infallible, ConnError> {
        loop {
            let due_in = match &*self.identity.lock() {
                Some(id) => id.rotation_due_in(now_ms(), self.key_rotation),
                None => Duration::MAX,
            };
            tokio::time::sleep(due_in.min(Duration::from_secs(86_400))).await;
            let frame = {
                let mut guard = self.identity.lock();
                let Some(id) = guard.as_mut() else { continue };
                if !id.rotation_due_in(now_ms(), self.key_rotation).is_zero() {
                    continue;
                }
                // Work on a copy: the pending key is in use only once it is on disk.
                let mut next = id.clone();
                let frame = next.begin_rotation();
                if let Err(e) = identity::save(&self.state_dir, &next) {
                    tracing::error!("cannot rotate the node key: {e}");
                    None
                } else {
                    *id = next;
                    Some(frame)
                }
            };
            let Some(frame) = frame else {
                // Try again later; the current key stays valid meanwhile.
                tokio::time::sleep(Duration::from_secs(60)).await;
                continue;
            };
            tracing::info!("rotating the node key");
            self.control.lock().push(frame);
            self.outbox.ready().notify_one();
            // Wait for KeyRotated; without it (a lost answer) the next connection resends.
            self.rotated.notified().await;
        }
    }

    /// The server stored the new key: make it current, on disk first, then confirm it.
    fn key_rotated(&self, public_key: &[u8]) {
        let confirm = {
            let mut guard = self.identity.lock();
            let Some(id) = guard.as_mut() else { return };
            let mut next = id.clone();
            let Some(confirm) = next.finish_rotation(public_key, now_ms()) else {
                tracing::debug!("KeyRotated for a key not pending: ignored");
                return;
            };
            if let Err(e) = identity::save(&self.state_dir, &next) {
                // The server accepts the old key until the new one is confirmed: retried after
                // the next reconnect.
                tracing::error!("cannot store the rotated node key: {e}");
                return;
            }
            *id = next;
            confirm
        };
        tracing::info!(key = %auth::fingerprint(public_key), "node key rotated");
        self.control.lock().push(confirm);
        self.outbox.ready().notify_one();
        self.rotated.notify_one();
    }
}

/// An `Error` frame: fatal for the codes no retry can fix ([`ErrorCode::is_fatal`]), a transport
/// error otherwise. A version mismatch names both versions (`server`: from the upgrade response).
fn refusal(code: String, message: String, server: Option<u32>, registering: bool) -> ConnError {
    let typed = ErrorCode::parse(&code);
    if !typed.is_fatal() {
        return transport(format!("server error {code}: {message}"));
    }
    ConnError::Fatal(match typed {
        ErrorCode::ProtocolVersion => AgentError::ProtocolVersion {
            agent: PROTOCOL_VERSION,
            server,
            message,
        },
        _ if registering => AgentError::RegistrationRefused { code, message },
        _ => AgentError::Rejected { code, message },
    })
}

/// The protocol version a server names in its upgrade response (absent before version 2's
/// header was added, or unreadable: `None`).
fn server_version(headers: &tokio_tungstenite::tungstenite::http::HeaderMap) -> Option<u32> {
    headers
        .get(PROTOCOL_VERSION_HEADER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Sends the first frame and waits for the server's first binary answer.
async fn exchange(
    ws: &mut Ws,
    first: AgentFrame,
    timeout: Duration,
) -> Result<ServerFrame, ConnError> {
    ws.send(Message::Binary(first.encode().into()))
        .await
        .map_err(transport)?;
    receive(ws, Instant::now() + timeout).await
}

/// Waits for the server's next binary frame during the handshake.
async fn receive(ws: &mut Ws, deadline: Instant) -> Result<ServerFrame, ConnError> {
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| transport("no answer to the handshake"))?;
        match msg {
            None => return Err(transport("connection closed during the handshake")),
            Some(Err(e)) => return Err(transport(e)),
            Some(Ok(Message::Binary(bytes))) => {
                return ServerFrame::decode(&bytes).map_err(transport);
            }
            Some(Ok(Message::Close(close))) => {
                return Err(transport(format!(
                    "server closed the connection during the handshake: {close:?}"
                )));
            }
            Some(Ok(Message::Text(_))) => return Err(transport("unexpected text message")),
            Some(Ok(_)) => {}
        }
    }
}

fn frame_name(frame: &ServerFrame) -> &'static str {
    match frame {
        ServerFrame::Welcome { .. } => "Welcome",
        ServerFrame::Registered { .. } => "Registered",
        ServerFrame::Run(_) => "Run",
        ServerFrame::Cancel { .. } => "Cancel",
        ServerFrame::Ack { .. } => "Ack",
        ServerFrame::ResultAck { .. } => "ResultAck",
        ServerFrame::Error { .. } => "Error",
        ServerFrame::Challenge { .. } => "Challenge",
        ServerFrame::KeyRotated { .. } => "KeyRotated",
        ServerFrame::StreamOpen { .. } => "StreamOpen",
        ServerFrame::StreamData { .. } => "StreamData",
        ServerFrame::StreamCredit { .. } => "StreamCredit",
        ServerFrame::StreamEof { .. } => "StreamEof",
        ServerFrame::StreamClose { .. } => "StreamClose",
        ServerFrame::StreamResize { .. } => "StreamResize",
    }
}

/// The channel's WebSocket limits: no message or frame larger than the largest legal server frame
/// (tungstenite's defaults would buffer up to 64 MiB from a misbehaving server).
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    let max = Some(fleetrun_proto::limits::CHANNEL_MESSAGE_MAX);
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(max)
        .max_frame_size(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        for _ in 0..40 {
            assert!(b.next_delay() <= BACKOFF_MAX);
        }
        assert!(b.failures >= 40);
        b.reset();
        assert!(b.next_delay() <= BACKOFF_START);
    }

    #[test]
    fn retry_after_sets_a_floor_with_jitter() {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        // No Retry-After: the backoff's own (already jittered) delay.
        assert_eq!(redial_delay(ms(150), None, 0.7), ms(150));
        // Retry-After: N to 1.5 N, never below the backoff.
        assert_eq!(redial_delay(ms(150), Some(s(10)), 0.0), s(10));
        assert_eq!(redial_delay(ms(150), Some(s(10)), 1.0), s(15));
        assert_eq!(redial_delay(ms(150), Some(s(10)), 0.5), ms(12_500));
        assert_eq!(redial_delay(s(20), Some(s(10)), 0.5), s(20));
        assert_eq!(redial_delay(ms(150), Some(s(0)), 1.0), ms(150));
        assert_eq!(retry_after_secs(Some(" 7 ")), Some(s(7)));
        assert_eq!(retry_after_secs(Some("999999")), Some(RETRY_AFTER_MAX));
        assert_eq!(
            retry_after_secs(Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            None
        );
        assert_eq!(retry_after_secs(None), None);
    }

    #[test]
    fn a_503_handshake_is_throttling() {
        use tokio_tungstenite::tungstenite::Error;
        use tokio_tungstenite::tungstenite::http::Response;
        let resp = Response::builder()
            .status(503)
            .header("Retry-After", "12")
            .body(None)
            .unwrap();
        match dial_error(Error::Http(Box::new(resp))) {
            ConnError::Throttled { retry_after, .. } => {
                assert_eq!(retry_after, Duration::from_secs(12));
            }
            other => panic!("{other:?}"),
        }
        let resp = Response::builder().status(500).body(None).unwrap();
        assert!(matches!(
            dial_error(Error::Http(Box::new(resp))),
            ConnError::Transport(_)
        ));
    }

    #[test]
    fn only_refusals_of_the_node_are_fatal() {
        let refused = |code: &str, registering| refusal(code.into(), "x".into(), None, registering);
        assert!(matches!(
            refused("UnknownNode", false),
            ConnError::Fatal(AgentError::Rejected { .. })
        ));
        assert!(matches!(
            refused("InvalidActivation", true),
            ConnError::Fatal(AgentError::RegistrationRefused { .. })
        ));
        // The server could not store the registration: try again.
        assert!(matches!(
            refused("InternalError", true),
            ConnError::Transport(_)
        ));
        assert!(matches!(
            refused("HandshakeTimeout", false),
            ConnError::Transport(_)
        ));
        assert!(matches!(
            refused("SomethingNewer", false),
            ConnError::Transport(_)
        ));
    }

    #[test]
    fn a_version_mismatch_names_both_versions() {
        let ConnError::Fatal(e) = refusal("ProtocolVersion".into(), "no".into(), Some(9), false)
        else {
            panic!("not fatal");
        };
        let text = e.to_string();
        assert!(
            text.contains(&format!(
                "this agent speaks channel protocol version {PROTOCOL_VERSION}"
            )),
            "{text}"
        );
        assert!(text.contains("the server version 9"), "{text}");
        let ConnError::Fatal(e) = refusal("ProtocolVersion".into(), "no".into(), None, true) else {
            panic!("not fatal");
        };
        assert!(e.to_string().contains("the server another version"), "{e}");
        let mut headers = tokio_tungstenite::tungstenite::http::HeaderMap::new();
        assert_eq!(server_version(&headers), None);
        headers.insert(PROTOCOL_VERSION_HEADER, " 7 ".parse().unwrap());
        assert_eq!(server_version(&headers), Some(7));
    }
}
