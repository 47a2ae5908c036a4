//! `GET /v1/nodes`, `GET /v1/nodes/{node_id}`, `DELETE /v1/nodes/{node_id}`: the fleet.

use super::{ApiError, parse_id};
use crate::AppState;
use crate::access::authz::{Action, NodeRef, Principal, Resource};
use crate::errors::Code;
use crate::run::invocations::Ender;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use fleetrun_proto::api::Node;
use fleetrun_proto::status::details;
use fleetrun_proto::time::now_ms;
use fleetrun_proto::{InvocationStatus, NodeId};
use fleetrun_store::Finish;
use std::sync::Arc;

/// Every node with its ping status (deregistered nodes are not listed).
/// Only the nodes the caller may list.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Vec<Node>>, ApiError> {
    let mut nodes = state.store.list_nodes(|n| state.hub.is_online(n)).await?;
    state.authz.filtered(&p);
    nodes.retain(|n| {
        state
            .authz
            .allowed(&p, Action::List, Resource::Node(&node_ref(n)))
    });
    Ok(Json(nodes))
}

/// A listed node as policies see it.
pub(crate) fn node_ref(n: &Node) -> NodeRef {
    NodeRef {
        node_id: n.node_id.clone(),
        name: n.name.clone(),
        tags: n.tags.clone(),
    }
}

/// One node.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(node_id): Path<String>,
) -> Result<Json<Node>, ApiError> {
    let id: NodeId = parse_id(&node_id, Code::InvalidNodeId)?;
    state
        .authz
        .require_node(&state.store, &p, Action::List, &id)
        .await?;
    state
        .store
        .get_node(&id, |n| state.hub.is_online(n))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::new(Code::NodeNotFound, format!("no node {id}")))
}

/// Deregisters a node: marks it (its row and history stay), closes its live connection with
/// `UnknownNode` (the agent exits), and ends its unfinished invocations (`Failed` / `Undeliverable`,
/// or `Terminated` when one had started). From then on it is not listed, not targeted, and its
/// reconnects are refused. Answers with the node as it was.
pub async fn deregister(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(node_id): Path<String>,
) -> Result<Json<Node>, ApiError> {
    let id: NodeId = parse_id(&node_id, Code::InvalidNodeId)?;
    state
        .authz
        .require_node(&state.store, &p, Action::ManageNodes, &id)
        .await?;
    let node = state
        .store
        .get_node(&id, |n| state.hub.is_online(n))
        .await?
        .ok_or_else(|| ApiError::new(Code::NodeNotFound, format!("no node {id}")))?;
    state.store.deregister_node(&id, now_ms()).await?;
    state.authz.fleet_changed();
    state
        .hub
        .revoke(&id, &format!("node {id} was deregistered"));
    for (cmd, started) in state.store.open_invocations(&id, false).await? {
        let (detail, note) = if started {
            (
                details::TERMINATED,
                "the node was deregistered while the command ran",
            )
        } else {
            (details::UNDELIVERABLE, "the node was deregistered")
        };
        let f = Finish::without_running(InvocationStatus::Failed, detail, now_ms(), note);
        Ender::of(&state).end(&cmd, vec![(id.clone(), f)]).await?;
    }
    tracing::info!(node = %id, "node deregistered");
    Ok(Json(node))
}
