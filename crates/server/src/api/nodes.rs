//! `GET /v1/nodes`, `GET /v1/nodes/{node_id}`, `DELETE /v1/nodes/{node_id}`,
//! `PATCH /v1/nodes/{node_id}/tags`: the fleet.

use super::{ApiError, ApiJson, parse_id};
use crate::AppState;
use crate::access::authz::{Action, NodeRef, Principal, Resource};
use crate::errors::Code;
use crate::errors::{Answered, Error};
use crate::run::invocations::Ender;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use fleetrun_proto::api::{Node, NodeTagsChange};
use fleetrun_proto::status::details;
use fleetrun_proto::targets::{check_tag_key, check_tag_value};
use fleetrun_proto::time::now_ms;
use fleetrun_proto::{InvocationStatus, NodeId};
use fleetrun_store::Finish;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Every node with its ping status (deregistered nodes are not listed).
/// Only the nodes the caller may list.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Vec<Node>>, ApiError> {
    let mut nodes = state
        .store
        .list_nodes(|n, at| state.node_online(n, at))
        .await?;
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
        .get_node(&id, |n, at| state.node_online(n, at))
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
    Ok(Json(deregister_node(&state, &p, &id).await?))
}

/// Deregisters a node (see [`deregister`]); shared with SSM's DeregisterManagedInstance.
pub(crate) async fn deregister_node<D>(
    state: &AppState,
    p: &Principal,
    id: &NodeId,
) -> Result<Node, Answered<D>> {
    state
        .authz
        .require_node(&state.store, p, Action::ManageNodes, id)
        .await?;
    let node = state
        .store
        .get_node(id, |n, at| state.node_online(n, at))
        .await?
        .ok_or_else(|| Error::new(Code::NodeNotFound, format!("no node {id}")))?;
    state.store.deregister_node(id, now_ms()).await?;
    state.fleet_changed();
    state.hub.revoke(id, &format!("node {id} was deregistered"));
    for (cmd, started) in state.store.open_invocations(id, false).await? {
        let (detail, note) = if started {
            (
                details::TERMINATED,
                "the node was deregistered while the command ran",
            )
        } else {
            (details::UNDELIVERABLE, "the node was deregistered")
        };
        let f = Finish::without_running(InvocationStatus::Failed, detail, now_ms(), note);
        Ender::of(state).end(&cmd, vec![(id.clone(), f)]).await?;
    }
    tracing::info!(node = %id, "node deregistered");
    Ok(node)
}

/// Most tags a node carries (SSM's limit per resource).
pub const NODE_TAGS_MAX: usize = 50;
/// Most keys one change names (SSM's AddTagsToResource takes up to 1,000 tags).
pub const TAG_CHANGE_MAX: usize = 1_000;

/// A tag change within limits: keys and values that are valid, none both set and removed. Also
/// what documents' and parameters' tag changes are checked by (`ssm::tags`).
pub(crate) fn check_tag_change(change: &NodeTagsChange) -> Result<(), Error> {
    if change.set.len() + change.remove.len() > TAG_CHANGE_MAX {
        return Err(Error::new(
            Code::InvalidTag,
            format!("a change names at most {TAG_CHANGE_MAX} tags"),
        ));
    }
    for (k, v) in &change.set {
        check_tag_key(k).map_err(|e| Error::new(Code::InvalidTag, e.0))?;
        check_tag_value(v).map_err(|e| Error::new(Code::InvalidTag, e.0))?;
    }
    for k in &change.remove {
        check_tag_key(k).map_err(|e| Error::new(Code::InvalidTag, e.0))?;
        if change.set.contains_key(k) {
            return Err(Error::new(
                Code::InvalidTag,
                format!("tag {k} is both set and removed"),
            ));
        }
    }
    Ok(())
}

/// Changes a node's tags: sets `change.set`, removes `change.remove`. The caller needs
/// `manage-nodes` on the node as it is and as it will be, so a change cannot move a node into
/// (or out of) a scope the caller does not manage. Target resolution and policies see the new
/// tags at once. Answers with the node's tags after the change. Shared by the native route and
/// SSM's AddTagsToResource / RemoveTagsFromResource.
pub(crate) async fn retag<D>(
    state: &AppState,
    p: &Principal,
    id: &NodeId,
    change: &NodeTagsChange,
) -> Result<BTreeMap<String, String>, Answered<D>> {
    check_tag_change(change)?;
    // Compare and swap: a concurrent change makes this one start over from the new tags.
    for _ in 0..5 {
        let node = state
            .store
            .get_node(id, |n, at| state.node_online(n, at))
            .await?
            .ok_or_else(|| Error::new(Code::NodeNotFound, format!("no node {id}")))?;
        let before = node_ref(&node);
        state
            .authz
            .require(p, Action::ManageNodes, Resource::Node(&before))?;
        let mut after = before.clone();
        after.tags.extend(change.set.clone());
        for k in &change.remove {
            after.tags.remove(k);
        }
        if after.tags.len() > NODE_TAGS_MAX && after.tags.len() > before.tags.len() {
            return Err(Error::new(
                Code::TooManyTags,
                format!(
                    "node {id} would carry {} tags; a node carries at most {NODE_TAGS_MAX}",
                    after.tags.len()
                ),
            )
            .into());
        }
        state
            .authz
            .require(p, Action::ManageNodes, Resource::Node(&after))?;
        if after.tags == before.tags {
            return Ok(after.tags);
        }
        if state
            .store
            .swap_node_tags(id, &before.tags, &after.tags)
            .await?
        {
            state.fleet_changed();
            tracing::info!(node = %id, "node tags changed");
            return Ok(after.tags);
        }
    }
    Err(Error::new(
        Code::TooManyRequests,
        format!("the tags of node {id} are changing too often to change them now; try again"),
    )
    .into())
}

/// Changes a node's tags (see [`retag`]). Answers with the node.
pub async fn tag(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(node_id): Path<String>,
    ApiJson(change): ApiJson<NodeTagsChange>,
) -> Result<Json<Node>, ApiError> {
    let id: NodeId = parse_id(&node_id, Code::InvalidNodeId)?;
    retag(&state, &p, &id, &change).await?;
    state
        .store
        .get_node(&id, |n, at| state.node_online(n, at))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::new(Code::NodeNotFound, format!("no node {id}")))
}
