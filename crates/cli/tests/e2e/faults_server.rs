//! Issue "Nothing lost", server side: the server killed with SIGKILL in the middle of a fan-out and
//! started again on the same data dir and address; and a reconnect storm of 100 agents against a
//! server that admits only a few handshakes at once.

use crate::support::{Agent, AgentOpts, Server, invocations, runs, wait_until};
use std::time::{Duration, Instant};

const LINES: usize = 5;

fn expected_output(node: &str) -> Vec<u8> {
    (1..=LINES)
        .map(|i| format!("{node} line {i}\n"))
        .collect::<String>()
        .into_bytes()
}

#[test]
fn server_killed_mid_fan_out_loses_nothing_and_runs_nothing_twice() {
    const NODES: usize = 20;
    let mut server = Server::start();
    let code = server.activation_code(&[("fleet", "f")], NODES as u64);
    let agents: Vec<Agent> = (0..NODES)
        .map(|i| Agent::spawn_with_code(&server, &format!("n{i:02}"), AgentOpts::default(), &code))
        .collect();
    wait_until("all agents Online", Duration::from_secs(60), || {
        let n = server.nodes();
        (n.len() == NODES && n.iter().all(|n| n["ping_status"] == "Online")).then_some(())
    });
    let dir = server.scratch("fanout");
    let script = format!(
        "echo run >> '{d}/'$FLEETRUN_NODE_ID; \
         for i in $(seq {LINES}); do echo \"$FLEETRUN_NODE_ID line $i\"; sleep 0.1; done",
        d = dir.display()
    );
    let id = server.send(
        &["--targets", "tag:fleet=f", "--max-concurrency", "3"],
        &script,
    );
    let done_at_kill = wait_until(
        "some but not all invocations to be done",
        Duration::from_secs(60),
        || {
            let done = server.command(&id)["completed_count"].as_u64().unwrap_or(0);
            (done > 0).then_some(done)
        },
    );
    server.kill9();
    assert!(
        (done_at_kill as usize) < NODES,
        "the fan-out ended before the kill ({done_at_kill} done)"
    );
    server.restart();

    let c = server.wait_terminal(&id, Duration::from_secs(90));
    assert_eq!(c["status"], "Success", "{c}");
    assert_eq!(c["completed_count"], NODES as u64);
    let invs = invocations(&c);
    assert_eq!(invs.len(), NODES);
    for inv in &invs {
        let node = inv["node_id"].as_str().expect("node id");
        assert_eq!(inv["status"], "Success", "{inv}");
        assert_eq!(
            String::from_utf8_lossy(&server.output(&id, node)),
            String::from_utf8_lossy(&expected_output(node)),
            "output of {node}"
        );
        assert_eq!(
            runs(&dir.join(node)),
            1,
            "{node} ran the script more or less than once"
        );
    }
    drop(agents);
}

#[test]
fn reconnect_storm_is_shed_with_503_and_every_agent_comes_back() {
    const NODES: usize = 100;
    let mut server = Server::start_with(&["--max-handshakes", "4"]);
    let code = server.activation_code(&[], NODES as u64);
    let agents: Vec<Agent> = (0..NODES)
        .map(|i| Agent::spawn_with_code(&server, &format!("s{i:03}"), AgentOpts::default(), &code))
        .collect();
    let all_online = |server: &Server| {
        let n = server.nodes();
        (n.len() == NODES && n.iter().all(|n| n["ping_status"] == "Online")).then_some(())
    };
    wait_until(
        "100 agents to enrol and be Online",
        Duration::from_secs(90),
        || all_online(&server),
    );

    server.restart();
    let t = Instant::now();
    wait_until(
        "100 agents to be Online after the restart",
        Duration::from_secs(60),
        || all_online(&server),
    );
    eprintln!("100 agents back Online {:?} after the restart", t.elapsed());
    assert!(server.running(), "the server died under the storm");

    // The agents say when they were told to come back later.
    let busy: usize = agents
        .iter()
        .map(|a| {
            a.all_logs()
                .lines()
                .filter(|l| l.contains("503") || l.to_ascii_lowercase().contains("retry-after"))
                .count()
        })
        .sum();
    eprintln!("agents logged {busy} busy answers (503)");
    assert!(
        busy > 0,
        "no agent was ever told 503 with 4 handshake slots"
    );
    drop(agents);
}
