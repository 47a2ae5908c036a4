//! The agent's one connection to the server, as an explicit state machine:
//! Connecting → Connected → Disconnected (jittered exponential backoff) → Connecting.
//!
//! Only transport errors are retried. A refusal of the node (`Error` answering `Register`, or
//! `UnknownNode`/`InvalidActivation`/`ProtocolVersion` answering `Hello`) is fatal.

use crate::error::AgentError;
use crate::identity::{self, Identity};
use crate::outbox::Outbox;
use crate::scheduler::Scheduler;
use fleetrun_proto::channel::{AgentFrame, NodeInfo, ServerFrame};
use fleetrun_proto::version::PROTOCOL_VERSION;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
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
/// Error codes answering `Hello` that no retry can fix.
const FATAL_CODES: [&str; 3] = ["UnknownNode", "InvalidActivation", "ProtocolVersion"];

/// Why a connection ended.
#[derive(Debug)]
enum ConnError {
    /// Network trouble, a bad frame or an unexpected answer: re-dial after a backoff.
    Transport(String),
    /// The server refuses the node: give up.
    Fatal(AgentError),
}

fn transport(what: impl std::fmt::Display) -> ConnError {
    ConnError::Transport(what.to_string())
}

/// The connection's states.
enum State {
    Connecting,
    Connected { ws: Box<Ws>, heartbeat: Duration },
    Disconnected,
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

/// What the connection needs to know and to drive.
pub struct Channel {
    url: String,
    state_dir: PathBuf,
    activation_code: Option<String>,
    tags: BTreeMap<String, String>,
    heartbeat: Duration,
    max_concurrent: usize,
    kill_grace: Duration,
    info: NodeInfo,
    outbox: Arc<Outbox>,
    identity: Option<Identity>,
    scheduler: Option<Scheduler>,
}

impl Channel {
    /// A channel to `url` (the WebSocket URL) for an agent with these settings.
    pub fn new(
        config: &crate::AgentConfig,
        url: String,
        info: NodeInfo,
        outbox: Arc<Outbox>,
        identity: Option<Identity>,
    ) -> Self {
        let mut channel = Channel {
            url,
            state_dir: config.state_dir.clone(),
            activation_code: config.activation_code.clone(),
            tags: config.tags.clone(),
            heartbeat: Duration::from_secs(config.heartbeat_secs.max(1)),
            max_concurrent: config.max_concurrent_commands,
            kill_grace: config.kill_grace,
            info,
            outbox,
            identity: None,
            scheduler: None,
        };
        if let Some(identity) = identity {
            channel.adopt(identity);
        }
        channel
    }

    fn adopt(&mut self, identity: Identity) {
        self.scheduler = Some(Scheduler::new(
            Arc::clone(&self.outbox),
            &self.state_dir,
            identity.node_id.to_string(),
            self.max_concurrent,
            self.kill_grace,
        ));
        self.identity = Some(identity);
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
                        State::Disconnected
                    }
                },
                State::Connected { ws, heartbeat } => {
                    let since = Instant::now();
                    tracing::info!(url = %self.url, "connected");
                    match self.serve(*ws, heartbeat).await {
                        ConnError::Fatal(e) => return Err(e),
                        ConnError::Transport(why) => tracing::warn!("disconnected: {why}"),
                    }
                    if since.elapsed() > STABLE_AFTER {
                        backoff.reset();
                    }
                    State::Disconnected
                }
                State::Disconnected => {
                    let delay = backoff.next_delay();
                    tracing::debug!(?delay, "waiting before re-dialing");
                    tokio::time::sleep(delay).await;
                    State::Connecting
                }
            };
        }
    }

    /// Dials and shakes hands. `Some` with the socket and heartbeat after `Welcome`; `None` after a
    /// successful registration (the caller connects again with `Hello`).
    async fn connect(&mut self) -> Result<Option<(Box<Ws>, Duration)>, ConnError> {
        tracing::debug!(url = %self.url, "connecting");
        let (mut ws, _) = tokio::time::timeout(
            DIAL_TIMEOUT,
            // Nagle off: small frames (Started, Finished, a line of output) must leave at once.
            tokio_tungstenite::connect_async_with_config(self.url.as_str(), None, true),
        )
        .await
        .map_err(|_| transport("timed out"))?
        .map_err(transport)?;
        let answer_timeout = self.heartbeat * 3;
        match &self.identity {
            None => {
                let Some(activation_code) = self.activation_code.clone() else {
                    return Err(ConnError::Fatal(AgentError::NoIdentity(
                        self.state_dir.clone(),
                    )));
                };
                let hello = AgentFrame::Register {
                    protocol_version: PROTOCOL_VERSION,
                    activation_code,
                    info: self.info.clone(),
                    tags: self.tags.clone(),
                };
                match exchange(&mut ws, hello, answer_timeout).await? {
                    ServerFrame::Registered { node_id, secret } => {
                        let identity = Identity { node_id, secret };
                        identity::save(&self.state_dir, &identity).map_err(ConnError::Fatal)?;
                        tracing::info!(node_id = %identity.node_id, "registered");
                        self.adopt(identity);
                        let _ = ws.close(None).await;
                        Ok(None)
                    }
                    ServerFrame::Error { code, message } => {
                        Err(ConnError::Fatal(AgentError::RegistrationRefused {
                            code,
                            message,
                        }))
                    }
                    other => Err(transport(format!(
                        "unexpected answer to Register: {}",
                        frame_name(&other)
                    ))),
                }
            }
            Some(identity) => {
                let hello = AgentFrame::Hello {
                    protocol_version: PROTOCOL_VERSION,
                    node_id: identity.node_id.clone(),
                    secret: identity.secret.clone(),
                    info: self.info.clone(),
                    known: self.outbox.known(),
                };
                match exchange(&mut ws, hello, answer_timeout).await? {
                    ServerFrame::Welcome {
                        protocol_version,
                        heartbeat_secs,
                    } => {
                        tracing::debug!(protocol_version, heartbeat_secs, "welcome");
                        // The server drops connections silent for 3 of its heartbeats: ping at
                        // least that often.
                        let heartbeat = match heartbeat_secs {
                            0 => self.heartbeat,
                            s => self.heartbeat.min(Duration::from_secs(s)),
                        };
                        Ok(Some((Box::new(ws), heartbeat)))
                    }
                    ServerFrame::Error { code, message } => Err(refusal(code, message)),
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
        let (sink, source) = ws.split();
        let ended = tokio::select! {
            r = self.read_loop(source, heartbeat * 3) => r,
            r = self.write_loop(sink, heartbeat) => r,
        };
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
            let batch = self.outbox.next_batch();
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
            ServerFrame::Error { code, message } => return Err(refusal(code, message)),
            other @ (ServerFrame::Welcome { .. } | ServerFrame::Registered { .. }) => {
                tracing::debug!("ignoring unexpected {}", frame_name(&other));
            }
        }
        Ok(())
    }
}

/// An `Error` frame: fatal for the codes no retry can fix, a transport error otherwise.
fn refusal(code: String, message: String) -> ConnError {
    if FATAL_CODES.contains(&code.as_str()) {
        ConnError::Fatal(AgentError::Rejected { code, message })
    } else {
        transport(format!("server error {code}: {message}"))
    }
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
    let deadline = Instant::now() + timeout;
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
    }
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
    fn only_identity_errors_are_fatal() {
        assert!(matches!(
            refusal("UnknownNode".into(), "x".into()),
            ConnError::Fatal(_)
        ));
        assert!(matches!(
            refusal("Internal".into(), "x".into()),
            ConnError::Transport(_)
        ));
    }
}
