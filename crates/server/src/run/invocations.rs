//! The one place invocations end: stored (`finish_invocations`), their output actors closed, their
//! dispatcher and the command's watchers told.
//!
//! Every path that ends an invocation (a result, the dispatcher's timeouts, expiry and cancels, a
//! reconnect that finds a run lost, a deregistration) comes here, so none can leave an actor (and
//! its buffers) behind for an invocation that will never send another byte.

use crate::AppState;
use crate::run::dispatch::{DispatchMsg, Dispatchers};
use crate::run::output::Outputs;
use fleetrun_proto::{CommandId, NodeId};
use fleetrun_store::{Fence, Finish, Store, StoreError};
use std::collections::HashSet;

/// What ending invocations touches: the store, the output actors and the dispatchers.
#[derive(Clone, Copy)]
pub struct Ender<'a> {
    store: &'a Store,
    outputs: &'a Outputs,
    dispatchers: &'a Dispatchers,
    /// The dispatcher's hold on the command, for the ends it decides (None for an agent's
    /// results and a node's deregistration: facts about the node).
    fence: Option<&'a Fence>,
}

impl<'a> Ender<'a> {
    /// The parts of the server's state that ending needs.
    pub fn new(store: &'a Store, outputs: &'a Outputs, dispatchers: &'a Dispatchers) -> Self {
        Ender {
            store,
            outputs,
            dispatchers,
            fence: None,
        }
    }

    /// The same, for a dispatcher holding its command with `fence`: nothing ends once another
    /// owner holds the command (`StoreError::Fenced`).
    pub fn fenced(self, fence: &'a Fence) -> Self {
        Ender {
            fence: Some(fence),
            ..self
        }
    }

    /// The same, from the whole state.
    pub fn of(state: &'a AppState) -> Self {
        Self::new(&state.store, &state.outputs, &state.dispatchers)
    }

    /// Ends invocations: stores them (only those not terminal yet change), waits until their output
    /// actors have flushed and stopped, then tells the dispatcher and watchers. Returns the nodes
    /// whose invocation this call ended.
    pub async fn end(
        self,
        cmd: &CommandId,
        ends: Vec<(NodeId, Finish)>,
    ) -> Result<Vec<NodeId>, StoreError> {
        self.end_but(cmd, ends, None).await
    }

    /// Ends the invocation an output actor holds the result of; that actor stops itself after this
    /// (closing it from here would wait on itself).
    pub(crate) async fn end_from_actor(
        self,
        cmd: &CommandId,
        node: &NodeId,
        finish: Finish,
    ) -> Result<Vec<NodeId>, StoreError> {
        self.end_but(cmd, vec![(node.clone(), finish)], Some(node))
            .await
    }

    async fn end_but(
        self,
        cmd: &CommandId,
        ends: Vec<(NodeId, Finish)>,
        actor: Option<&NodeId>,
    ) -> Result<Vec<NodeId>, StoreError> {
        let ended = self
            .store
            .finish_invocations(cmd, &ends, self.fence)
            .await?;
        if ended.is_empty() {
            return Ok(ended);
        }
        let ended_set: HashSet<&NodeId> = ended.iter().collect();
        // Closed before watchers hear of the end: once a command reads as ended, its output is
        // flushed and no actor of its ended invocations is left.
        for node in ended.iter().filter(|n| Some(*n) != actor) {
            self.outputs.close(&(cmd.clone(), node.clone())).await;
        }
        // Their output is complete now: the exporter may write it to S3 (the end queued that).
        self.store.wake_exports();
        let msg: Vec<(NodeId, bool)> = ends
            .iter()
            .filter(|(n, _)| ended_set.contains(n))
            .map(|(n, f)| (n.clone(), f.is_error()))
            .collect();
        self.dispatchers.send(cmd, DispatchMsg::Ended(msg));
        self.dispatchers.cleanup.notify_one();
        self.dispatchers.bump(cmd);
        Ok(ended)
    }
}
