//! AddTagsToResource, RemoveTagsFromResource, ListTagsForResource. On managed instances: the
//! native node tags (`crate::api::nodes::retag`), so target resolution and tag policies see a
//! change at once; on documents and parameters, their own tags (CreateDocument's and a new
//! parameter's `Tags` too). Other resource types are refused by name.

use super::shapes::*;
use super::{SsmError, SsmResult};
use crate::AppState;
use crate::access::authz::{Action, Principal, Resource};
use crate::api::{node_ref, nodes};
use crate::errors::Code;
use fleetrun_proto::NodeId;
use fleetrun_proto::api::NodeTagsChange;
use fleetrun_store::Tagged;
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

/// What a tagging request names: a managed instance (the native node tags), a document or a
/// parameter (their own tags, `fleetrun_store::Tagged`).
enum Target {
    Node(NodeId),
    Other(Tagged, String),
}

/// The resource a tagging request names.
fn target(resource_type: Option<&str>, resource_id: Option<&str>) -> Result<Target, SsmError> {
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
    let id = resource_id.ok_or_else(|| validation("resourceId", "Member must not be null"))?;
    if id.is_empty() || id.len() > 2048 {
        return Err(validation(
            "resourceId",
            "Member must have length between 1 and 2048",
        ));
    }
    match ty {
        "ManagedInstance" => {
            let node = id.parse::<NodeId>().map_err(|_| {
                SsmError::new(
                    Code::InvalidResourceId,
                    format!("{id:.64} is not a managed instance id (mi- and 17 hex digits)."),
                )
            })?;
            // As SSM: an EC2 instance's tags are EC2's (`aws ec2 create-tags`, served here too).
            if node.is_ec2() {
                return Err(SsmError::new(
                    Code::InvalidResourceId,
                    format!(
                        "{id} is an EC2 instance, not a ManagedInstance: tag it with ec2 CreateTags / DeleteTags / DescribeTags."
                    ),
                ));
            }
            Ok(Target::Node(node))
        }
        "Document" => Ok(Target::Other(Tagged::Document, id.to_owned())),
        "Parameter" => Ok(Target::Other(Tagged::Param, id.to_owned())),
        other => Err(SsmError::new(
            Code::InvalidResourceType,
            format!(
                "fleetrun tags ManagedInstance, Document and Parameter resources, not {other}."
            ),
        )),
    }
}

/// The tags a request's `Tags` list gives (CreateDocument, PutParameter): checked as a change.
pub fn tags_given(tags: Option<Vec<Tag>>) -> Result<BTreeMap<String, String>, SsmError> {
    let change = NodeTagsChange {
        set: tag_map(tags.unwrap_or_default())?,
        remove: Vec::new(),
    };
    nodes::check_tag_change(&change)?;
    if change.set.len() > nodes::NODE_TAGS_MAX {
        return Err(SsmError::new(
            Code::TooManyTags,
            format!(
                "{} tags given; a resource carries at most {}",
                change.set.len(),
                nodes::NODE_TAGS_MAX
            ),
        ));
    }
    Ok(change.set)
}

fn tag_map(tags: Vec<Tag>) -> Result<BTreeMap<String, String>, SsmError> {
    let mut map = BTreeMap::new();
    for t in tags {
        let key = t
            .key
            .ok_or_else(|| validation("tags.member.key", "Member must not be null"))?;
        let value = t
            .value
            .ok_or_else(|| validation("tags.member.value", "Member must not be null"))?;
        map.insert(key, value);
    }
    Ok(map)
}

/// What changing or reading a document's or parameter's tags needs.
fn require(
    state: &AppState,
    p: &Principal,
    kind: Tagged,
    name: &str,
    write: bool,
) -> SsmResult<()> {
    let (action, resource) = match (kind, write) {
        (Tagged::Document, true) => (Action::ManageDocuments, Resource::Document(name)),
        (Tagged::Document, false) => (Action::List, Resource::Document(name)),
        (Tagged::Param, true) => (Action::ManageParams, Resource::Fleet),
        (Tagged::Param, false) => (Action::List, Resource::Fleet),
    };
    state.authz.require(p, action, resource)?;
    Ok(())
}

fn no_resource(kind: Tagged, name: &str) -> SsmError {
    let what = match kind {
        Tagged::Document => "document",
        Tagged::Param => "parameter",
    };
    SsmError::new(Code::InvalidResourceId, format!("no {what} {name}"))
}

/// Changes a document's or parameter's tags, by compare and swap as a node's (`nodes::retag`).
async fn retag_other(
    state: &AppState,
    p: &Principal,
    kind: Tagged,
    name: &str,
    change: &NodeTagsChange,
) -> SsmResult<()> {
    require(state, p, kind, name, true)?;
    nodes::check_tag_change(change)?;
    for _ in 0..5 {
        let before = state
            .store
            .resource_tags(kind, name)
            .await?
            .ok_or_else(|| no_resource(kind, name))?;
        let mut after = before.clone();
        after.extend(change.set.clone());
        for k in &change.remove {
            after.remove(k);
        }
        if after.len() > nodes::NODE_TAGS_MAX && after.len() > before.len() {
            return Err(SsmError::new(
                Code::TooManyTags,
                format!(
                    "{name} would carry {} tags; a resource carries at most {}",
                    after.len(),
                    nodes::NODE_TAGS_MAX
                ),
            ));
        }
        if after == before
            || state
                .store
                .swap_resource_tags(kind, name, &before, &after)
                .await?
        {
            return Ok(());
        }
    }
    Err(SsmError::new(
        Code::TooManyRequests,
        format!("the tags of {name} are changing too often to change them now; try again"),
    ))
}

/// A tag change on whatever the request names.
async fn retag(
    state: &Arc<AppState>,
    p: &Principal,
    target: Target,
    change: NodeTagsChange,
) -> SsmResult {
    match target {
        Target::Node(id) => {
            nodes::retag(state, p, &id, &change)
                .await
                .map_err(resource_error)?;
        }
        Target::Other(kind, name) => retag_other(state, p, kind, &name, &change).await?,
    }
    Ok(json!({}))
}

/// A node a tagging call names that is not registered is SSM's InvalidResourceId.
fn resource_error(e: SsmError) -> SsmError {
    if e.code() == Code::NodeNotFound {
        SsmError::new(Code::InvalidResourceId, e.error.message)
    } else {
        e
    }
}

pub fn tag_list(tags: &BTreeMap<String, String>) -> Value {
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
    let target = target(req.resource_type.as_deref(), req.resource_id.as_deref())?;
    let tags = req
        .tags
        .ok_or_else(|| validation("tags", "Member must not be null"))?;
    let change = NodeTagsChange {
        set: tag_map(tags)?,
        remove: Vec::new(),
    };
    retag(state, p, target, change).await
}

pub async fn remove_tags_from_resource(
    state: &Arc<AppState>,
    p: &Principal,
    req: RemoveTagsFromResourceRequest,
) -> SsmResult {
    let target = target(req.resource_type.as_deref(), req.resource_id.as_deref())?;
    let keys = req
        .tag_keys
        .ok_or_else(|| validation("tagKeys", "Member must not be null"))?;
    let change = NodeTagsChange {
        set: BTreeMap::new(),
        remove: keys,
    };
    retag(state, p, target, change).await
}

pub async fn list_tags_for_resource(
    state: &Arc<AppState>,
    p: &Principal,
    req: ListTagsForResourceRequest,
) -> SsmResult {
    let tags = match target(req.resource_type.as_deref(), req.resource_id.as_deref())? {
        Target::Node(id) => {
            let node = state
                .store
                .get_node(&id, |n, at| state.node_online(n, at))
                .await?
                .ok_or_else(|| {
                    SsmError::new(Code::InvalidResourceId, format!("no managed instance {id}"))
                })?;
            state
                .authz
                .require(p, Action::List, Resource::Node(&node_ref(&node)))?;
            node.tags
        }
        Target::Other(kind, name) => {
            require(state, p, kind, &name, false)?;
            state
                .store
                .resource_tags(kind, &name)
                .await?
                .ok_or_else(|| no_resource(kind, &name))?
        }
    };
    Ok(json!({ "TagList": tag_list(&tags) }))
}
