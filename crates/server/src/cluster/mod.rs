//! This server as one replica of several on one database: its identity, its heartbeat, and the
//! commands it owns (dispatches) under a lease, taken over from a replica that went silent
//! (`replica`); the bus that carries frames and messages between replicas (`bus`); and live
//! output followed from another replica than the agent's (`follow`).

pub mod bus;
pub mod follow;
pub mod replica;

use crate::AppState;
use bus::Delivery;
use fleetrun_proto::NodeId;
use fleetrun_proto::channel::ServerFrame;

/// Sends `frame` to `node`: on its connection here, or through the bus to the replica holding
/// it (when there are replicas).
pub async fn deliver(state: &AppState, node: &NodeId, frame: ServerFrame) -> Delivery {
    if let Some(bus) = &state.bus
        && !state.hub.is_online(node)
    {
        return bus.deliver(node, &frame).await;
    }
    if state.hub.send(node, frame) {
        Delivery::Sent
    } else {
        Delivery::Offline
    }
}
