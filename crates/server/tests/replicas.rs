//! Two replicas on one PostgreSQL database with a NATS server between them, both started by the
//! tests (crates/testkit): a command sent to one replica for an agent connected to the other is
//! delivered by the other, once; the agent's result reaches the owner's dispatcher; a node that
//! comes online on the other replica is delivered to when it does; a cancel through the other
//! replica reaches the owner. The agents are scripts on real WebSockets.

mod support;

use fleetrun_proto::channel::{AgentFrame, ExecResult, Outcome, ServerFrame};
use fleetrun_store::Database;
use fleetrun_testkit::{Nats, shared_postgres};
use serde_json::{Value, json};
use support::{DEADLINE, ScriptedAgent, TestServer};

/// A command's watch stream (NDJSON), read line by line.
struct Watch {
    body: reqwest::Response,
    buf: Vec<u8>,
}

impl Watch {
    async fn open(server: &TestServer, id: &fleetrun_proto::CommandId) -> Watch {
        let body = reqwest::Client::new()
            .get(format!("http://{}/v1/commands/{id}/watch", server.addr))
            .bearer_auth(&server.token)
            .send()
            .await
            .unwrap();
        assert_eq!(body.status(), 200);
        Watch {
            body,
            buf: Vec::new(),
        }
    }

    /// The next state, or Null at the end of the stream.
    async fn next(&mut self) -> Value {
        loop {
            if let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                return serde_json::from_slice(&line).unwrap();
            }
            match support::within("a watch line", self.body.chunk())
                .await
                .unwrap()
            {
                Some(chunk) => self.buf.extend_from_slice(&chunk),
                None => return Value::Null,
            }
        }
    }
}

/// Replicas `a` and `b` on a fresh database of the tests' PostgreSQL, sharing `nats`.
async fn replicas(nats: &Nats) -> (TestServer, TestServer) {
    let database = Database::parse(&shared_postgres().create_database()).unwrap();
    let on = |c: &mut fleetrun_server::ServerConfig| {
        c.database = Some(database.clone());
        c.nats_url = Some(nats.url());
    };
    let a = TestServer::start_with(on).await;
    let b = a.replica(on).await;
    (a, b)
}

/// Sent to A, run on an agent connected to B: B delivers it, A's dispatcher hears the result
/// and ends the command; watchers on either replica see it end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_to_one_replica_runs_on_an_agent_of_another() {
    let nats = Nats::start();
    let (a, b) = replicas(&nats).await;
    let mut agent = ScriptedAgent::online(&b, "far").await;
    let id = a
        .send(json!({"node_ids": [agent.node_id], "commands": ["echo hi"]}))
        .await;
    let run = agent.expect_run().await;
    assert_eq!(run.command_id, id);
    assert_eq!(run.script, "echo hi");
    agent.started(&id).await;
    agent.output(&id, 0, b"hi\n").await;
    assert_eq!(agent.expect_ack(&id).await, 3);
    // Watched on B, where it is not dispatched, from before its end: B hears of it on the bus.
    let mut on_b = Watch::open(&b, &id).await;
    assert_eq!(on_b.next().await["status"], "InProgress");
    agent.finished(&id, 0, 3).await;
    agent.expect_result_ack(&id).await;
    let done = a.wait_terminal(&id, DEADLINE).await;
    assert_eq!(done["status"], "Success", "{done}");
    let seen = support::within("B's watch to end", async {
        loop {
            match on_b.next().await {
                Value::Null => panic!("B's watch ended before the command did"),
                v if v["status"] == "Success" => return v,
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(seen["completed_count"], 1, "{seen}");
    let inv = a.get(&format!("/v1/commands/{id}/invocations")).await;
    assert_eq!(inv[0]["stdout"], "hi\n", "{inv}");
}

/// A node offline when A's dispatcher gets to it waits; when it connects to B, A hears of it
/// and delivers through B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_coming_online_on_another_replica_gets_what_waited_for_it() {
    let nats = Nats::start();
    let (a, b) = replicas(&nats).await;
    let mut agent = ScriptedAgent::register(&b, "late").await;
    let id = a
        .send(json!({"node_ids": [agent.node_id], "commands": ["true"]}))
        .await;
    // Tried at once (no responder: offline) and back to waiting; nothing reached the node.
    let db = a.store().await;
    let inv = db
        .get_invocation(&id, &agent.node_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inv.status, fleetrun_proto::InvocationStatus::Pending);
    agent.connect(&b, &[]).await;
    let run = agent.expect_run().await;
    assert_eq!(run.command_id, id);
    agent.started(&id).await;
    agent.finished(&id, 0, 0).await;
    agent.expect_result_ack(&id).await;
    let done = a.wait_terminal(&id, DEADLINE).await;
    assert_eq!(done["status"], "Success", "{done}");
}

/// A cancel through B of a command A dispatches reaches A's dispatcher, which sends the Cancel
/// to the agent through B; the command ends Cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_through_another_replica_reaches_the_owner() {
    let nats = Nats::start();
    let (a, b) = replicas(&nats).await;
    let mut agent = ScriptedAgent::online(&b, "busy").await;
    let id = a
        .send(json!({"node_ids": [agent.node_id], "commands": ["sleep 100"]}))
        .await;
    agent.expect_run().await;
    agent.started(&id).await;
    let (status, _, body) = b
        .call(
            reqwest::Method::POST,
            &format!("/v1/commands/{id}/cancel"),
            Some(&json!({})),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    agent
        .expect("Cancel", |f| match f {
            ServerFrame::Cancel { command_id } if command_id == id => Some(()),
            _ => None,
        })
        .await;
    // Killed by the cancel, as an agent reports it.
    agent
        .send(AgentFrame::Finished {
            command_id: id.clone(),
            result: ExecResult {
                outcome: Outcome::Cancelled,
                signal: Some(15),
                ..support::result(-1, 0)
            },
        })
        .await;
    agent.expect_result_ack(&id).await;
    let done = a.wait_terminal(&id, DEADLINE).await;
    assert_eq!(done["status"], "Cancelled", "{done}");
}

/// `--nats-url` is for replicas on PostgreSQL: with SQLite the server refuses to start, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_without_postgres_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        fleetrun_server::ServerConfig::new(dir.path().into(), "127.0.0.1:0".parse().unwrap());
    config.tls = fleetrun_server::net::tls::TlsMode::Insecure;
    config.nats_url = Some("nats://127.0.0.1:1".into());
    let Err(e) = fleetrun_server::start(config).await else {
        panic!("started with a bus on SQLite");
    };
    let e = format!("{e:#}");
    assert!(e.contains("--database postgres://"), "{e}");
}

/// Hostile messages on the bus (a bad frame for a node, a bad online or dispatcher message)
/// are refused with a warning; the replicas go on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_on_the_bus_change_nothing() {
    let nats = Nats::start();
    let (a, b) = replicas(&nats).await;
    let mut agent = ScriptedAgent::online(&b, "steady").await;
    let raw = async_nats::connect(nats.url()).await.unwrap();
    let reply = raw
        .request(
            format!("fleetrun.node.{}.frame", agent.node_id),
            "not a frame".into(),
        )
        .await
        .unwrap();
    assert_eq!(reply.payload.as_ref(), b"0");
    for (subject, payload) in [
        ("fleetrun.online", "no-space-here"),
        ("fleetrun.online", "other mi-not-a-node"),
        ("fleetrun.command.not-a-uuid", "{}"),
        (
            "fleetrun.command.0b5c1a8e-9d0f-4a6e-8f3e-2c1d0e9f8a7b",
            "not json",
        ),
    ] {
        raw.publish(subject, payload.into()).await.unwrap();
    }
    raw.flush().await.unwrap();
    // Still served end to end, across both replicas.
    let id = a
        .send(json!({"node_ids": [agent.node_id], "commands": ["true"]}))
        .await;
    agent.expect_run().await;
    agent.started(&id).await;
    agent.finished(&id, 0, 0).await;
    agent.expect_result_ack(&id).await;
    let done = a.wait_terminal(&id, DEADLINE).await;
    assert_eq!(done["status"], "Success", "{done}");
}
