//! Issue 5 (security), audit trail: sends, refused callers, SSM calls and deregistrations are recorded
//! with principal, action, resources and the send's script; editing one row breaks `audit verify`.

use crate::support::{Agent, Http, Server, run};
use serde_json::Value;
use std::time::Duration;

fn audit(server: &Server, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["audit"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    let v = server.cli(&a).ok().json();
    v.as_array().expect("array").clone()
}

#[test]
fn audit_records_calls_and_detects_a_tampered_row() {
    let server = Server::start();
    let _a = Agent::start(&server, "aud1", &[("env", "dev")]);
    let node = server.node_id("aud1");

    // A send: principal admin, resources, the script itself.
    let script = "echo audited-script-marker";
    let id = server.send(&["--node", &node, "--comment", "audit me"], script);
    let sends = audit(&server, &["--action", "commands.send"]);
    assert_eq!(sends.len(), 1, "{sends:?}");
    let s = &sends[0];
    assert_eq!(s["principal"], "admin");
    assert_eq!(s["command_id"], id.as_str());
    assert_eq!(s["node_ids"][0], node.as_str());
    assert_eq!(s["result"], "201");
    assert!(
        s["source"]
            .as_str()
            .is_some_and(|x| x.starts_with("127.0.0.1:")),
        "{s}"
    );
    assert!(
        s["params"].to_string().contains("audited-script-marker"),
        "{s}"
    );

    // The agent's channel actions are recorded under the node's id.
    let hellos = audit(&server, &["--principal", &node, "--action", "agent.*"]);
    let actions: Vec<&str> = hellos.iter().filter_map(|r| r["action"].as_str()).collect();
    assert!(actions.contains(&"agent.register"), "{actions:?}");
    assert!(actions.contains(&"agent.hello"), "{actions:?}");
    // The activation code an agent registers with never reaches the trail.
    let all = audit(&server, &["--limit", "10000"]);
    let code = server.activation_code(&[], 1);
    assert!(!serde_json::to_string(&all).unwrap().contains(&code));

    // A wrong token: refused, recorded as anonymous, and the token is not in the record.
    let mut c = server.cli_cmd(&["nodes"]);
    c.env("FLEETRUN_TOKEN", "frt_wrong-token-xyz");
    let out = run(c, Duration::from_secs(30));
    assert!(
        out.one_line_error().contains("Unauthorized"),
        "{}",
        out.stderr
    );
    let anon = audit(&server, &["--principal", "anonymous"]);
    let r = anon
        .iter()
        .find(|r| r["action"] == "nodes.list")
        .unwrap_or_else(|| panic!("no refused nodes.list: {anon:?}"));
    assert_eq!(r["result"], "401 Unauthorized");
    assert!(!r.to_string().contains("wrong-token"), "{r}");

    // An SSM call without a valid signature: recorded as anonymous with its AWS error code.
    let body = serde_json::json!({"DocumentName": "AWS-RunShellScript", "InstanceIds": [node]});
    let resp = unsigned_ssm(&server, body.to_string());
    assert_eq!(resp.status, 400, "{}", String::from_utf8_lossy(&resp.body));
    let ssm = audit(&server, &["--action", "ssm.*"]);
    assert_eq!(ssm.len(), 1, "{ssm:?}");
    assert_eq!(ssm[0]["action"], "ssm.SendCommand");
    assert_eq!(ssm[0]["principal"], "anonymous");
    assert!(
        ssm[0]["result"].as_str().unwrap().starts_with("400 "),
        "{}",
        ssm[0]
    );

    // Filtering by node finds the send.
    let by_node = audit(&server, &["--node", &node, "--since", "1h"]);
    assert!(
        by_node.iter().any(|r| r["action"] == "commands.send"),
        "{by_node:?}"
    );

    // The table shows the same.
    let table = server
        .cli(&["audit", "--action", "commands.send"])
        .ok()
        .stdout_str();
    assert!(table.starts_with("SEQ"), "{table}");
    assert!(table.contains("admin") && table.contains(&id), "{table}");

    // Intact chain.
    let v = server.cli(&["audit", "verify"]).ok().stdout_str();
    assert!(v.contains("audit chain intact"), "{v}");

    // Edit the send's record in place, from outside the server, while it runs.
    let seq = s["seq"].as_u64().expect("seq");
    server.sql(&format!(
        "UPDATE audit_log SET params = replace(params, 'audited-script-marker', 'innocent') WHERE seq = {seq};"
    ));
    let bad = server.cli(&["audit", "verify"]);
    assert_eq!(bad.code(), Some(1), "{}", bad.stdout_str());
    let line = bad.stderr.trim();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(
        line.contains(&format!("record {seq}")) && line.contains("altered"),
        "{line}"
    );
    let j = server.cli(&["audit", "verify", "-o", "json"]).json();
    assert_eq!(j["ok"], false);
    assert_eq!(j["first_bad_seq"], seq);
}

/// `POST /` with an SSM target and no SigV4 signature.
fn unsigned_ssm(server: &Server, body: String) -> Http {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let resp = crate::support::client_builder(server.ca.as_deref())
            .build()
            .expect("client")
            .post(format!("{}/", server.url))
            .header("x-amz-target", "AmazonSSM.SendCommand")
            .header("content-type", "application/x-amz-json-1.1")
            .body(body)
            .send()
            .await
            .expect("POST /");
        let status = resp.status().as_u16();
        let body = resp.bytes().await.expect("body").to_vec();
        Http { status, body }
    })
}

#[test]
fn an_anchor_kept_outside_finds_the_newest_records_removed() {
    let server = Server::start();
    let anchor = server.dir.path().join("audit.anchor");
    let anchor_arg = anchor.to_str().expect("utf-8 path");
    server.cli(&["nodes"]).ok();
    // The first verification has no anchor yet; it writes the head.
    let v = server
        .cli(&["audit", "verify", "--anchor", anchor_arg])
        .ok();
    assert!(
        v.stdout_str().contains("audit chain intact"),
        "{}",
        v.stdout_str()
    );
    let head = std::fs::read_to_string(&anchor).expect("anchor written");
    let seq: u64 = head
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("anchor {head:?}"));
    // More calls, and the anchor moves on with every intact walk.
    server.cli(&["nodes"]).ok();
    server
        .cli(&["audit", "verify", "--anchor", anchor_arg])
        .ok();
    let head2 = std::fs::read_to_string(&anchor).expect("anchor");
    assert_ne!(head, head2);
    let seq2: u64 = head2
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .expect("seq");
    assert!(seq2 > seq);

    // Remove the newest records, the anchor's among them: the chain alone still links up...
    server.sql(&format!("DELETE FROM audit_log WHERE seq >= {seq2};"));
    let plain = server.cli(&["audit", "verify", "-o", "json"]).json();
    assert_eq!(plain["ok"], true, "{plain}");
    // ...but not with the anchor.
    let bad = server.cli(&["audit", "verify", "--anchor", anchor_arg]);
    assert_eq!(bad.code(), Some(1), "{}", bad.stdout_str());
    // (New records have taken the removed numbers since, so the anchor's number now holds another.)
    assert!(
        bad.stderr.contains(&format!("record {seq2}")) && bad.stderr.contains("anchor"),
        "{}",
        bad.stderr
    );
    // A broken walk leaves the anchor as it was.
    assert_eq!(std::fs::read_to_string(&anchor).expect("anchor"), head2);
}
