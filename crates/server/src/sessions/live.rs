//! The sessions running on this server: a terminate finds its relay here, and the relays' timeouts
//! (idle, maximum duration) are set here.

use super::forward::Forward;
use fleetrun_proto::NodeId;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// A running session's entry.
struct Entry {
    node: NodeId,
    /// Tells the relay to end, with the reason.
    stop: oneshot::Sender<String>,
    /// A port forward's state, which its data sockets join.
    forward: Option<Arc<Forward>>,
}

/// The running sessions, by id, and their timeouts.
pub struct Live {
    sessions: Mutex<HashMap<String, Entry>>,
    /// A session with no bytes either way for this long is ended ("idle timeout").
    pub idle_timeout: Duration,
    /// A session running this long is ended ("max duration"); None: no limit.
    pub max_duration: Option<Duration>,
}

/// A relay's registration: ends it when dropped.
pub struct Registration<'a> {
    live: &'a Live,
    id: String,
    /// Fires when the session is to end, with the reason.
    pub stop: oneshot::Receiver<String>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.live.sessions.lock().remove(&self.id);
    }
}

impl Live {
    /// No sessions yet.
    pub fn new(idle_timeout: Duration, max_duration: Option<Duration>) -> Self {
        Live {
            sessions: Mutex::default(),
            idle_timeout,
            max_duration,
        }
    }

    /// Registers a running session.
    pub fn register(&self, id: &str, node: &NodeId) -> Registration<'_> {
        self.register_with(id, node, None)
    }

    /// Registers a running port forward, which its data sockets find by id ([`Live::forward`]).
    pub fn register_forward(&self, forward: &Arc<Forward>) -> Registration<'_> {
        self.register_with(&forward.session_id, &forward.node, Some(forward.clone()))
    }

    fn register_with(
        &self,
        id: &str,
        node: &NodeId,
        forward: Option<Arc<Forward>>,
    ) -> Registration<'_> {
        let (tx, rx) = oneshot::channel();
        self.sessions.lock().insert(
            id.to_owned(),
            Entry {
                node: node.clone(),
                stop: tx,
                forward,
            },
        );
        Registration {
            live: self,
            id: id.to_owned(),
            stop: rx,
        }
    }

    /// The node of a running session.
    pub fn node(&self, id: &str) -> Option<NodeId> {
        self.sessions.lock().get(id).map(|e| e.node.clone())
    }

    /// A running port forward.
    pub fn forward(&self, id: &str) -> Option<Arc<Forward>> {
        self.sessions.lock().get(id).and_then(|e| e.forward.clone())
    }

    /// Tells a running session to end with `reason`; false when it is not running here.
    pub fn stop(&self, id: &str, reason: String) -> bool {
        match self.sessions.lock().remove(id) {
            Some(e) => e.stop.send(reason).is_ok(),
            None => false,
        }
    }
}
