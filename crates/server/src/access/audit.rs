//! The audit trail's one entry point: every API call (both front doors, through
//! `access/gate.rs::conclude`) and every agent-channel action (`channel.rs`) builds an [`AuditEntry`] and
//! hands it to [`record`], which appends it to the hash-chained `audit_log` table through the store's
//! group-commit writer (`store/audit.rs`).
//!
//! Secrets never reach a record: [`redact`] blanks every member whose name says it holds one
//! (tokens, secrets, passwords, activation codes, credentials). A send's script is kept on purpose.

use axum::extract::ConnectInfo;
use axum::http::{Extensions, Method};
use fleetrun_store::{AuditEntry, Store};
use serde_json::Value;
use std::net::SocketAddr;

/// Principal of a request whose authentication failed (or that carried none).
pub const ANONYMOUS: &str = "anonymous";

/// Put in a response's extensions by a handler that created a command, so its record names it.
#[derive(Clone, Debug)]
pub struct CreatedCommand(pub String);

/// Put in a response's extensions by an authorization refusal: the nodes it named.
#[derive(Clone, Debug)]
pub struct DeniedNodes(pub Vec<String>);

/// Adds nodes to a record's resources, once each.
pub fn add_nodes(entry: &mut AuditEntry, nodes: &[String]) {
    for n in nodes {
        if !entry.node_ids.contains(n) {
            entry.node_ids.push(n.clone());
        }
    }
}

/// Put in a response's extensions by an error's rendering (`crate::errors::render`), so the
/// record carries the error code.
#[derive(Clone, Copy, Debug)]
pub struct ErrorCode(pub &'static str);

/// Request bodies longer than this are recorded, when the request is refused, as their length and
/// SHA-256 only (a refused body is attacker-sized; an accepted one is bounded by its route's limits).
pub const BODY_INLINE_MAX: usize = 4 * 1024;

/// What an audit record keeps of a request body.
pub enum BodyRecord {
    /// The body's JSON, secrets redacted.
    Json(Value),
    /// Members describing a body not kept: `body_bytes`, and `body_sha256` (hex).
    Digest(serde_json::Map<String, Value>),
}

/// What a record keeps of a request `body`: the redacted JSON (and the resources it names, added
/// to `entry`) when it is valid JSON and either at most [`BODY_INLINE_MAX`] bytes or `accepted`;
/// otherwise its length and SHA-256 digest. `None` for an empty body.
pub fn body_record(
    entry: &mut AuditEntry,
    body: &[u8],
    accepted: bool,
    document_member: &[&str],
) -> Option<BodyRecord> {
    if body.is_empty() {
        return None;
    }
    if (accepted || body.len() <= BODY_INLINE_MAX)
        && let Ok(v) = serde_json::from_slice::<Value>(body)
    {
        resources_from_body(entry, &v, document_member);
        return Some(BodyRecord::Json(redact(v)));
    }
    use sha2::Digest;
    let mut m = serde_json::Map::new();
    m.insert("body_bytes".into(), body.len().into());
    m.insert(
        "body_sha256".into(),
        hex::encode(sha2::Sha256::digest(body)).into(),
    );
    Some(BodyRecord::Digest(m))
}

/// Appends a record. With `wait` (accepted writes), returns once it is committed; otherwise it is
/// queued (reads and refused requests, which must stay cheap: they never wait for the writer, only,
/// past `AUDIT_QUEUE_MAX` queued records, for room in its queue). A record that cannot be written
/// is never dropped silently: it is logged as an error with its action and principal.
pub async fn record(store: &Store, entry: AuditEntry, wait: bool) {
    let (action, principal) = (entry.action.clone(), entry.principal.clone());
    let r = if wait {
        store.append_audit(entry).await
    } else {
        store.queue_audit(entry).await
    };
    if let Err(e) = r {
        tracing::error!(%action, %principal, "AUDIT RECORD LOST: cannot write it: {e}");
    }
}

/// The client address of a request (served with `into_make_service_with_connect_info`).
pub fn source(ext: &Extensions) -> String {
    ext.get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default()
}

/// Whether a member name says it holds a secret.
fn is_secret_name(name: &str) -> bool {
    let n: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    [
        "token",
        "secret",
        "password",
        "passwd",
        "activationcode",
        "credential",
        "privatekey",
    ]
    .iter()
    .any(|s| n.contains(s))
}

/// A copy of a JSON value with every secret-named member replaced by `"[REDACTED]"`, at any depth.
/// A parameter store body (native `{value, secure}`, SSM PutParameter's `{Name, Value, ...}`) has
/// its value redacted too, secure or not.
pub fn redact(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let param_body = m.contains_key("secure");
            let ssm_put = m.contains_key("Name") && m.contains_key("Value");
            Value::Object(
                m.into_iter()
                    .map(|(k, v)| {
                        let v = if is_secret_name(&k)
                            || (param_body && k == "value")
                            || (ssm_put && k == "Value")
                        {
                            Value::String("[REDACTED]".into())
                        } else {
                            redact(v)
                        };
                        (k, v)
                    })
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.into_iter().map(redact).collect()),
        other => other,
    }
}

/// The action name of a native API route: `<resource>.<verb>`.
pub fn api_action(method: &Method, route: &str) -> String {
    let name = match (method.as_str(), route) {
        ("POST", "/v1/activations") => "activations.create",
        ("DELETE", "/v1/activations/{activation_id}") => "activations.delete",
        ("GET", "/v1/activations") => "activations.list",
        ("GET", "/v1/nodes") => "nodes.list",
        ("GET", "/v1/nodes/{node_id}") => "nodes.get",
        ("DELETE", "/v1/nodes/{node_id}") => "nodes.deregister",
        ("PATCH", "/v1/nodes/{node_id}/tags") => "nodes.tag",
        ("GET", "/v1/nodes/{node_id}/exec") => "nodes.exec",
        ("GET", "/v1/nodes/{node_id}/port-forward") => "nodes.port-forward",
        ("GET", "/v1/sessions/{session_id}/tcp") => "sessions.tcp",
        ("GET", "/v1/sessions/{session_id}/stream") => "sessions.stream",
        ("GET", "/v1/sessions") => "sessions.list",
        ("GET", "/v1/sessions/{session_id}") => "sessions.get",
        ("GET", "/v1/sessions/{session_id}/recording") => "sessions.recording",
        ("POST", "/v1/sessions/{session_id}/terminate") => "sessions.terminate",
        ("POST", "/v1/commands") => "commands.send",
        ("GET", "/v1/commands") => "commands.list",
        ("GET", "/v1/commands/{command_id}") => "commands.get",
        ("GET", "/v1/commands/{command_id}/watch") => "commands.watch",
        ("GET", "/v1/commands/{command_id}/invocations") => "commands.invocations",
        ("GET", "/v1/commands/{command_id}/invocations/{node_id}/output/{pipe}") => {
            "commands.output"
        }
        ("POST", "/v1/commands/{command_id}/cancel") => "commands.cancel",
        ("POST", "/v1/documents") => "documents.create",
        ("GET", "/v1/documents") => "documents.list",
        ("GET", "/v1/documents/{name}") => "documents.get",
        ("PUT", "/v1/documents/{name}") => "documents.update",
        ("DELETE", "/v1/documents/{name}") => "documents.delete",
        ("PUT", "/v1/documents/{name}/default-version") => "documents.set-default",
        ("POST", "/v1/scripts") => "scripts.create",
        ("GET", "/v1/scripts") => "scripts.list",
        ("GET", "/v1/scripts/{name}") => "scripts.get",
        ("PUT", "/v1/scripts/{name}") => "scripts.update",
        ("DELETE", "/v1/scripts/{name}") => "scripts.delete",
        ("POST", "/v1/scripts/{name}/run") => "scripts.run",
        ("GET", "/v1/commands/{command_id}/script") => "commands.script",
        ("GET", "/v1/storage") => "storage.get",
        ("POST", "/v1/access-keys") => "access-keys.create",
        ("GET", "/v1/access-keys") => "access-keys.list",
        ("GET", "/v1/params") => "params.list",
        ("GET", "/v1/params/{name}") => "params.get",
        ("PUT", "/v1/params/{name}") => "params.put",
        ("DELETE", "/v1/params/{name}") => "params.delete",
        ("GET", "/v1/audit") => "audit.list",
        ("GET", "/v1/objects") => "objects.list",
        ("PUT", "/v1/objects/{*key}") => "objects.put",
        ("GET", "/v1/objects/{*key}") => "objects.get",
        ("DELETE", "/v1/objects/{*key}") => "objects.delete",
        ("GET", "/v1/whoami") => "whoami",
        ("POST", "/v1/users") => "users.create",
        ("GET", "/v1/users") => "users.list",
        ("GET", "/v1/users/{name}") => "users.get",
        ("PUT", "/v1/users/{name}") => "users.update",
        ("DELETE", "/v1/users/{name}") => "users.delete",
        ("POST", "/v1/tokens") => "tokens.create",
        ("GET", "/v1/tokens") => "tokens.list",
        ("DELETE", "/v1/tokens/{id}") => "tokens.delete",
        ("POST", "/v1/audit/verify") => "audit.verify",
        (m, r) => return format!("{} {r}", m.to_ascii_uppercase()),
    };
    name.to_owned()
}

/// Fills the resources of a record from a route's path parameters (`{command_id}`, `{node_id}`,
/// `{name}`) matched against the request path.
pub fn resources_from_path(entry: &mut AuditEntry, route: &str, path: &str) {
    for (pattern, value) in route.split('/').zip(path.split('/')) {
        match pattern {
            "{command_id}" => entry.command_id = value.to_owned(),
            "{node_id}" => entry.node_ids.push(value.to_owned()),
            "{name}" => entry.document = value.to_owned(),
            _ => {}
        }
    }
}

/// Fills the resources of a record from a request body's members (native snake_case and SSM's
/// PascalCase names).
pub fn resources_from_body(entry: &mut AuditEntry, body: &Value, document_member: &[&str]) {
    let Some(m) = body.as_object() else { return };
    for key in ["command_id", "CommandId"] {
        if let Some(s) = m.get(key).and_then(Value::as_str) {
            entry.command_id = s.to_owned();
        }
    }
    for key in ["node_ids", "InstanceIds"] {
        if let Some(ids) = m.get(key).and_then(Value::as_array) {
            entry
                .node_ids
                .extend(ids.iter().filter_map(Value::as_str).map(str::to_owned));
        }
    }
    if let Some(s) = m.get("InstanceId").and_then(Value::as_str) {
        entry.node_ids.push(s.to_owned());
    }
    // SSM's tagging calls name a node as a resource.
    if m.get("ResourceType").and_then(Value::as_str) == Some("ManagedInstance")
        && let Some(s) = m.get("ResourceId").and_then(Value::as_str)
    {
        entry.node_ids.push(s.to_owned());
    }
    for key in document_member {
        if let Some(s) = m.get(*key).and_then(Value::as_str) {
            entry.document = s.to_owned();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secrets_are_redacted_at_any_depth_and_scripts_kept() {
        let v = redact(json!({
            "script": "echo hi",
            "commands": ["ls"],
            "Parameters": {"commands": ["uptime"]},
            "activation_code": "abc",
            "nested": [{"SecretAccessKey": "s", "api_token": "t", "NextToken": "n"}],
            "password": "p",
        }));
        assert_eq!(v["script"], "echo hi");
        assert_eq!(v["Parameters"]["commands"][0], "uptime");
        assert_eq!(v["activation_code"], "[REDACTED]");
        assert_eq!(v["nested"][0]["SecretAccessKey"], "[REDACTED]");
        assert_eq!(v["nested"][0]["api_token"], "[REDACTED]");
        assert_eq!(v["password"], "[REDACTED]");
        assert!(!v.to_string().contains("\"abc\""));
        let p = redact(json!({"value": "s3cr3t", "secure": true}));
        assert_eq!(p["value"], "[REDACTED]");
        assert_eq!(p["secure"], true);
        let ssm = redact(json!({"Name": "/db/pass", "Value": "s3cr3t", "Type": "SecureString"}));
        assert_eq!(ssm["Value"], "[REDACTED]");
        assert_eq!(ssm["Name"], "/db/pass");
    }

    #[test]
    fn big_refused_bodies_are_kept_as_a_digest_small_or_accepted_ones_whole() {
        let big = format!(
            "{{\"commands\": [\"{}\"], \"node_ids\": [\"mi-1\"]}}",
            "x".repeat(BODY_INLINE_MAX)
        );
        let mut e = AuditEntry::default();
        let Some(BodyRecord::Digest(m)) = body_record(&mut e, big.as_bytes(), false, &[]) else {
            panic!("a big refused body is kept whole");
        };
        assert_eq!(m["body_bytes"], big.len());
        assert_eq!(m["body_sha256"].as_str().map(str::len), Some(64));
        assert!(
            e.node_ids.is_empty(),
            "resources taken from a body not kept"
        );
        let Some(BodyRecord::Json(v)) = body_record(&mut e, big.as_bytes(), true, &[]) else {
            panic!("an accepted body is not kept");
        };
        assert_eq!(v["node_ids"][0], "mi-1");
        assert_eq!(e.node_ids, ["mi-1"]);
        let small = br#"{"commands": ["ls"], "token": "t"}"#;
        let Some(BodyRecord::Json(v)) = body_record(&mut e, small, false, &[]) else {
            panic!("a small refused body is not kept");
        };
        assert_eq!(v["token"], "[REDACTED]");
        assert!(matches!(
            body_record(&mut e, b"{not json", false, &[]),
            Some(BodyRecord::Digest(_))
        ));
        assert!(body_record(&mut e, b"", false, &[]).is_none());
    }

    #[test]
    fn path_resources_and_action_names() {
        let route = "/v1/commands/{command_id}/invocations/{node_id}/output/{pipe}";
        let mut e = AuditEntry::default();
        resources_from_path(
            &mut e,
            route,
            "/v1/commands/c1/invocations/mi-1/output/stdout",
        );
        assert_eq!(e.command_id, "c1");
        assert_eq!(e.node_ids, ["mi-1"]);
        assert_eq!(api_action(&Method::GET, route), "commands.output");
        assert_eq!(
            api_action(&Method::DELETE, "/v1/nodes/{node_id}"),
            "nodes.deregister"
        );
    }
}
