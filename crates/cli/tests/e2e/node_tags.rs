//! Node tags changed from the server side (`fleetrun nodes tag/untag`, `PATCH /v1/nodes/{id}/tags`):
//! sends by tag and tag policies see a change at once; a change needs manage-nodes on the node as
//! it is and as it will be; bad and excessive tags are refused by name.

use crate::authz::{call, error_of, user_with_token};
use crate::support::{Agent, Server};
use serde_json::json;

/// May manage (and list, send to) role=web nodes only.
const WEB_ADMIN: &str = r#"
permit (
    principal,
    action in [Action::"list", Action::"send-command", Action::"read-output", Action::"manage-nodes"],
    resource is Node
) when { resource.hasTag("role") && resource.getTag("role") == "web" };
"#;

#[test]
fn tags_set_from_the_server_steer_sends_and_policies() {
    let server = Server::start();
    let _a = Agent::start(&server, "t-1", &[("role", "web")]);
    let _b = Agent::start(&server, "t-2", &[("role", "web")]);
    let id = server.node_id("t-1");

    // Tagged by name; a send by the new tag reaches that node only.
    let node = server
        .cli(&[
            "nodes",
            "tag",
            "t-1",
            "tier=gold",
            "owner=ops",
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(
        node["tags"],
        json!({"owner": "ops", "role": "web", "tier": "gold"}),
        "{node}"
    );
    let c = server
        .cli(&[
            "send",
            "--targets",
            "tag:tier=gold",
            "--wait",
            "-o",
            "json",
            "--",
            "echo gold",
        ])
        .ok()
        .json();
    let inv = c["invocations"].as_array().expect("invocations");
    assert_eq!(inv.len(), 1, "{c}");
    assert_eq!(inv[0]["node_id"], id.as_str(), "{c}");
    // Listed with the new tags; the table line too.
    let line = server
        .cli(&["nodes", "untag", &id, "owner"])
        .ok()
        .stdout_str();
    assert!(
        line.contains("role=web") && line.contains("tier=gold") && !line.contains("owner"),
        "{line}"
    );

    // A web admin may retag a web node, but not move it out of its scope (role=db), nor touch
    // a node it cannot see.
    let token = user_with_token(&server, "webadmin", "none", Some(WEB_ADMIN));
    let path = format!("/v1/nodes/{id}/tags");
    let ok = call(
        &server,
        &token,
        "PATCH",
        &path,
        Some(json!({"set": {"zone": "a"}})),
    );
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    let moved = call(
        &server,
        &token,
        "PATCH",
        &path,
        Some(json!({"set": {"role": "db"}})),
    );
    let (status, code, msg) = error_of(&moved);
    assert_eq!((status, code.as_str()), (403, "AccessDenied"), "{msg}");
    let dropped = call(
        &server,
        &token,
        "PATCH",
        &path,
        Some(json!({"remove": ["role"]})),
    );
    assert_eq!(
        dropped.status,
        403,
        "{}",
        String::from_utf8_lossy(&dropped.body)
    );
    let now = server.get_json(&format!("/v1/nodes/{id}"));
    assert_eq!(now["tags"]["role"], "web", "{now}");
    // An admin moves it; the web admin loses it at once.
    server.cli(&["nodes", "tag", &id, "role=db"]).ok();
    let gone = call(
        &server,
        &token,
        "PATCH",
        &path,
        Some(json!({"set": {"zone": "b"}})),
    );
    assert_eq!(gone.status, 403, "{}", String::from_utf8_lossy(&gone.body));
    let audit = server.cli(&["audit", "-o", "json"]).ok().json();
    let tagged = audit
        .as_array()
        .expect("audit array")
        .iter()
        .filter(|e| e["action"] == "nodes.tag")
        .count();
    assert!(tagged >= 6, "every change and refusal is audited: {audit}");

    // Bad input, refused by name; nothing changes.
    for (body, needle) in [
        (json!({"set": {"": "x"}}), "tag key"),
        (json!({"set": {"k": "x".repeat(300)}}), "256"),
        (
            json!({"set": {"k": "v"}, "remove": ["k"]}),
            "both set and removed",
        ),
        (json!({"sett": {}}), "unknown field"),
    ] {
        let r = server
            .http(
                "PATCH",
                &path,
                Some(&server.token),
                Some(("application/json", body.to_string().into_bytes())),
            )
            .expect("patch");
        let (status, _, msg) = error_of(&r);
        assert_eq!(status, 400, "{body}: {msg}");
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    let many: serde_json::Map<String, serde_json::Value> =
        (0..60).map(|i| (format!("k{i}"), json!("v"))).collect();
    let r = server
        .http(
            "PATCH",
            &path,
            Some(&server.token),
            Some((
                "application/json",
                json!({"set": many}).to_string().into_bytes(),
            )),
        )
        .expect("patch");
    let (status, code, msg) = error_of(&r);
    assert_eq!((status, code.as_str()), (400, "TooManyTags"), "{msg}");
    let line = server
        .cli(&["nodes", "tag", "nobody-here", "a=b"])
        .one_line_error();
    assert!(line.contains("nobody-here"), "{line}");
    let line = server
        .cli(&["nodes", "tag", &id, "novalue"])
        .one_line_error();
    assert!(line.contains("KEY=VALUE"), "{line}");
}
