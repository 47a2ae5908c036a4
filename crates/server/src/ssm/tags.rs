//! AddTagsToResource, RemoveTagsFromResource, ListTagsForResource on managed instances: the
//! native node tags (`crate::api::nodes::retag`), so target resolution and tag policies see a
//! change at once. Other resource types are refused by name.

use super::shapes::*;
use super::{SsmError, SsmResult};
use crate::AppState;
use crate::access::authz::{Action, Principal, Resource};
use crate::api::{node_ref, nodes};
use crate::errors::Code;
use fleetrun_proto::NodeId;
use fleetrun_proto::api::NodeTagsChange;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

/// SSM's ResourceTypeForTagging values: known, but only ManagedInstance is tagged here.
const SSM_RESOURCE_TYPES: [&str; 9] = [
    "Document",
    "ManagedInstance",
    "MaintenanceWindow",
    "Parameter",
    "PatchBaseline",
    "OpsItem",
    "OpsMetadata",
    "Automation",
    "Association",
];

fn validation(member: &str, what: &str) -> SsmError {
    SsmError::new(
        Code::Validation,
        format!(
            "1 validation error detected: Value at '{member}' failed to satisfy constraint: {what}"
        ),
    )
}

/// The managed instance a tagging request names.
fn instance(resource_type: Option<&str>, resource_id: Option<&str>) -> Result<NodeId, SsmError> {
    let ty = resource_type.ok_or_else(|| validation("resourceType", "Member must not be null"))?;
    if !SSM_RESOURCE_TYPES.contains(&ty) {
        return Err(validation(
            "resourceType",
            &format!(
                "Member must satisfy enum value set: [{}]",
                SSM_RESOURCE_TYPES.join(", ")
            ),
        ));
    }
    if ty != "ManagedInstance" {
        return Err(SsmError::new(
            Code::InvalidResourceType,
            format!("fleetrun tags ManagedInstance resources only, not {ty}."),
        ));
    }
    let id = resource_id.ok_or_else(|| validation("resourceId", "Member must not be null"))?;
    id.parse::<NodeId>().map_err(|_| {
        SsmError::new(
            Code::InvalidResourceId,
            format!("{id} is not a managed instance id (mi- and 17 hex digits)."),
        )
    })
}

/// A node a tagging call names that is not registered is SSM's InvalidResourceId.
fn resource_error(e: SsmError) -> SsmError {
    if e.code() == Code::NodeNotFound {
        SsmError::new(Code::InvalidResourceId, e.error.message)
    } else {
        e
    }
}

fn tag_list(tags: &BTreeMap<String, String>) -> Value {
    Value::Array(
        tags.iter()
            .map(|(k, v)| json!({ "Key": k, "Value": v }))
            .collect(),
    )
}

pub async fn add_tags_to_resource(
    state: &Arc<AppState>,
    p: &Principal,
    req: AddTagsToResourceRequest,
) -> SsmResult {
    let id = instance(req.resource_type.as_deref(), req.resource_id.as_deref())?;
    let tags = req
        .tags
        .ok_or_else(|| validation("tags", "Member must not be null"))?;
    let mut change = NodeTagsChange::default();
    for t in tags {
        let key = t
            .key
            .ok_or_else(|| validation("tags.member.key", "Member must not be null"))?;
        let value = t
            .value
            .ok_or_else(|| validation("tags.member.value", "Member must not be null"))?;
        change.set.insert(key, value);
    }
    nodes::retag(state, p, &id, &change)
        .await
        .map_err(resource_error)?;
    Ok(json!({}))
}

pub async fn remove_tags_from_resource(
    state: &Arc<AppState>,
    p: &Principal,
    req: RemoveTagsFromResourceRequest,
) -> SsmResult {
    let id = instance(req.resource_type.as_deref(), req.resource_id.as_deref())?;
    let keys = req
        .tag_keys
        .ok_or_else(|| validation("tagKeys", "Member must not be null"))?;
    let change = NodeTagsChange {
        set: BTreeMap::new(),
        remove: keys,
    };
    nodes::retag(state, p, &id, &change)
        .await
        .map_err(resource_error)?;
    Ok(json!({}))
}

pub async fn list_tags_for_resource(
    state: &Arc<AppState>,
    p: &Principal,
    req: ListTagsForResourceRequest,
) -> SsmResult {
    let id = instance(req.resource_type.as_deref(), req.resource_id.as_deref())?;
    let node = state
        .store
        .get_node(&id, |n| state.hub.is_online(n))
        .await?
        .ok_or_else(|| {
            SsmError::new(Code::InvalidResourceId, format!("no managed instance {id}"))
        })?;
    state
        .authz
        .require(p, Action::List, Resource::Node(&node_ref(&node)))?;
    Ok(json!({ "TagList": tag_list(&node.tags) }))
}
