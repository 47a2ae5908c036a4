//! `GET /v1/nodes`, `GET /v1/nodes/{node_id}`: the fleet.

use super::{ApiError, parse_id};
use crate::AppState;
use axum::Json;
use axum::extract::{Path, State};
use fleetrun_proto::NodeId;
use fleetrun_proto::api::Node;
use std::sync::Arc;

/// Every node with its ping status.
pub async fn list(State(state): State<Arc<AppState>>) -> Result<Json<Vec<Node>>, ApiError> {
    Ok(Json(
        state.store.list_nodes(|n| state.hub.is_online(n)).await?,
    ))
}

/// One node.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Path(node_id): Path<String>,
) -> Result<Json<Node>, ApiError> {
    let id: NodeId = parse_id(&node_id, "InvalidNodeId")?;
    state
        .store
        .get_node(&id, |n| state.hub.is_online(n))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("NodeNotFound", format!("no node {id}")))
}
