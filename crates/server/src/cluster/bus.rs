//! The bus between replicas: NATS core (`--nats-url`), nothing durable in it. The database stays
//! the truth; the bus carries what one replica must tell another now:
//!
//! - `fleetrun.node.<node>.frame`: a request holding a frame for a node, answered by the replica
//!   that holds the node's connection (it subscribes to `fleetrun.node.<node>.*` while the agent
//!   is connected). No responder means the node is offline.
//! - `fleetrun.node.<node>.follow`: a follower's request for live output of the node's
//!   invocation (`cluster::follow`).
//! - `fleetrun.online`: a node came online on some replica; dispatchers waiting for it wake, and
//!   a replica still holding an older connection of the node closes it.
//! - `fleetrun.command.<command>`: a message for the command's dispatcher (an end reported by an
//!   agent, a cancel from the API, a lost delivery), taken by whichever replica runs it.
//! - `fleetrun.fleet`: a node registered, left or had its tags changed: every replica drops the
//!   authorization scopes it cached from the fleet.
//! - `fleetrun.changed.<command>`: the command changed (a start, an end, its final status), for
//!   its watchers on every replica.
//!
//! A message lost while NATS is down is made up for from the database: when the connection comes
//! back, every dispatcher here loads its command again (`Dispatchers::reload_all`).

use crate::AppState;
use crate::run::dispatch::DispatchMsg;
use anyhow::Context;
use async_nats::client::RequestErrorKind;
use bytes::Bytes;
use fleetrun_proto::channel::ServerFrame;
use fleetrun_proto::{CommandId, NodeId};
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Longest wait for a replica to answer a frame for its node.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for the first connection to NATS at start.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued for the bus while it is slow or down; past that they are dropped (and made up
/// for from the database when it is back).
const OUTBOX: usize = 65_536;

const ONLINE: &str = "fleetrun.online";
const COMMANDS: &str = "fleetrun.command.*";
const CHANGED: &str = "fleetrun.changed.*";
const FLEET: &str = "fleetrun.fleet";

fn node_subject(node: &NodeId, what: &str) -> String {
    format!("fleetrun.node.{node}.{what}")
}

fn command_subject(cmd: &CommandId) -> String {
    format!("fleetrun.command.{cmd}")
}

/// How a frame for a node went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued on the node's connection (here or on the replica holding it).
    Sent,
    /// No replica holds a connection of the node.
    Offline,
    /// The bus failed (NATS down, a replica that did not answer): try again later.
    Unreachable,
}

/// This replica's connection to the bus.
pub struct Bus {
    client: async_nats::Client,
    replica_id: String,
    outbox: mpsc::Sender<(String, Bytes)>,
    /// Fired when the connection to NATS comes back after a loss.
    pub reconnected: Arc<tokio::sync::Notify>,
}

impl Bus {
    /// Connects to NATS at `url` as replica `replica_id`; the connection then heals by itself.
    pub async fn connect(url: &str, replica_id: &str) -> anyhow::Result<Arc<Bus>> {
        let reconnected = Arc::new(tokio::sync::Notify::new());
        let on_event = reconnected.clone();
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let client = async_nats::ConnectOptions::new()
            .name(format!("fleetrun-server {replica_id}"))
            .connection_timeout(CONNECT_TIMEOUT)
            .request_timeout(Some(REQUEST_TIMEOUT))
            .max_reconnects(None)
            .event_callback(move |event| {
                let (on_event, lost) = (on_event.clone(), lost.clone());
                async move {
                    use std::sync::atomic::Ordering;
                    match event {
                        async_nats::Event::Disconnected => {
                            lost.store(true, Ordering::Relaxed);
                            tracing::warn!("lost the connection to NATS; reconnecting");
                        }
                        async_nats::Event::Connected if lost.swap(false, Ordering::Relaxed) => {
                            tracing::info!("connected to NATS again");
                            on_event.notify_one();
                        }
                        other => tracing::debug!("NATS: {other}"),
                    }
                }
            })
            .connect(url)
            .await
            .with_context(|| format!("cannot connect to NATS at {}", redact(url)))?;
        let (outbox, queued) = mpsc::channel(OUTBOX);
        tokio::spawn(post_loop(client.clone(), queued));
        Ok(Arc::new(Bus {
            client,
            replica_id: replica_id.to_owned(),
            outbox,
            reconnected,
        }))
    }

    /// The NATS connection.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Hands `frame` to the replica holding `node`'s connection.
    pub async fn deliver(&self, node: &NodeId, frame: &ServerFrame) -> Delivery {
        let payload = Bytes::from(frame.encode());
        match self
            .client
            .request(node_subject(node, "frame"), payload)
            .await
        {
            Ok(reply) if reply.payload.as_ref() == b"1" => Delivery::Sent,
            // Its replica answered that the connection just went.
            Ok(_) => Delivery::Offline,
            Err(e) if e.kind() == RequestErrorKind::NoResponders => Delivery::Offline,
            Err(e) => {
                tracing::warn!(%node, "cannot reach the node's replica through NATS: {e}");
                Delivery::Unreachable
            }
        }
    }

    /// Tells the other replicas that `node` is online here.
    pub fn announce_online(&self, node: &NodeId) {
        let payload = format!("{} {node}", self.replica_id);
        self.post(ONLINE.to_owned(), Bytes::from(payload));
    }

    /// Passes `msg` to the dispatcher of `cmd`, on whichever replica runs it.
    pub fn to_dispatcher(&self, cmd: &CommandId, msg: &DispatchMsg) {
        match serde_json::to_vec(msg) {
            Ok(bytes) => self.post(command_subject(cmd), Bytes::from(bytes)),
            Err(e) => tracing::error!(%cmd, "cannot encode a dispatcher message: {e}"),
        }
    }

    /// Tells the other replicas that the fleet changed (`AppState::fleet_changed`).
    pub fn fleet_changed(&self) {
        self.post(FLEET.to_owned(), Bytes::from(self.replica_id.clone()));
    }

    /// Tells the other replicas' watchers of `cmd` that it changed.
    pub fn changed(&self, cmd: &CommandId) {
        let subject = format!("fleetrun.changed.{cmd}");
        self.post(subject, Bytes::from(self.replica_id.clone()));
    }

    /// Queues a publish, in order with the others; dropped with a warning when the queue is full.
    fn post(&self, subject: String, payload: Bytes) {
        if self.outbox.try_send((subject, payload)).is_err() {
            tracing::warn!("NATS outbox full: a message to the other replicas is dropped");
        }
    }

    /// Answers frames for `node` while the returned guard lives (its agent's session here).
    pub async fn serve_node(
        &self,
        state: &Arc<AppState>,
        node: &NodeId,
    ) -> Result<Serving, async_nats::SubscribeError> {
        let mut requests = self.client.subscribe(node_subject(node, "*")).await?;
        let (state, node, client) = (state.clone(), node.clone(), self.client.clone());
        let frames = node_subject(&node, "frame");
        let follows = node_subject(&node, "follow");
        let task = tokio::spawn(async move {
            while let Some(msg) = requests.next().await {
                if msg.subject.as_str() == follows {
                    let (state, client, node) = (state.clone(), client.clone(), node.clone());
                    tokio::spawn(async move {
                        crate::cluster::follow::serve(&state, &client, &node, msg).await
                    });
                    continue;
                }
                if msg.subject.as_str() != frames {
                    continue;
                }
                let sent = match ServerFrame::decode(&msg.payload) {
                    Ok(frame) => state.hub.send(&node, frame),
                    Err(e) => {
                        tracing::warn!(%node, "a bad frame for the node from another replica: {e}");
                        false
                    }
                };
                if let Some(reply) = msg.reply {
                    let answer: &'static [u8] = if sent { b"1" } else { b"0" };
                    if let Err(e) = client.publish(reply, Bytes::from_static(answer)).await {
                        tracing::warn!(%node, "cannot answer another replica: {e}");
                    }
                }
            }
        });
        Ok(Serving(task))
    }
}

/// Answers frames for a node while it lives; dropping it unsubscribes.
pub struct Serving(tokio::task::JoinHandle<()>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `url` without the user and password it may hold, for errors and logs.
fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

async fn post_loop(client: async_nats::Client, mut queued: mpsc::Receiver<(String, Bytes)>) {
    while let Some((subject, payload)) = queued.recv().await {
        if let Err(e) = client.publish(subject, payload).await {
            tracing::warn!("cannot publish to NATS: {e}");
        }
    }
}

/// Takes what other replicas publish for this one until shutdown: nodes online elsewhere, and
/// messages for the dispatchers running here; after a loss of NATS, reloads every dispatcher.
pub async fn run(state: Arc<AppState>, bus: Arc<Bus>) {
    let subscribed = async {
        let online = bus.client.subscribe(ONLINE).await?;
        let commands = bus.client.subscribe(COMMANDS).await?;
        let changed = bus.client.subscribe(CHANGED).await?;
        let fleet = bus.client.subscribe(FLEET).await?;
        Ok::<_, async_nats::SubscribeError>((online, commands, changed, fleet))
    };
    let (mut online, mut commands, mut changed, mut fleet) = match subscribed.await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot subscribe to the other replicas' messages: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = bus.reconnected.notified() => {
                // What the bus dropped meanwhile is read from the database again.
                state.dispatchers.reload_all(&state);
                state.authz.fleet_changed();
            }
            Some(msg) = online.next() => on_online(&state, &bus, &msg.payload),
            Some(msg) = commands.next() => on_command(&state, &msg),
            Some(msg) = changed.next() => on_changed(&state, &bus, &msg),
            // Whoever sent it (itself included: it dropped its own already), scopes go.
            Some(_) = fleet.next() => state.authz.fleet_changed(),
        }
    }
}

fn on_online(state: &AppState, bus: &Bus, payload: &[u8]) {
    let parsed = std::str::from_utf8(payload)
        .ok()
        .and_then(|s| s.split_once(' '))
        .and_then(|(replica, node)| Some((replica, NodeId::try_from(node.to_owned()).ok()?)));
    let Some((replica, node)) = parsed else {
        tracing::warn!("a bad online message on the bus");
        return;
    };
    if replica == bus.replica_id {
        return;
    }
    // Its nodes show Online here at once, not only after this replica's next heartbeat.
    state.replica.saw_peer(replica);
    // The agent has one connection: one held here is older than the one it just made there.
    if state.hub.close_stale(&node) {
        tracing::info!(%node, replica, "node reconnected to another replica; closing its old connection here");
    }
    state.hub.announce_online(&node);
}

fn on_changed(state: &AppState, bus: &Bus, msg: &async_nats::Message) {
    if msg.payload.as_ref() == bus.replica_id.as_bytes() {
        return;
    }
    let cmd = msg
        .subject
        .as_str()
        .strip_prefix("fleetrun.changed.")
        .and_then(|c| c.parse::<CommandId>().ok());
    if let Some(cmd) = cmd {
        state.dispatchers.bump_here(&cmd);
    }
}

fn on_command(state: &AppState, msg: &async_nats::Message) {
    let cmd = msg
        .subject
        .as_str()
        .strip_prefix("fleetrun.command.")
        .and_then(|c| c.parse::<CommandId>().ok());
    let Some(cmd) = cmd else { return };
    if !state.dispatchers.is_running(&cmd) {
        return;
    }
    match serde_json::from_slice::<DispatchMsg>(&msg.payload) {
        Ok(m) => {
            state.dispatchers.send_here(&cmd, m);
        }
        Err(e) => tracing::warn!(%cmd, "a bad dispatcher message on the bus: {e}"),
    }
}
