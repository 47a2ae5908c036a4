//! Which agents are connected, and the way to send them frames.
//!
//! One entry per connected node, holding the sending side of its connection's writer queue. The queue
//! is unbounded on purpose: what the server sends is bounded by the protocol (Run frames by max
//! concurrency, Acks by the data the agent sent within its window), and a dispatcher must never block
//! on one slow agent.

use crate::sessions::streams::Streams;
use fleetrun_proto::NodeId;
use fleetrun_proto::channel::{ErrorCode, ServerFrame};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::{broadcast, mpsc, oneshot};

/// Capacity of the node-online broadcast; a dispatcher that lags rescans the nodes it waits for.
const ONLINE_EVENTS: usize = 4096;

/// The registry of live agent connections.
pub struct Hub {
    conns: Mutex<HashMap<NodeId, Conn>>,
    next_conn: AtomicU64,
    online: broadcast::Sender<NodeId>,
    /// Set by [`Hub::close_all`]: sessions ending now end for the shutdown, not a revocation.
    closing: AtomicBool,
}

struct Conn {
    id: u64,
    tx: mpsc::UnboundedSender<ServerFrame>,
    /// The connection's session streams (and its agent's protocol version).
    streams: Arc<Streams>,
    /// Fired to end the session at once (deregistration, shutdown).
    revoked: Option<oneshot::Sender<()>>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            conns: Mutex::default(),
            next_conn: AtomicU64::new(1),
            online: broadcast::channel(ONLINE_EVENTS).0,
            closing: AtomicBool::new(false),
        }
    }
}

impl Hub {
    /// Registers a node's new connection, replacing (and so closing) an older one. Returns its id and
    /// a receiver that fires when the node is revoked (the session must then end).
    pub fn connect(
        &self,
        node: &NodeId,
        tx: mpsc::UnboundedSender<ServerFrame>,
        streams: Arc<Streams>,
    ) -> (u64, oneshot::Receiver<()>) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (revoked, on_revoke) = oneshot::channel();
        self.conns.lock().insert(
            node.clone(),
            Conn {
                id,
                tx,
                streams,
                revoked: Some(revoked),
            },
        );
        (id, on_revoke)
    }

    /// Ends a node's live connection at once: queues `Error{UnknownNode}` (the agent exits on it) and
    /// tells its session to close. Returns whether it was connected.
    pub fn revoke(&self, node: &NodeId, message: &str) -> bool {
        let Some(mut conn) = self.conns.lock().remove(node) else {
            return false;
        };
        let _ = conn
            .tx
            .send(ServerFrame::error(ErrorCode::UnknownNode, message));
        if let Some(r) = conn.revoked.take() {
            let _ = r.send(());
        }
        true
    }

    /// Closes a node's connection here without a word to its agent, which has a newer one on
    /// another replica. Returns whether it was connected here.
    pub fn close_stale(&self, node: &NodeId) -> bool {
        let Some(mut conn) = self.conns.lock().remove(node) else {
            return false;
        };
        if let Some(r) = conn.revoked.take() {
            let _ = r.send(());
        }
        true
    }

    /// Tells every live session to close (shutdown): the agents see the socket close and reconnect
    /// later. The entries stay until each session ends and disconnects.
    pub fn close_all(&self) {
        self.closing.store(true, Ordering::Relaxed);
        for conn in self.conns.lock().values_mut() {
            if let Some(r) = conn.revoked.take() {
                let _ = r.send(());
            }
        }
    }

    /// Whether [`Hub::close_all`] was called (the server is shutting down).
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Tells dispatchers that a node is online (after its connection was reconciled).
    pub fn announce_online(&self, node: &NodeId) {
        let _ = self.online.send(node.clone());
    }

    /// Removes a node's connection, unless a newer one replaced it.
    pub fn disconnect(&self, node: &NodeId, conn_id: u64) {
        let mut conns = self.conns.lock();
        if conns.get(node).is_some_and(|c| c.id == conn_id) {
            conns.remove(node);
        }
    }

    /// Queues a frame for a node; false when the node is not connected.
    pub fn send(&self, node: &NodeId, frame: ServerFrame) -> bool {
        self.conns
            .lock()
            .get(node)
            .is_some_and(|c| c.tx.send(frame).is_ok())
    }

    /// The session streams of a node's live connection; `None` when it is not connected.
    pub fn streams(&self, node: &NodeId) -> Option<Arc<Streams>> {
        self.conns.lock().get(node).map(|c| c.streams.clone())
    }

    /// Whether a node is connected.
    pub fn is_online(&self, node: &NodeId) -> bool {
        self.conns.lock().contains_key(node)
    }

    /// Number of connected nodes.
    pub fn online_count(&self) -> usize {
        self.conns.lock().len()
    }

    /// Node-online events.
    pub fn subscribe_online(&self) -> broadcast::Receiver<NodeId> {
        self.online.subscribe()
    }
}
