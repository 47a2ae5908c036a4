//! Two replicas on one PostgreSQL database with a NATS server between them, both started by the
//! tests (crates/testkit): a command sent to one replica for an agent connected to the other is
//! delivered by the other, once; the agent's result reaches the owner's dispatcher; a node that
//! comes online on the other replica is delivered to when it does; a cancel through the other
//! replica reaches the owner. The agents are scripts on real WebSockets.

mod support;

use fleetrun_proto::CommandId;
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

    /// The first state that is Success; a stream that ends before is a failure.
    async fn until_success(&mut self) -> Value {
        loop {
            match self.next().await {
                Value::Null => panic!("the watch ended before the command did"),
                v if v["status"] == "Success" => return v,
                _ => {}
            }
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

/// The agent runs `id` (already delivered) to a Success, which `server` then reports.
async fn run_to_success(agent: &mut ScriptedAgent, server: &TestServer, id: &CommandId) {
    agent.started(id).await;
    agent.finished(id, 0, 0).await;
    agent.expect_result_ack(id).await;
    let done = server.wait_terminal(id, DEADLINE).await;
    assert_eq!(done["status"], "Success", "{done}");
}

/// Cancels `id` (all its nodes) through `server`'s API.
async fn cancel_through(server: &TestServer, id: &CommandId) {
    let (status, _, body) = server
        .call(
            reqwest::Method::POST,
            &format!("/v1/commands/{id}/cancel"),
            Some(&json!({})),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

/// The agent gets the Cancel of `id` and reports the run killed by it, as an agent does.
async fn cancelled_on(agent: &mut ScriptedAgent, id: &CommandId) {
    agent
        .expect("Cancel", |f| match f {
            ServerFrame::Cancel { command_id } if command_id == *id => Some(()),
            _ => None,
        })
        .await;
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
    let seen = on_b.until_success().await;
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
    // A heard of it (that is how the Run came): A shows the node Online, connected to B.
    let nodes = a.get("/v1/nodes").await;
    let node = nodes
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["node_id"] == agent.node_id.as_str()))
        .expect("the node listed on A");
    assert_eq!(node["ping_status"], "Online", "{node}");
    run_to_success(&mut agent, &a, &id).await;
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
    cancel_through(&b, &id).await;
    cancelled_on(&mut agent, &id).await;
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

/// Hostile messages on the bus (a bad frame for a node, a bad follow request, a bad online or
/// dispatcher message) are refused with a warning; the replicas go on serving.
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
    let reply = raw
        .request(
            format!("fleetrun.node.{}.follow", agent.node_id),
            "not a request".into(),
        )
        .await
        .unwrap();
    let answer: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(answer, json!({"live": null}));
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
    run_to_success(&mut agent, &a, &id).await;
}

/// Output produced on B, followed on A from before it starts: A serves the stored bytes and then
/// B's live chunks, byte-exact, each chunk as it comes (the follower reads chunk 1 before chunk 2
/// is written), past the inline copy and across the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_produced_on_one_replica_is_followed_live_on_another() {
    let nats = Nats::start();
    let (a, b) = replicas(&nats).await;
    let mut agent = ScriptedAgent::online(&b, "talker").await;
    let id = a
        .send(json!({"node_ids": [agent.node_id], "commands": ["talk"]}))
        .await;
    agent.expect_run().await;
    let mut follow = reqwest::Client::new()
        .get(format!(
            "http://{}/v1/commands/{id}/invocations/{}/output/stdout?follow=true",
            a.addr, agent.node_id
        ))
        .bearer_auth(&a.token)
        .send()
        .await
        .unwrap();
    assert_eq!(follow.status(), 200);
    agent.started(&id).await;
    // Three chunks of distinct bytes, 200 KiB each: past the inline copy (24,000 bytes).
    let chunks: Vec<Vec<u8>> = (0..3u32)
        .map(|c| (0..200 * 1024u32).map(|i| (i * 7 + c * 13) as u8).collect())
        .collect();
    let mut sent = 0u64;
    let mut got = Vec::new();
    for chunk in &chunks {
        agent.output(&id, sent, chunk).await;
        sent += chunk.len() as u64;
        assert_eq!(agent.expect_ack(&id).await, sent);
        support::within("the chunk on A", async {
            while (got.len() as u64) < sent {
                let part = follow.chunk().await.unwrap().expect("follow ended early");
                got.extend_from_slice(&part);
            }
        })
        .await;
        assert_eq!(got.len() as u64, sent, "more than was written");
    }
    agent.finished(&id, 0, sent).await;
    agent.expect_result_ack(&id).await;
    support::within("the follow to end", async {
        while let Some(part) = follow.chunk().await.unwrap() {
            got.extend_from_slice(&part);
        }
    })
    .await;
    assert!(
        got == chunks.concat(),
        "followed bytes differ ({} of {sent})",
        got.len()
    );
}

/// The owner of a command dies mid-fan-out (its process gone at once, as kill -9 would): another
/// replica takes the command over when the lease runs out and finishes the fan-out from the
/// database. Every invocation ends once, the counts are exact, and no node gets its Run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_owners_command_is_taken_over_and_finished_once() {
    let nats = Nats::start();
    let database = Database::parse(&shared_postgres().create_database()).unwrap();
    let on = |c: &mut fleetrun_server::ServerConfig| {
        c.database = Some(database.clone());
        c.nats_url = Some(nats.url());
        c.replica_lease = std::time::Duration::from_millis(900);
    };
    let mut a = TestServer::start_with(on).await;
    let b = a.replica(on).await;
    let mut agents = Vec::new();
    for n in 0..4 {
        agents.push(ScriptedAgent::online(&b, &format!("fan-{n}")).await);
    }
    let nodes: Vec<_> = agents.iter().map(|g| g.node_id.clone()).collect();
    let id = a
        .send(json!({"node_ids": nodes, "commands": ["true"], "max_concurrency": "1"}))
        .await;
    // One at a time in target order: the first runs, then A dies.
    agents[0].expect_run().await;
    a.kill();
    for (n, agent) in agents.iter_mut().enumerate() {
        if n > 0 {
            // Delivered by B once it holds the command.
            let run = agent.expect_run().await;
            assert_eq!(run.command_id, id);
        }
        agent.started(&id).await;
        agent.finished(&id, 0, 0).await;
        agent.expect_result_ack(&id).await;
    }
    let done = b.wait_terminal(&id, DEADLINE).await;
    assert_eq!(done["status"], "Success", "{done}");
    assert_eq!(done["completed_count"], 4, "{done}");
    assert_eq!(done["error_count"], 0, "{done}");
    let db = b.store().await;
    let lease = db.command_lease(&id).await.unwrap().unwrap();
    let b_id = std::fs::read_to_string(b.data.join("replica.id")).unwrap();
    assert_eq!(lease.owner, b_id.trim(), "taken over by B");
    assert_eq!(lease.epoch, 2, "one takeover");
    // Nothing delivered twice: a result sent again is acknowledged (and changes nothing); any
    // Run sent to the agent before would come first.
    for agent in &mut agents {
        agent.finished(&id, 0, 0).await;
        let next = agent
            .expect("the ResultAck", |f| match f {
                ServerFrame::Run(r) => Some(Err(r.command_id)),
                ServerFrame::ResultAck { .. } => Some(Ok(())),
                _ => None,
            })
            .await;
        assert_eq!(next, Ok(()), "a second Run");
    }
}

/// NATS goes down while a command runs on B for A: the agent's result is stored by B while the
/// bus is down (its message to A lost, or held by B's client until it reconnects). When NATS is
/// back, A reloads what it dispatches from the database and ends the command: nothing waits for
/// a message that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_mid_command_heals_from_the_database() {
    let mut nats = Nats::start();
    let (a, b) = replicas(&nats).await;
    let mut agent = ScriptedAgent::online(&b, "through-the-blip").await;
    let id = a
        .send(json!({"node_ids": [agent.node_id], "commands": ["true"]}))
        .await;
    agent.expect_run().await;
    agent.started(&id).await;
    let mut on_a = Watch::open(&a, &id).await;
    assert_eq!(on_a.next().await["status"], "InProgress");

    nats.stop();
    agent.finished(&id, 0, 0).await;
    agent.expect_result_ack(&id).await;
    let db = a.store().await;
    let inv = db
        .get_invocation(&id, &agent.node_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inv.status, fleetrun_proto::InvocationStatus::Success);
    nats.start_again();

    let done = a.wait_terminal(&id, DEADLINE).await;
    assert_eq!(done["status"], "Success", "{done}");
    // A's watch from before the blip ends with the command too.
    let seen = on_a.until_success().await;
    assert_eq!(seen["completed_count"], 1, "{seen}");
}

/// A cancel through B while the command's owner A is dead and B has not taken it over yet: no
/// dispatcher hears it, but it is stored; B takes the command over, reads the cancel and sends
/// it to the running invocation. The command ends Cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_no_replica_dispatches_is_kept_for_the_next_owner() {
    let nats = Nats::start();
    let database = Database::parse(&shared_postgres().create_database()).unwrap();
    let on = |c: &mut fleetrun_server::ServerConfig| {
        c.database = Some(database.clone());
        c.nats_url = Some(nats.url());
        // Long enough that the cancel comes before B's takeover.
        c.replica_lease = std::time::Duration::from_secs(3);
    };
    let mut a = TestServer::start_with(on).await;
    let b = a.replica(on).await;
    let mut agent = ScriptedAgent::online(&b, "orphaned").await;
    let id = a
        .send(json!({"node_ids": [agent.node_id], "commands": ["sleep 100"]}))
        .await;
    agent.expect_run().await;
    agent.started(&id).await;
    a.kill();
    cancel_through(&b, &id).await;
    let db = b.store().await;
    let lease = db.command_lease(&id).await.unwrap().unwrap();
    assert_eq!(lease.epoch, 1, "B took the command over before the cancel");
    cancelled_on(&mut agent, &id).await;
    agent.expect_result_ack(&id).await;
    let done = b.wait_terminal(&id, DEADLINE).await;
    assert_eq!(done["status"], "Cancelled", "{done}");
}

/// Authorization scopes cached from the fleet follow a tag change made on another replica: a
/// user limited to `env=dev` nodes who read a command's node through B stops seeing it there
/// once A retags the node `env=prod`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_change_on_one_replica_narrows_access_on_another() {
    let nats = Nats::start();
    let (a, b) = replicas(&nats).await;
    let policy = r#"permit (principal, action in [Action::"list", Action::"read-output"], resource is Node)
        when { resource.hasTag("env") && resource.getTag("env") == "dev" };"#;
    let dev = a.token_for("dev", "none", Some(policy)).await;
    let mut agent = ScriptedAgent::online(&b, "retagged").await;
    let node = agent.node_id.clone();
    let retag = |env: &'static str| {
        let (a, node) = (&a, node.clone());
        async move {
            let (status, _, body) = a
                .call(
                    reqwest::Method::PATCH,
                    &format!("/v1/nodes/{node}/tags"),
                    Some(&json!({"set": {"env": env}})),
                    &[],
                )
                .await;
            assert_eq!(status, 200, "{body}");
        }
    };
    retag("dev").await;
    let id = a
        .send(json!({"node_ids": [agent.node_id], "commands": ["true"]}))
        .await;
    agent.expect_run().await;
    run_to_success(&mut agent, &a, &id).await;
    let listed_on_b = || async {
        let (status, _, body) = b
            .call_as(&dev, reqwest::Method::GET, "/v1/commands", None, &[])
            .await;
        assert_eq!(status, 200, "{body}");
        body.as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["command_id"] == id.as_str()))
    };
    assert!(
        listed_on_b().await,
        "dev cannot see its dev node's command on B"
    );

    retag("prod").await;
    // B hears of the change on the bus (a message, not a heartbeat): bounded wait for it.
    support::within("B to drop the scope it cached", async {
        while listed_on_b().await {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}
