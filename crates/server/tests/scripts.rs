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

/// A node's agent that lies while a script's output is shipped (more bytes than it announced,
/// or a wrong SHA-256, or a file over the limit) fails the invocation saying so, leaves no
/// result object, and the temp dir is still removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_agent_cannot_ship_a_bad_output() {
    use fleetrun_proto::channel::{AgentFrame, ServerFrame};
    use fleetrun_proto::stream::{StreamFd, StreamKind};
    let server = TestServer::start_with(|c| c.script_output_max = 1000).await;
    let mut a = ScriptedAgent::online(&server, "script-liar").await;
    create_script(
        &server,
        "ships",
        "echo hi > \"$OUTPUT\"",
        json!({"output": "r.txt"}),
    )
    .await;
    // (announced size, bytes sent, SHA-256 claimed, what the message says)
    let sha_of_ten = hex::encode(<sha2::Sha256 as sha2::Digest>::digest([7u8; 10]));
    let cases = [
        (10, 10, "0".repeat(64), "the node said"),
        (10, 20, sha_of_ten.clone(), "the node said"),
        (5000, 0, sha_of_ten, "more than the 1000"),
    ];
    for (announced, sent, sha, want) in cases {
        let (status, cmd) = run(
            &server,
            "/v1/scripts/ships/run",
            json!({"node_ids": [a.node_id]}),
        )
        .await;
        assert_eq!(status, 201, "{cmd}");
        let id = cmd["command_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("command id");
        // The dir is made by a helper command.
        let (mk, command) = a
            .expect("the mkdir stream", |f| match f {
                ServerFrame::StreamOpen {
                    stream,
                    kind: StreamKind::Exec { command, .. },
                    ..
                } => Some((stream, command)),
                _ => None,
            })
            .await;
        assert!(command.contains("mkdir -m 0700"), "{command}");
        a.exit_stream(mk, 0).await;
        let delivered = a.expect_run().await;
        assert!(
            delivered.script.contains("export OUTPUT="),
            "{}",
            delivered.script
        );
        a.started(&id).await;
        a.finished(&id, 0, 0).await;
        let check = a
            .expect("the output check", |f| match f {
                ServerFrame::StreamOpen {
                    stream,
                    kind: StreamKind::Exec { .. },
                    ..
                } => Some(stream),
                _ => None,
            })
            .await;
        a.exit_stream(check, 0).await;
        let get = a
            .expect("the output get", |f| match f {
                ServerFrame::StreamOpen {
                    stream,
                    kind: StreamKind::FileGet { .. },
                    ..
                } => Some(stream),
                _ => None,
            })
            .await;
        a.send(AgentFrame::StreamFileInfo {
            stream: get,
            offset: 0,
            size: announced,
            mode: 0o644,
        })
        .await;
        if sent > 0 {
            a.send(AgentFrame::StreamData {
                stream: get,
                fd: StreamFd::Stdout,
                bytes: vec![7; sent],
            })
            .await;
            a.send(AgentFrame::StreamFileDone {
                stream: get,
                sha256: sha,
            })
            .await;
            a.send(AgentFrame::StreamClose {
                stream: get,
                error: None,
            })
            .await;
        }
        // Then the dir is removed.
        let rm = a
            .expect("the rm stream", |f| match f {
                ServerFrame::StreamOpen {
                    stream,
                    kind: StreamKind::Exec { command, .. },
                    ..
                } if command.starts_with("rm -rf") => Some(stream),
                _ => None,
            })
            .await;
        a.exit_stream(rm, 0).await;
        let done = server.wait_terminal(&id, Duration::from_secs(30)).await;
        assert_eq!(done["status"], "Failed", "{done}");
        let invs = server.get(&format!("/v1/commands/{id}/invocations")).await;
        let why = invs[0]["message"].as_str().unwrap_or_default();
        assert!(why.contains(want), "{want}: {why}");
        let ran = server.get(&format!("/v1/commands/{id}/script")).await;
        assert_eq!(ran["results"], json!([]), "{ran}");
        let db = server.store().await;
        let left = db
            .list_objects(&format!("results/{id}/"), None, 10)
            .await
            .unwrap();
        assert!(left.is_empty(), "{left:?}");
    }
}
