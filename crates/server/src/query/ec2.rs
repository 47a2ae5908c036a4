//! EC2, minimal: DescribeInstances, DescribeTags, CreateTags, DeleteTags on the fleet's nodes
//! (an instance is a node: `running` when Online, `stopped` otherwise; its `Name` tag is the
//! node's name unless it carries one), and empty DescribeVpcs / DescribeSubnets answers.

use super::xml::{DECLARATION, el};
use super::{Params, QueryResult, plain};
use crate::AppState;
use crate::access::authz::{Action, Principal, Resource};
use crate::api::{node_ref, nodes};
use crate::errors::{Code, Error};
use fleetrun_proto::NodeId;
use fleetrun_proto::api::{Node, NodeTagsChange};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

/// EC2's XML namespace.
const XMLNS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";
/// Most ids or filter values one request names.
const IDS_MAX: usize = 1_000;

pub async fn dispatch(
    state: &Arc<AppState>,
    p: &Principal,
    action: &str,
    params: &Params,
) -> QueryResult {
    let body = match action {
        "DescribeInstances" => describe_instances(state, p, params).await?,
        "DescribeTags" => describe_tags(state, p, params).await?,
        "CreateTags" => create_tags(state, p, params).await?,
        "DeleteTags" => delete_tags(state, p, params).await?,
        "DescribeVpcs" => {
            state.authz.filtered(p);
            "<vpcSet/>".to_owned()
        }
        "DescribeSubnets" => {
            state.authz.filtered(p);
            "<subnetSet/>".to_owned()
        }
        "" => {
            return Err(Error::new(
                Code::InvalidRequest,
                "the request names no Action",
            ));
        }
        other => {
            return Err(Error::new(
                Code::UnknownOperation,
                format!(
                    "EC2 action {other:.64} is not supported by fleetrun (DescribeInstances, DescribeTags, CreateTags, DeleteTags, DescribeVpcs, DescribeSubnets are)"
                ),
            ));
        }
    };
    let request_id = uuid::Uuid::new_v4();
    Ok(format!(
        "{DECLARATION}<{action}Response xmlns=\"{XMLNS}\"><requestId>{request_id}</requestId>{body}</{action}Response>"
    ))
}

/// A node's tags as EC2 shows them: with `Name` from the node's name unless it has one.
fn ec2_tags(n: &Node) -> BTreeMap<String, String> {
    let mut tags = n.tags.clone();
    tags.entry("Name".into()).or_insert_with(|| n.name.clone());
    tags
}

/// Whether an address is one EC2 would call public.
fn is_public(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                // 100.64.0.0/10, carrier-grade NAT.
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64))
        }
        IpAddr::V6(_) => false,
    }
}

/// The node's IPv4 addresses as EC2 names them: every address on its interfaces is a private
/// address (EC2's `PrivateIpAddress` is the interface's, whatever its range: a VPC may use any
/// CIDR, and the documentation or public ranges appear on hybrid nodes), and those in public ranges
/// are public ones too (on EC2 the public address is NATed and never on the interface, so a node
/// with one on its interface is a hybrid node reachable there).
fn addresses(n: &Node) -> (Vec<String>, Vec<String>) {
    let mut private = Vec::new();
    let mut public = Vec::new();
    for a in &n.ips {
        // Agents may report `addr/prefix`.
        let bare = a.split('/').next().unwrap_or(a);
        if let Ok(ip @ IpAddr::V4(_)) = bare.parse::<IpAddr>() {
            if is_public(&ip) {
                public.push(bare.to_owned());
            }
            private.push(bare.to_owned());
        }
    }
    (private, public)
}

fn state_name(n: &Node) -> &'static str {
    if n.ping_status == "Online" {
        "running"
    } else {
        "stopped"
    }
}

/// An EC2 `Filter.N.Name` / `Filter.N.Value.M` list.
fn filters(params: &Params) -> Result<Vec<(String, Vec<String>)>, Error> {
    let mut out = Vec::new();
    for (i, fields) in params.structs("Filter") {
        let name = fields
            .iter()
            .find(|(f, _)| *f == "Name")
            .map(|(_, v)| (*v).to_owned())
            .ok_or_else(|| Error::new(Code::InvalidFilter, format!("Filter.{i} has no Name")))?;
        let mut values: Vec<(u32, String)> = fields
            .iter()
            .filter_map(|(f, v)| {
                let n = f.strip_prefix("Value.")?.parse().ok()?;
                Some((n, (*v).to_owned()))
            })
            .collect();
        values.sort();
        out.push((name, values.into_iter().map(|(_, v)| v).collect::<Vec<_>>()));
    }
    if out.len() > 50 || out.iter().map(|(_, v)| v.len()).sum::<usize>() > IDS_MAX {
        return Err(Error::new(
            Code::InvalidFilter,
            format!("a request takes at most 50 filters and {IDS_MAX} values"),
        ));
    }
    Ok(out)
}

/// Whether a value matches a filter value (EC2 filters take `*` and `?` wildcards).
fn glob(pattern: &str, value: &str) -> bool {
    let (p, v): (Vec<char>, Vec<char>) = (pattern.chars().collect(), value.chars().collect());
    let (mut pi, mut vi, mut star, mut mark) = (0, 0, None, 0);
    while vi < v.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == v[vi]) {
            pi += 1;
            vi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = vi;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            vi = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

fn any(values: &[String], candidates: &[&str]) -> bool {
    values.iter().any(|v| candidates.iter().any(|c| glob(v, c)))
}

fn instance_matches(n: &Node, name: &str, values: &[String]) -> Result<bool, Error> {
    let tags = ec2_tags(n);
    let (private, public) = addresses(n);
    Ok(match name {
        "instance-id" => any(values, &[n.node_id.as_str()]),
        "private-ip-address" => any(
            values,
            &private.iter().map(String::as_str).collect::<Vec<_>>(),
        ),
        "ip-address" => any(
            values,
            &public.iter().map(String::as_str).collect::<Vec<_>>(),
        ),
        "instance-state-name" => any(values, &[state_name(n)]),
        "tag-key" => any(values, &tags.keys().map(String::as_str).collect::<Vec<_>>()),
        other => match other.strip_prefix("tag:") {
            Some(key) => tags.get(key).is_some_and(|v| any(values, &[v.as_str()])),
            None => {
                return Err(Error::new(
                    Code::InvalidFilter,
                    format!(
                        "The filter '{other:.64}' is invalid (fleetrun filters instances by instance-id, private-ip-address, ip-address, tag:KEY, tag-key, instance-state-name)"
                    ),
                ));
            }
        },
    })
}

/// The nodes the caller may list.
async fn visible_nodes(state: &AppState, p: &Principal) -> Result<Vec<Node>, Error> {
    let mut nodes = state
        .store
        .list_nodes(|n, at| state.node_online(n, at))
        .await
        .map_err(Error::from)?;
    state.authz.filtered(p);
    nodes.retain(|n| {
        state
            .authz
            .allowed(p, Action::List, Resource::Node(&node_ref(n)))
    });
    Ok(nodes)
}

fn parse_ids(ids: &[&str]) -> Result<Vec<NodeId>, Error> {
    if ids.len() > IDS_MAX {
        return Err(Error::new(
            Code::InvalidParameters,
            format!("a request names at most {IDS_MAX} instances"),
        ));
    }
    ids.iter()
        .map(|id| {
            id.parse::<NodeId>().map_err(|_| {
                Error::new(
                    Code::InvalidNodeId,
                    format!(
                        "Invalid id: \"{id:.64}\" (instance ids are i- or mi- and 17 hex digits)"
                    ),
                )
            })
        })
        .collect()
}

/// The hex digits of a node id (after `mi-` or `i-`), for ids derived from it.
fn id_digits(id: &NodeId) -> &str {
    id.as_str().split_once('-').map_or(id.as_str(), |(_, d)| d)
}

fn tag_set(tags: &BTreeMap<String, String>) -> String {
    let items: String = tags
        .iter()
        .map(|(k, v)| format!("<item>{}{}</item>", el("key", k), el("value", v)))
        .collect();
    format!("<tagSet>{items}</tagSet>")
}

fn instance_xml(n: &Node) -> String {
    let (private, public) = addresses(n);
    let (code, state) = if n.ping_status == "Online" {
        (16, "running")
    } else {
        (80, "stopped")
    };
    let arch = match n.arch.as_str() {
        "aarch64" | "arm64" => "arm64",
        _ => "x86_64",
    };
    let mut x = String::from("<item>");
    x += &el("instanceId", n.node_id.as_str());
    x += &format!("<instanceState><code>{code}</code><name>{state}</name></instanceState>");
    x += &el("privateDnsName", &n.hostname);
    if let Some(ip) = private.first() {
        x += &el("privateIpAddress", ip);
    }
    if let Some(ip) = public.first() {
        x += &el("ipAddress", ip);
    }
    x += &el("launchTime", &n.registered_at);
    x += &el("architecture", arch);
    x += &el("platformDetails", "Linux/UNIX");
    x += &tag_set(&ec2_tags(n));
    x += "</item>";
    x
}

/// A listing's page: `MaxResults` (5 to 1000, EC2's range; `None`: everything) and the offset
/// `NextToken` carries (`fr1.N`). EC2 refuses `MaxResults` beside explicit ids.
fn paging(params: &Params, ids_given: bool) -> Result<(Option<usize>, usize), Error> {
    let limit = match params.get("MaxResults") {
        None => None,
        Some(m) => match m.parse::<usize>() {
            Ok(n) if (5..=1000).contains(&n) && !ids_given => Some(n),
            _ => {
                return Err(Error::new(
                    Code::InvalidParameters,
                    format!("MaxResults {m:.32} must be 5 to 1000, and not given with InstanceIds"),
                ));
            }
        },
    };
    let offset = match params.get("NextToken") {
        None => 0,
        Some(t) => t
            .strip_prefix("fr1.")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::new(Code::InvalidNextToken, format!("Invalid NextToken {t:.64}"))
            })?,
    };
    Ok((limit, offset))
}

async fn describe_instances(
    state: &AppState,
    p: &Principal,
    params: &Params,
) -> Result<String, Error> {
    let ids = parse_ids(&params.list("InstanceId"))?;
    let filters = filters(params)?;
    let (limit, offset) = paging(params, !ids.is_empty())?;
    let nodes = visible_nodes(state, p).await?;
    if let Some(missing) = ids
        .iter()
        .find(|id| !nodes.iter().any(|n| &n.node_id == *id))
    {
        return Err(Error::new(
            Code::NodeNotFound,
            format!("The instance ID '{missing}' does not exist"),
        ));
    }
    let mut matching = Vec::new();
    for n in &nodes {
        if !ids.is_empty() && !ids.contains(&n.node_id) {
            continue;
        }
        let mut keep = true;
        for (name, values) in &filters {
            keep &= instance_matches(n, name, values)?;
        }
        if keep {
            matching.push(n);
        }
    }
    let page: Vec<&&Node> = matching
        .iter()
        .skip(offset)
        .take(limit.unwrap_or(usize::MAX))
        .collect();
    // One reservation per instance, as EC2 answers for instances launched one by one.
    let reservations: String = page
        .iter()
        .map(|n| {
            format!(
                "<item>{}<ownerId>{}</ownerId><groupSet/><instancesSet>{}</instancesSet></item>",
                el("reservationId", &format!("r-{}", id_digits(&n.node_id))),
                crate::run::document::OWNER_SELF,
                instance_xml(n)
            )
        })
        .collect();
    let mut out = format!("<reservationSet>{reservations}</reservationSet>");
    if offset + page.len() < matching.len() {
        out += &el("nextToken", &format!("fr1.{}", offset + page.len()));
    }
    Ok(out)
}

async fn describe_tags(state: &AppState, p: &Principal, params: &Params) -> Result<String, Error> {
    let filters = filters(params)?;
    let (limit, offset) = paging(params, false)?;
    let nodes = visible_nodes(state, p).await?;
    let mut items = Vec::new();
    for n in &nodes {
        for (k, v) in ec2_tags(n) {
            let mut keep = true;
            for (name, values) in &filters {
                keep &= match name.as_str() {
                    "resource-id" => any(values, &[n.node_id.as_str()]),
                    "resource-type" => any(values, &["instance"]),
                    "key" => any(values, &[k.as_str()]),
                    "value" => any(values, &[v.as_str()]),
                    other => {
                        return Err(Error::new(
                            Code::InvalidFilter,
                            format!(
                                "The filter '{other:.64}' is invalid (resource-id, resource-type, key, value)"
                            ),
                        ));
                    }
                };
            }
            if keep {
                items.push(format!(
                    "<item>{}<resourceType>instance</resourceType>{}{}</item>",
                    el("resourceId", n.node_id.as_str()),
                    el("key", &k),
                    el("value", &v)
                ));
            }
        }
    }
    // Nodes come in (name, id) order and each one's tags in key order: offsets are stable pages.
    let end = limit.map_or(items.len(), |l| items.len().min(offset.saturating_add(l)));
    let page = items.get(offset..end).unwrap_or_default().concat();
    let mut out = format!("<tagSet>{page}</tagSet>");
    if end < items.len() {
        out += &el("nextToken", &format!("fr1.{end}"));
    }
    Ok(out)
}

/// The nodes a CreateTags / DeleteTags names, each known.
fn resources(params: &Params) -> Result<Vec<NodeId>, Error> {
    let ids = parse_ids(&params.list("ResourceId"))?;
    if ids.is_empty() {
        return Err(Error::new(
            Code::InvalidParameters,
            "The request must contain the parameter resourceIdSet",
        ));
    }
    Ok(ids)
}

/// `Tag.N.Key` / `Tag.N.Value` pairs (the value None when not given).
fn tags_given(params: &Params) -> Result<Vec<(String, Option<String>)>, Error> {
    let mut out = Vec::new();
    for (i, fields) in params.structs("Tag") {
        let get = |name: &str| {
            fields
                .iter()
                .find(|(f, _)| *f == name)
                .map(|(_, v)| (*v).to_owned())
        };
        let key = get("Key")
            .ok_or_else(|| Error::new(Code::InvalidTag, format!("Tag.{i} has no Key")))?;
        out.push((key, get("Value")));
    }
    Ok(out)
}

async fn create_tags(state: &AppState, p: &Principal, params: &Params) -> Result<String, Error> {
    let ids = resources(params)?;
    let mut change = NodeTagsChange::default();
    for (k, v) in tags_given(params)? {
        change.set.insert(k, v.unwrap_or_default());
    }
    if change.set.is_empty() {
        return Err(Error::new(
            Code::InvalidParameters,
            "The request must contain the parameter tagSet",
        ));
    }
    for id in &ids {
        nodes::retag::<super::Ec2>(state, p, id, &change)
            .await
            .map_err(plain)?;
    }
    Ok("<return>true</return>".into())
}

async fn delete_tags(state: &AppState, p: &Principal, params: &Params) -> Result<String, Error> {
    let ids = resources(params)?;
    let given = tags_given(params)?;
    for id in &ids {
        let node = state
            .store
            .get_node(id, |n, at| state.node_online(n, at))
            .await
            .map_err(Error::from)?
            .ok_or_else(|| {
                Error::new(
                    Code::NodeNotFound,
                    format!("The instance ID '{id}' does not exist"),
                )
            })?;
        // A tag given with a value is removed only while it has that value; with none, whatever it is.
        // No tag named: every tag (as EC2 does).
        let remove: Vec<String> = if given.is_empty() {
            node.tags.keys().cloned().collect()
        } else {
            given
                .iter()
                .filter(|(k, v)| v.as_ref().is_none_or(|v| node.tags.get(k) == Some(v)))
                .map(|(k, _)| k.clone())
                .collect()
        };
        let change = NodeTagsChange {
            set: BTreeMap::new(),
            remove,
        };
        nodes::retag::<super::Ec2>(state, p, id, &change)
            .await
            .map_err(plain)?;
    }
    Ok("<return>true</return>".into())
}
