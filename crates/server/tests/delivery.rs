//! The server core against a scripted agent: one test per row of ARCHITECTURE.md's "Delivery
//! guarantees" table (the agent's own rows are the agent's tests), plus the end of an invocation
//! whose node never returns. The agent side is a script on a real WebSocket; the server is the real
//! library; what is durable is read back through a second connection on its database.

mod support;

use fleetrun_proto::InvocationStatus;
use fleetrun_proto::status::details;
use serde_json::json;
use support::{ScriptedAgent, TestServer};

/// A command is committed, with all its invocations, before the send answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_and_its_invocations_are_stored_before_the_send_answers() {
    let server = TestServer::start().await;
    // Registered and offline: nothing but the send itself writes the command.
    let a = ScriptedAgent::register(&server, "stored-a").await;
    let b = ScriptedAgent::register(&server, "stored-b").await;
    let id = server
        .send(json!({"node_ids": [a.node_id, b.node_id], "commands": ["true"]}))
        .await;
    let db = server.store().await;
    let cmd = db.get_command(&id).await.unwrap().expect("command stored");
    assert_eq!(cmd.target_count, 2);
    let rows = db.invocation_rows(&id).await.unwrap();
    let nodes: Vec<_> = rows.iter().map(|r| r.node_id.clone()).collect();
    assert_eq!(nodes, vec![a.node_id.clone(), b.node_id.clone()]);
    assert!(
        rows.iter()
            .all(|r| r.status == InvocationStatus::Pending && !r.delivered)
    );
}

/// The delivery is committed before `Run` reaches the agent; a `Run` the agent does not hold when
/// it reconnects is sent again, one it holds (`Hello.known`) is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_is_recorded_before_it_is_sent_and_resent_until_the_agent_holds_it() {
    let server = TestServer::start().await;
    let db = server.store().await;
    let mut a = ScriptedAgent::online(&server, "deliver-a").await;
    let id = server
        .send(json!({"node_ids": [a.node_id], "commands": ["echo hi"]}))
        .await;
    let run = a.expect_run().await;
    assert_eq!(run.command_id, id);
    assert_eq!(run.script, "echo hi");
    let rows = db.invocation_rows(&id).await.unwrap();
    assert!(
        rows[0].delivered,
        "Run arrived before its delivery was stored"
    );

    // Lost before it started: the reconnect without it gets it again.
    a.disconnect();
    a.connect(&server, &[]).await;
    let again = a.expect_run().await;
    assert_eq!(again.command_id, id);

    // Held: a reconnect that knows it gets no second copy; the result is what comes next.
    a.disconnect();
    a.connect(&server, std::slice::from_ref(&id)).await;
    a.started(&id).await;
    a.finished(&id, 0, 0).await;
    a.expect("ResultAck, and no Run before it", |f| match f {
        fleetrun_proto::channel::ServerFrame::Run(r) => panic!("Run sent again: {r:?}"),
        fleetrun_proto::channel::ServerFrame::ResultAck { command_id } if command_id == id => {
            Some(())
        }
        _ => None,
    })
    .await;
    let done = server.wait_terminal(&id, support::DEADLINE).await;
    assert_eq!(done["status"], "Success", "{done}");
}

/// A run that was going when its agent lost it (the agent restarted) is not restarted: the
/// reconnect ends it Failed / Terminated, and no output actor is left for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_lost_by_its_agent_ends_terminated() {
    let server = TestServer::start().await;
    let db = server.store().await;
    let mut a = ScriptedAgent::online(&server, "lost-a").await;
    let id = server
        .send(json!({"node_ids": [a.node_id], "commands": ["sleep 100"]}))
        .await;
    a.expect_run().await;
    a.started(&id).await;
    // Frames are handled in order: once this output is acknowledged, the start is stored.
    a.output(&id, 0, b"working").await;
    assert_eq!(a.expect_ack(&id).await, 7);

    a.disconnect();
    a.connect(&server, &[]).await;
    let done = server.wait_terminal(&id, support::DEADLINE).await;
    assert_eq!(done["status"], "Failed", "{done}");
    let inv = db.get_invocation(&id, &a.node_id).await.unwrap().unwrap();
    assert_eq!(inv.status, InvocationStatus::Failed);
    assert_eq!(inv.status_details, details::TERMINATED);
    assert_eq!(inv.stdout, "working");
    let storage = server.get("/v1/storage").await;
    assert_eq!(storage["live_output_actors"], 0, "{storage}");
    // Nothing is sent to run it again.
    a.finished(&id, 0, 7).await;
    a.expect_result_ack(&id).await;
}

/// Output is acknowledged only once it is stored, and stored once: resent bytes below what the
/// server holds are dropped (and re-acknowledged), overlapping ones add only what is new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_acknowledged_after_it_is_stored_and_stored_once() {
    let server = TestServer::start().await;
    let db = server.store().await;
    let mut a = ScriptedAgent::online(&server, "output-a").await;
    let id = server
        .send(json!({"node_ids": [a.node_id], "commands": ["echo"]}))
        .await;
    a.expect_run().await;
    a.started(&id).await;

    a.output(&id, 0, b"hello ").await;
    assert_eq!(a.expect_ack(&id).await, 6);
    let stored = db.output_state(&id, &a.node_id).await.unwrap();
    assert_eq!(
        stored.stdout,
        (6, b"hello ".to_vec()),
        "acknowledged before stored"
    );

    // A resend from 0 that goes further (a cut before the Ack reached the agent).
    a.output(&id, 0, b"hello world").await;
    assert_eq!(a.expect_ack(&id).await, 11);
    // A resend of bytes held: acknowledged again, not stored again.
    a.output(&id, 0, b"hello ").await;
    assert_eq!(a.expect_ack(&id).await, 11);
    a.output(&id, 11, b"!").await;
    assert_eq!(a.expect_ack(&id).await, 12);

    a.finished(&id, 0, 12).await;
    a.expect_result_ack(&id).await;
    server.wait_terminal(&id, support::DEADLINE).await;
    let inv = db.get_invocation(&id, &a.node_id).await.unwrap().unwrap();
    assert_eq!(
        (inv.stdout.as_str(), inv.stdout_bytes),
        ("hello world!", 12)
    );
}

/// A result is stored before `ResultAck`, once: a second copy (the agent resends until it has the
/// ack) finds the invocation ended, is acknowledged, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_is_stored_once() {
    let server = TestServer::start().await;
    let db = server.store().await;
    let mut a = ScriptedAgent::online(&server, "result-a").await;
    let id = server
        .send(json!({"node_ids": [a.node_id], "commands": ["true"]}))
        .await;
    a.expect_run().await;
    a.started(&id).await;
    a.finished(&id, 0, 0).await;
    a.expect_result_ack(&id).await;
    let inv = db.get_invocation(&id, &a.node_id).await.unwrap().unwrap();
    assert_eq!(
        inv.status,
        InvocationStatus::Success,
        "ResultAck before the result was stored"
    );

    // A copy that disagrees: it must not count, nor change the stored result.
    a.finished(&id, 3, 0).await;
    a.expect_result_ack(&id).await;
    let done = server.wait_terminal(&id, support::DEADLINE).await;
    assert_eq!(done["status"], "Success", "{done}");
    let cmd = db.get_command(&id).await.unwrap().unwrap();
    assert_eq!((cmd.completed_count, cmd.error_count), (1, 0));
    let inv = db.get_invocation(&id, &a.node_id).await.unwrap().unwrap();
    assert_eq!((inv.status, inv.exit_code), (InvocationStatus::Success, 0));
}

/// A send retried with its idempotency key answers the stored command and makes no second one;
/// the key with another request is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_send_runs_once() {
    let server = TestServer::start().await;
    let a = ScriptedAgent::register(&server, "retry-a").await;
    let body = json!({"node_ids": [a.node_id], "commands": ["true"]});
    let key = [("Idempotency-Key", "retry-1")];
    let post = reqwest::Method::POST;
    let (first, _, sent) = server
        .call(post.clone(), "/v1/commands", Some(&body), &key)
        .await;
    assert_eq!(first, 201, "{sent}");
    let (again, headers, replayed) = server
        .call(post.clone(), "/v1/commands", Some(&body), &key)
        .await;
    assert_eq!(again, 200, "{replayed}");
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(replayed["command_id"], sent["command_id"]);
    let other = json!({"node_ids": [a.node_id], "commands": ["false"]});
    let (refused, _, why) = server.call(post, "/v1/commands", Some(&other), &key).await;
    assert_eq!(refused, 422, "{why}");
    let listed = server.get("/v1/commands").await;
    let commands = listed["commands"]
        .as_array()
        .or(listed.as_array())
        .expect("a listing");
    assert_eq!(commands.len(), 1, "{listed}");
}

/// After a crash, dispatch resumes from the database: the delivered invocation keeps its slot (its
/// agent holds it and reports it), the pending one is delivered when its node comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_resumes_after_a_restart() {
    let mut server = TestServer::start().await;
    let mut a = ScriptedAgent::online(&server, "resume-a").await;
    let mut b = ScriptedAgent::register(&server, "resume-b").await;
    let id = server
        .send(json!({"node_ids": [a.node_id, b.node_id], "commands": ["true"]}))
        .await;
    a.expect_run().await;

    server.restart().await;
    a.disconnect();
    a.connect(&server, std::slice::from_ref(&id)).await;
    a.started(&id).await;
    a.finished(&id, 0, 0).await;
    a.expect_result_ack(&id).await;

    b.connect(&server, &[]).await;
    let run = b.expect_run().await;
    assert_eq!(run.command_id, id);
    b.started(&id).await;
    b.finished(&id, 0, 0).await;
    b.expect_result_ack(&id).await;
    let done = server.wait_terminal(&id, support::DEADLINE).await;
    assert_eq!(done["status"], "Success", "{done}");
    assert_eq!(done["completed_count"], 2, "{done}");
}

/// An invocation whose node never comes back ends at the command's expiry, and its output actor
/// ends with it: what it held is stored and the actor map is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_ends_the_output_actor_of_a_node_that_never_returns() {
    let server = TestServer::start().await;
    let db = server.store().await;
    let mut a = ScriptedAgent::online(&server, "gone-a").await;
    let id = server
        .send(json!({
            "node_ids": [a.node_id], "commands": ["sleep 100"],
            "delivery_timeout_secs": 1, "execution_timeout_secs": 1,
        }))
        .await;
    a.expect_run().await;
    a.started(&id).await;
    a.output(&id, 0, b"last words").await;
    assert_eq!(a.expect_ack(&id).await, 10);
    let storage = server.get("/v1/storage").await;
    assert_eq!(storage["live_output_actors"], 1, "{storage}");
    a.disconnect();

    // Expiry: delivery + execution timeout, plus the grace for a result in flight.
    let done = server.wait_terminal(&id, support::DEADLINE).await;
    assert_eq!(done["status"], "TimedOut", "{done}");
    let storage = server.get("/v1/storage").await;
    assert_eq!(storage["live_output_actors"], 0, "{storage}");
    let inv = db.get_invocation(&id, &a.node_id).await.unwrap().unwrap();
    assert_eq!(inv.status, InvocationStatus::TimedOut);
    assert_eq!(inv.stdout, "last words");
}

/// Deregistering a node ends its running invocation (Failed / Terminated) and that invocation's
/// output actor before the API answers, keeping what the actor held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistration_ends_the_runs_and_output_actors_of_the_node() {
    let server = TestServer::start().await;
    let db = server.store().await;
    let mut a = ScriptedAgent::online(&server, "dereg-a").await;
    let id = server
        .send(json!({"node_ids": [a.node_id], "commands": ["sleep 100"]}))
        .await;
    a.expect_run().await;
    a.started(&id).await;
    a.output(&id, 0, b"so far").await;
    assert_eq!(a.expect_ack(&id).await, 6);

    let path = format!("/v1/nodes/{}", a.node_id);
    let (status, _, body) = server.call(reqwest::Method::DELETE, &path, None, &[]).await;
    assert_eq!(status, 200, "{body}");
    let storage = server.get("/v1/storage").await;
    assert_eq!(storage["live_output_actors"], 0, "{storage}");
    let inv = db.get_invocation(&id, &a.node_id).await.unwrap().unwrap();
    assert_eq!(
        (inv.status, inv.status_details.as_str(), inv.stdout.as_str()),
        (InvocationStatus::Failed, details::TERMINATED, "so far")
    );
    let done = server.wait_terminal(&id, support::DEADLINE).await;
    assert_eq!(done["status"], "Failed", "{done}");
}
