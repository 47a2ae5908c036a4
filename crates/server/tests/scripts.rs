//! Running saved scripts (`POST /v1/scripts/{name}/run`) against scripted agents: the version run,
//! the platform check before anything is delivered, and what the route refuses.

mod support;

use fleetrun_proto::InvocationStatus;
use fleetrun_proto::status::details;
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;
use support::{ScriptedAgent, TestServer};

async fn create_script(server: &TestServer, name: &str, body: &str, extra: Value) {
    let mut script = json!({"name": name, "platform": "linux", "body": body});
    if let (Some(s), Some(e)) = (script.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    let (status, _, answer) = server
        .call(Method::POST, "/v1/scripts", Some(&script), &[])
        .await;
    assert_eq!(status, 201, "{answer}");
}

async fn run(server: &TestServer, path: &str, body: Value) -> (u16, Value) {
    let (status, _, answer) = server.call(Method::POST, path, Some(&body), &[]).await;
    (status, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_runs_the_version_asked_only_on_nodes_of_its_platform() {
    let server = TestServer::start().await;
    let mut linux = ScriptedAgent::online(&server, "script-linux").await;
    let mut mac = ScriptedAgent::online(&server, "script-mac").await;
    let db = server.store().await;
    db.set_node_platform(&mac.node_id, "macos").await.unwrap();
    create_script(&server, "hello", "echo one", json!({})).await;
    let (status, _, answer) = server
        .call(
            Method::PUT,
            "/v1/scripts/hello",
            Some(&json!({"body": "echo two"})),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{answer}");

    let (status, cmd) = run(
        &server,
        "/v1/scripts/hello/run?version=1",
        json!({"node_ids": [linux.node_id, mac.node_id], "max_errors": "1"}),
    )
    .await;
    assert_eq!(status, 201, "{cmd}");
    let id = cmd["command_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("command id");
    let delivered = linux.expect_run().await;
    assert_eq!(
        delivered.script, "echo one",
        "version 1 runs, not the latest"
    );
    linux.started(&id).await;
    linux.finished(&id, 0, 0).await;
    linux.expect_result_ack(&id).await;
    let done = server.wait_terminal(&id, Duration::from_secs(30)).await;
    // One error within max errors 1: Success, as SSM rolls it up.
    assert_eq!(done["status"], "Success", "{done}");

    let rows = db.invocation_rows(&id).await.unwrap();
    let mac_row = rows
        .iter()
        .find(|r| r.node_id == mac.node_id)
        .expect("the other platform's invocation");
    assert_eq!(mac_row.status, InvocationStatus::Failed);
    assert!(
        !mac_row.delivered,
        "nothing was delivered to the macos node"
    );
    let invs = server.get(&format!("/v1/commands/{id}/invocations")).await;
    let mac_inv = invs
        .as_array()
        .and_then(|a| a.iter().find(|i| i["node_id"] == mac.node_id.as_str()))
        .expect("listed");
    assert_eq!(mac_inv["status_details"], details::INVALID_PLATFORM);
    let why = mac_inv["message"].as_str().unwrap_or_default();
    assert!(why.contains("platform is macos, not linux"), "{why}");

    let ran = server.get(&format!("/v1/commands/{id}/script")).await;
    assert_eq!(ran["name"], "hello");
    assert_eq!(ran["version"], 1);
    // The macos agent stays connected and was never asked: a plain send still reaches it.
    let plain = server
        .send(json!({"node_ids": [mac.node_id], "commands": ["true"]}))
        .await;
    assert_eq!(mac.expect_run().await.command_id, plain);
    let (status, _, answer) = server
        .call(
            Method::GET,
            &format!("/v1/commands/{plain}/script"),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 404, "{answer}");
}

/// A run retried with its idempotency key answers the first command; the key with another
/// version is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_run_runs_once() {
    let server = TestServer::start().await;
    let mut a = ScriptedAgent::online(&server, "script-retry").await;
    create_script(&server, "once", "echo once", json!({})).await;
    let body = json!({"node_ids": [a.node_id]});
    let key = [("idempotency-key", "run-once-1")];
    let (s1, _, first) = server
        .call(Method::POST, "/v1/scripts/once/run", Some(&body), &key)
        .await;
    assert_eq!(s1, 201, "{first}");
    let (s2, headers, again) = server
        .call(Method::POST, "/v1/scripts/once/run", Some(&body), &key)
        .await;
    assert_eq!(s2, 200, "{again}");
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(first["command_id"], again["command_id"]);
    let (s3, _, other) = server
        .call(
            Method::POST,
            "/v1/scripts/once/run?version=1",
            Some(&json!({"node_ids": [a.node_id], "comment": "other"})),
            &key,
        )
        .await;
    assert_eq!(s3, 422, "{other}");
    let run = a.expect_run().await;
    assert_eq!(run.script, "echo once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_runs_are_refused_naming_what_is_wrong() {
    let server = TestServer::start().await;
    let a = ScriptedAgent::online(&server, "script-bad").await;
    create_script(&server, "plain", "true", json!({})).await;
    create_script(
        &server,
        "with-files",
        "cat \"$INPUT\" > \"$OUTPUT\"",
        json!({"input": "inputs/tool.bin", "output": "result.txt"}),
    )
    .await;
    let nodes = json!({"node_ids": [a.node_id]});
    let cases: [(&str, Value, u16, &str, &str); 8] = [
        (
            "/v1/scripts/plain/run",
            json!({"node_ids": [a.node_id], "commands": ["rm -rf /"]}),
            400,
            "InvalidParameters",
            "commands: a script run takes its script from the saved script",
        ),
        (
            "/v1/scripts/plain/run",
            json!({"node_ids": [a.node_id], "document_name": "AWS-RunPowerShellScript"}),
            400,
            "InvalidParameters",
            "document_name",
        ),
        (
            "/v1/scripts/plain/run?version=0",
            nodes.clone(),
            400,
            "InvalidScript",
            "version must be a number",
        ),
        (
            "/v1/scripts/plain/run?version=7",
            nodes.clone(),
            404,
            "ScriptNotFound",
            "has no version 7",
        ),
        (
            "/v1/scripts/plain/run?ver=1",
            nodes.clone(),
            400,
            "InvalidRequest",
            "ver",
        ),
        (
            "/v1/scripts/nope/run",
            nodes.clone(),
            404,
            "ScriptNotFound",
            "no script named nope",
        ),
        (
            "/v1/scripts/plain/run",
            json!({}),
            400,
            "MissingTarget",
            "give node ids or a target expression",
        ),
        (
            "/v1/scripts/plain/run",
            json!({"targets": "tag:role=none"}),
            400,
            "InvalidTarget",
            "no node matches",
        ),
    ];
    for (path, body, want_status, want_code, want_text) in cases {
        let (status, answer) = run(&server, path, body).await;
        assert_eq!(status, want_status, "{path}: {answer}");
        assert_eq!(answer["error"]["code"], want_code, "{path}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(want_text), "{path}: {message}");
    }
    // Reading scripts is needed to run one; sending to the node is needed too.
    let no_scripts = server
        .token_for(
            "no-scripts",
            "none",
            Some(r#"permit (principal, action == Action::"send-command", resource is Node);"#),
        )
        .await;
    let (status, _, answer) = server
        .call_as(
            &no_scripts,
            Method::POST,
            "/v1/scripts/plain/run",
            Some(&nodes),
            &[],
        )
        .await;
    assert_eq!(status, 403, "{answer}");
    let no_send = server
        .token_for(
            "no-send",
            "none",
            Some(r#"permit (principal, action == Action::"read-scripts", resource is Script);"#),
        )
        .await;
    let (status, _, answer) = server
        .call_as(
            &no_send,
            Method::POST,
            "/v1/scripts/plain/run",
            Some(&nodes),
            &[],
        )
        .await;
    assert_eq!(status, 403, "{answer}");
    let (status, _, answer) = server
        .call(Method::GET, "/v1/commands/not-an-id/script", None, &[])
        .await;
    assert_eq!(status, 400, "{answer}");
}
