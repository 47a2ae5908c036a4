//! DescribeInstanceInformation: the fleet as SSM's managed instances.

use super::shapes::*;
use super::{
    SsmError, SsmResult, check_instance_id, check_max_results, epoch, next_token, parse_token,
};
use crate::AppState;
use crate::access::authz::{Action, Principal, Resource};
use crate::errors::Code;
use fleetrun_proto::NodeId;
use fleetrun_proto::api::Node;
use fleetrun_proto::targets::{TargetExpr, TargetTerm, shown};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::Arc;

/// Keys of the legacy filter list (SSM's InstanceInformationFilterKey enum).
const LEGACY_KEYS: [&str; 8] = [
    "InstanceIds",
    "AgentVersion",
    "PingStatus",
    "PlatformTypes",
    "ActivationIds",
    "IamRole",
    "ResourceType",
    "AssociationStatus",
];

/// Most filters in one request (either list; SSM's model sets no maximum, its keys are few: ten
/// distinct keys cover every sensible query). Bounds the tag-index query built from them.
const FILTERS_MAX: usize = 10;

/// Refuses more than [`FILTERS_MAX`] filters in either list.
fn check_filter_counts(req: &DescribeInstanceInformationRequest) -> Result<(), SsmError> {
    for (member, n) in [
        (
            "instanceInformationFilterList",
            req.instance_information_filter_list
                .as_ref()
                .map_or(0, Vec::len),
        ),
        ("filters", req.filters.as_ref().map_or(0, Vec::len)),
    ] {
        if n > FILTERS_MAX {
            return Err(SsmError::new(
                Code::Validation,
                format!(
                    "1 validation error detected: Value at '{member}' failed to satisfy constraint: Member must have length less than or equal to {FILTERS_MAX}"
                ),
            ));
        }
    }
    Ok(())
}

pub async fn describe_instance_information(
    state: &Arc<AppState>,
    p: &Principal,
    req: DescribeInstanceInformationRequest,
) -> SsmResult {
    if req.filters.is_some() && req.instance_information_filter_list.is_some() {
        return Err(SsmError::new(
            Code::InvalidFilterKey,
            "Filters and InstanceInformationFilterList cannot be used in the same request.",
        ));
    }
    let limit = check_max_results(req.max_results, 5, 50, 10)?;
    let offset = parse_token(req.next_token.as_deref())?;
    check_filter_counts(&req)?;
    let mut filters: Vec<(String, Vec<String>)> = Vec::new();
    for f in req.instance_information_filter_list.unwrap_or_default() {
        if !LEGACY_KEYS.contains(&f.key.as_str()) {
            return Err(SsmError::new(
                Code::InvalidFilterKey,
                format!("Filter key {} is not valid.", shown(&f.key)),
            ));
        }
        filters.push((f.key, f.value_set));
    }
    for f in req.filters.unwrap_or_default() {
        let ok = LEGACY_KEYS.contains(&f.key.as_str())
            || f.key == "tag-key"
            || f.key.starts_with("tag:");
        if !ok {
            return Err(SsmError::new(
                Code::InvalidFilterKey,
                format!("Filter key {} is not valid.", shown(&f.key)),
            ));
        }
        filters.push((f.key, f.values));
    }
    if filters.len() > FILTERS_MAX {
        return Err(SsmError::new(
            Code::InvalidFilter,
            format!(
                "{} filters given; at most {FILTERS_MAX} are accepted.",
                filters.len()
            ),
        ));
    }
    for (key, values) in &filters {
        super::check_target_key(key, "filters.member.key", values, "filters.member.values")?;
        if values.is_empty() || values.len() > 100 {
            return Err(SsmError::new(
                Code::InvalidInstanceInformationFilterValue,
                format!("Filter {key} needs 1 to 100 values."),
            ));
        }
        if key == "PingStatus"
            && values
                .iter()
                .any(|v| !matches!(v.as_str(), "Online" | "ConnectionLost" | "Inactive"))
        {
            return Err(SsmError::new(
                Code::InvalidInstanceInformationFilterValue,
                format!(
                    "PingStatus values must be Online, ConnectionLost or Inactive, not {values:?}."
                ),
            ));
        }
        if key == "InstanceIds" {
            for v in values {
                check_instance_id(v).map_err(|_| {
                    SsmError::new(
                        Code::InvalidNodeId,
                        format!("Instance Id {v} is not valid."),
                    )
                })?;
            }
        }
    }

    // Tag filters go through the tag index; the rest are checked per node.
    let tag_terms: Vec<TargetTerm> = filters
        .iter()
        .filter_map(|(k, v)| match k.as_str() {
            "tag-key" => Some(TargetTerm::TagKey(v.clone())),
            k => k.strip_prefix("tag:").map(|t| TargetTerm::Tag {
                key: t.to_owned(),
                values: v.clone(),
            }),
        })
        .collect();
    let tagged: Option<HashSet<NodeId>> = if tag_terms.is_empty() {
        None
    } else {
        Some(
            state
                .store
                .resolve_targets(&TargetExpr(tag_terms))
                .await?
                .into_iter()
                .map(|(id, _)| id)
                .collect(),
        )
    };
    let mut nodes = state
        .store
        .list_nodes(|n, at| state.node_online(n, at))
        .await?;
    state.authz.filtered(p);
    nodes.retain(|n| {
        let r = crate::api::node_ref(n);
        state.authz.allowed(p, Action::List, Resource::Node(&r))
    });
    let matching: Vec<&Node> = nodes
        .iter()
        .filter(|n| tagged.as_ref().is_none_or(|t| t.contains(&n.node_id)))
        .filter(|n| filters.iter().all(|(k, v)| matches_filter(n, k, v)))
        .collect();
    let page: Vec<Value> = matching
        .iter()
        .skip(offset as usize)
        .take(limit as usize)
        .map(|n| instance(n))
        .collect();
    let mut out = json!({ "InstanceInformationList": page });
    let token = next_token(offset, page.len(), limit);
    if !token.is_null() && (offset as usize + page.len()) < matching.len() {
        out["NextToken"] = token;
    }
    Ok(out)
}

fn matches_filter(n: &Node, key: &str, values: &[String]) -> bool {
    let any = |v: &str| values.iter().any(|x| x == v);
    match key {
        "InstanceIds" => any(n.node_id.as_str()),
        "AgentVersion" => any(&n.agent_version),
        "PingStatus" => any(&n.ping_status),
        "PlatformTypes" => any(platform_type(&n.platform)),
        "ActivationIds" => any(&n.activation_id),
        "ResourceType" => any(resource_type(n).0),
        "IamRole" | "AssociationStatus" => false,
        _ => true, // tag filters were applied through the index
    }
}

/// SSM's PlatformType (`Linux`, `MacOS`, `Windows`) of an agent's platform.
fn platform_type(platform: &str) -> &'static str {
    match platform {
        "macos" => "MacOS",
        "windows" => "Windows",
        _ => "Linux",
    }
}

/// `Debian GNU/Linux 12 (bookworm)` → (`Debian GNU/Linux`, `12`).
fn platform(os: &str) -> (String, String) {
    let mut name = Vec::new();
    let mut words = os.split_whitespace();
    for w in words.by_ref() {
        if w.starts_with(|c: char| c.is_ascii_digit()) {
            return (name.join(" "), w.to_owned());
        }
        name.push(w);
    }
    (name.join(" "), String::new())
}

/// SSM's ResourceType and SourceType of a node: an EC2 instance (registered under its `i-` id)
/// or a managed (hybrid) instance.
fn resource_type(n: &Node) -> (&'static str, &'static str) {
    if n.node_id.is_ec2() {
        ("EC2Instance", "AWS::EC2::Instance")
    } else {
        ("ManagedInstance", "AWS::SSM::ManagedInstance")
    }
}

fn instance(n: &Node) -> Value {
    let (resource_type, source_type) = resource_type(n);
    let (platform_name, platform_version) = platform(&n.os);
    let ms = fleetrun_proto::time::parse_rfc3339_ms;
    let mut v = json!({
        "InstanceId": n.node_id,
        "PingStatus": n.ping_status,
        "LastPingDateTime": epoch(ms(&n.last_seen)),
        "AgentVersion": n.agent_version,
        "IsLatestVersion": n.agent_version == fleetrun_proto::version::FLEETRUN_VERSION,
        "PlatformType": platform_type(&n.platform),
        "PlatformName": platform_name,
        "PlatformVersion": platform_version,
        "ActivationId": n.activation_id,
        "RegistrationDate": epoch(ms(&n.registered_at)),
        "ResourceType": resource_type,
        "Name": n.name,
        "ComputerName": n.hostname,
        "SourceId": n.node_id,
        "SourceType": source_type,
    });
    // SSM's IPAddress has a minimum length of 1: leave it out rather than send "".
    if let Some(ip) = n.ips.first() {
        v["IPAddress"] = json!(ip);
    }
    v
}

#[cfg(test)]
mod tests {
    #[test]
    fn platform_splits_name_and_version() {
        assert_eq!(
            super::platform("Debian GNU/Linux 12 (bookworm)"),
            ("Debian GNU/Linux".into(), "12".into())
        );
        assert_eq!(super::platform("Linux"), ("Linux".into(), String::new()));
    }
}

#[cfg(test)]
mod filter_tests {
    use super::*;

    /// 1,001 tag filters built one query past SQLite's expression depth (a 500); now a 400.
    #[test]
    fn filter_lists_are_capped_naming_the_limit() {
        let filters = |n: usize| json!({"Filters": (0..n).map(|i| json!({"Key": format!("tag:k{i}"), "Values": ["v"]})).collect::<Vec<_>>()});
        let req: DescribeInstanceInformationRequest =
            serde_json::from_value(filters(1_001)).unwrap();
        let e = check_filter_counts(&req).unwrap_err();
        assert_eq!(
            (e.code().aws_status(), e.code().aws_code()),
            (axum::http::StatusCode::BAD_REQUEST, "ValidationException")
        );
        assert!(
            e.error
                .message
                .contains(&format!("less than or equal to {FILTERS_MAX}")),
            "{}",
            e.error.message
        );
        let req: DescribeInstanceInformationRequest =
            serde_json::from_value(filters(FILTERS_MAX)).unwrap();
        assert!(check_filter_counts(&req).is_ok());
        let legacy = json!({"InstanceInformationFilterList": (0..11).map(|_| json!({"key": "PingStatus", "valueSet": ["Online"]})).collect::<Vec<_>>()});
        let req: DescribeInstanceInformationRequest = serde_json::from_value(legacy).unwrap();
        assert!(
            check_filter_counts(&req)
                .unwrap_err()
                .error
                .message
                .contains("instanceInformationFilterList")
        );
    }
}
