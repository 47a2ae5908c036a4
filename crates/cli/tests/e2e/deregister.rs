//! Issue 5 (security), `fleetrun nodes deregister`: the live connection is closed at once, the agent
//! exits on UnknownNode, reconnects are refused, unfinished invocations end, sends are refused, and
//! the deregistration is audited.

use crate::support::{Agent, Server, invocations, wait_until};
use std::time::Duration;

#[test]
fn a_deregistered_node_is_cut_off_refused_and_audited() {
    let server = Server::start();
    let mut a = Agent::start(&server, "gone", &[("env", "dev")]);
    let _b = Agent::start(&server, "stays", &[("env", "dev")]);
    let node = server.node_id("gone");

    let dir = server.scratch("dereg");
    let started = dir.join("started");
    let script = format!("touch '{}'; sleep 60", started.display());
    let id = server.send(&["--node", &node], &script);
    wait_until("the command to start", Duration::from_secs(20), || {
        started.exists().then_some(())
    });

    let out = server
        .cli(&["nodes", "deregister", &node])
        .ok()
        .stdout_str();
    assert!(out.contains(&node), "{out}");

    // The live connection is closed with UnknownNode, which the agent treats as fatal.
    let (status, log) = a.wait_exit(Duration::from_secs(20));
    assert!(!status.success(), "agent exited {status}\n{log}");
    assert!(log.contains("UnknownNode"), "{log}");
    assert!(log.contains("deregistered"), "{log}");

    // Its unfinished invocation ended.
    let c = server.wait_terminal(&id, Duration::from_secs(20));
    let inv = &invocations(&c)[0];
    assert_eq!(inv["status"], "Failed", "{c}");
    assert_eq!(inv["status_details"], "Terminated", "{c}");

    // Gone from listings; the other node stays.
    let names: Vec<String> = server
        .nodes()
        .iter()
        .filter_map(|n| n["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(names, ["stays"]);

    // It cannot come back.
    a.restart();
    let (status, log) = a.wait_exit(Duration::from_secs(20));
    assert!(!status.success(), "agent exited {status}\n{log}");
    assert!(log.contains("UnknownNode"), "{log}");

    // Sends to it are refused as unknown.
    let refused = server.cli(&["send", "--node", &node, "--", "true"]);
    let line = refused.one_line_error();
    assert!(line.contains(&node), "{line}");

    // A second deregistration finds nothing.
    let again = server.cli(&["nodes", "deregister", &node]);
    assert!(
        again.one_line_error().contains("NodeNotFound"),
        "{}",
        again.stderr
    );

    // All of it is in the audit trail.
    let v = server
        .cli(&["audit", "--node", &node, "--limit", "1000", "-o", "json"])
        .ok()
        .json();
    let recs = v.as_array().expect("array");
    let find = |action: &str, result: &str| {
        recs.iter()
            .any(|r| r["action"] == action && r["result"] == result)
    };
    assert!(find("nodes.deregister", "200"), "{recs:?}");
    assert!(find("nodes.deregister", "404 NodeNotFound"), "{recs:?}");
    assert!(find("agent.hello", "UnknownNode: deregistered"), "{recs:?}");
    assert!(find("agent.hello", "Connected"), "{recs:?}");
    let d = recs
        .iter()
        .find(|r| r["action"] == "nodes.deregister")
        .expect("record");
    assert_eq!(d["principal"], "admin");
    server.cli(&["audit", "verify"]).ok();
}
