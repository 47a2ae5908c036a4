//! Replicas as real processes: `fleetrun server`s on one PostgreSQL database with one
//! nats-server between them (both started by the test, crates/testkit), real agents connected to
//! one replica, commands sent to another.

use crate::support::*;
use fleetrun_testkit::{Nats, shared_postgres};
use std::time::{Duration, Instant};

/// Replicas A and B (leases of `lease`) on a fresh database, sharing `nats`.
fn replicas(nats: &Nats, lease: &str) -> (Server, Server) {
    let database = shared_postgres().create_database();
    let nats_url = nats.url();
    let args = [
        "--database",
        database.as_str(),
        "--nats-url",
        nats_url.as_str(),
        "--replica-lease",
        lease,
    ];
    let a = Server::start_with(&args);
    let b = a.replica(&args);
    (a, b)
}

/// The owner of a fan-out (A) is frozen (SIGSTOP) past its lease: B takes the command over and
/// finishes it, one node at a time as asked, each node running once. When A thaws, its
/// dispatcher's stale view (its delivery deadline passed, nodes it thinks undelivered) leads to
/// writes the database refuses: A logs that the command was taken over, and nothing changes.
#[test]
fn an_owner_frozen_past_its_lease_is_taken_over_and_its_writes_are_refused() {
    const NODES: usize = 3;
    const DELIVERY_TIMEOUT: u64 = 12;
    let nats = Nats::start();
    let (a, b) = replicas(&nats, "2s");
    let code = b.activation_code(&[("fleet", "frozen")], NODES as u64);
    let agents: Vec<Agent> = (0..NODES)
        .map(|i| Agent::spawn_with_code(&b, &format!("f{i}"), AgentOpts::default(), &code))
        .collect();
    wait_until("all agents Online", Duration::from_secs(60), || {
        let n = b.nodes();
        (n.len() == NODES && n.iter().all(|n| n["ping_status"] == "Online")).then_some(())
    });
    let dir = b.scratch("frozen");
    let script = format!(
        "echo run >> '{d}/'$FLEETRUN_NODE_ID; sleep 1",
        d = dir.display()
    );
    let sent_at = Instant::now();
    let id = a.send(
        &[
            "--targets",
            "tag:fleet=frozen",
            "--max-concurrency",
            "1",
            "--delivery-timeout",
            &DELIVERY_TIMEOUT.to_string(),
        ],
        &script,
    );
    wait_until("the first node to start", Duration::from_secs(30), || {
        let c = b.command(&id);
        invocations(&c)
            .iter()
            .any(|i| i["status"] == "InProgress")
            .then_some(())
    });
    a.stop();

    let done = b.wait_terminal(&id, Duration::from_secs(60));
    assert_eq!(done["status"], "Success", "{done}\n{}", b.logs());
    assert_eq!(done["completed_count"], NODES as u64, "{done}");
    assert!(
        b.all_logs().contains("taking over dispatch"),
        "B did not take the command over:\n{}",
        b.logs()
    );

    // A thaws after its delivery deadline: its dispatcher acts on what it last knew.
    wait_until(
        "A's delivery deadline to pass",
        Duration::from_secs(DELIVERY_TIMEOUT + 30),
        || (sent_at.elapsed() > Duration::from_secs(DELIVERY_TIMEOUT + 1)).then_some(()),
    );
    a.cont();
    wait_until(
        "A to find its writes refused",
        Duration::from_secs(30),
        || {
            a.all_logs()
                .contains("command taken over by another owner")
                .then_some(())
        },
    );
    let after = b.command(&id);
    assert_eq!(after["status"], "Success", "{after}");
    assert_eq!(after["completed_count"], NODES as u64, "{after}");
    assert_eq!(after["delivery_timed_out_count"], 0, "{after}");

    // Each node ran once, one at a time (max-concurrency 1 across the two owners).
    let mut spans: Vec<(String, String)> = invocations(&after)
        .iter()
        .map(|i| {
            assert_eq!(i["status"], "Success", "{i}");
            let node = i["node_id"].as_str().expect("node id");
            assert_eq!(
                runs(&dir.join(node)),
                1,
                "{node} ran more or less than once"
            );
            (
                i["started_at"].as_str().expect("started_at").to_owned(),
                i["finished_at"].as_str().expect("finished_at").to_owned(),
            )
        })
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "two invocations ran at once: {pair:?}"
        );
    }
    drop(agents);
}

/// The replica holding an agent's connection (A) is killed (-9) while the agent runs a command
/// another replica (B) dispatches. The agent, given both replicas' URLs, reconnects to B with the
/// command it holds; B re-attaches it, its output resumes where storage has it, and its result
/// is taken once: output byte-exact, the script run once.
#[test]
fn the_agents_replica_killed_mid_command_loses_nothing() {
    let nats = Nats::start();
    let (mut a, b) = replicas(&nats, "2s");
    // One trust for both replicas' own CAs.
    let cas = b.scratch("trust").join("cas.pem");
    let mut bundle = std::fs::read(a.ca.as_ref().expect("A's CA")).expect("A's CA");
    bundle.extend(std::fs::read(b.ca.as_ref().expect("B's CA")).expect("B's CA"));
    std::fs::write(&cas, bundle).expect("write the CA bundle");
    let opts = AgentOpts {
        server: Some(format!("{},{}", a.url, b.url)),
        ..AgentOpts::args(&["--ca-cert", &cas.display().to_string()])
    };
    let code = a.activation_code(&[], 1);
    let agent = Agent::spawn_with_code(&a, "moving", opts, &code);
    let node = a.wait_online("moving")["node_id"]
        .as_str()
        .expect("node id")
        .to_owned();
    let dir = b.scratch("moving");
    let gate = dir.join("go");
    let script = format!(
        "echo run >> '{d}/runs'; echo before; {wait}; for i in $(seq 20); do echo \"line $i\"; sleep 0.05; done",
        d = dir.display(),
        wait = wait_for_file(&gate),
    );
    let id = b.send(&["--node", &node], &script);
    wait_until("the first line stored", Duration::from_secs(30), || {
        (b.output(&id, &node) == b"before\n").then_some(())
    });
    a.kill9();
    std::fs::write(&gate, b"").expect("open the gate");

    let done = b.wait_terminal(&id, Duration::from_secs(60));
    assert_eq!(done["status"], "Success", "{done}\n{}", b.logs());
    let mut expected = b"before\n".to_vec();
    for i in 1..=20 {
        expected.extend_from_slice(format!("line {i}\n").as_bytes());
    }
    assert_eq!(
        String::from_utf8_lossy(&b.output(&id, &node)),
        String::from_utf8_lossy(&expected)
    );
    assert_eq!(
        runs(&dir.join("runs")),
        1,
        "the script ran more or less than once"
    );
    drop(agent);
}
