//! Timeouts, cancellation, offline nodes and concurrent commands on one node.

use crate::support::{
    Agent, Server, alive, invocations, marker, processes_with, read_pid, wait_until,
};
use std::path::Path;
use std::time::Duration;

/// A script that leaves a tree behind unless its whole process group is stopped: an inner shell (its
/// command line carries `mark`) with a background `sleep`, plus pid files for all three.
fn stubborn_script(dir: &Path, mark: &str) -> String {
    let d = dir.display();
    format!(
        "sh -c 'echo $$ > {d}/inner.pid; sleep 1000 & echo $! > {d}/sleep.pid; wait' {mark} & \
         echo $$ > {d}/outer.pid; wait"
    )
}

fn pids(dir: &Path) -> Vec<u32> {
    ["outer.pid", "inner.pid", "sleep.pid"]
        .iter()
        .filter_map(|f| read_pid(&dir.join(f)))
        .collect()
}

/// Nothing the script started survives (allowing the agent a moment to reap).
fn assert_no_survivors(dir: &Path, mark: &str) {
    let pids = pids(dir);
    assert_eq!(pids.len(), 3, "the script did not write its pids");
    wait_until(
        "the script's processes to be gone",
        Duration::from_secs(10),
        || (pids.iter().all(|p| !alive(*p)) && processes_with(mark).is_empty()).then_some(()),
    );
}

#[test]
fn execution_timeout_kills_the_whole_tree() {
    let server = Server::start();
    let _a = Agent::start(&server, "a", &[]);
    let dir = server.scratch("timeout");
    let mark = marker("timeout");
    let out = server.cli(&[
        "send",
        "--targets",
        "all",
        "--execution-timeout",
        "2",
        "--wait",
        "-o",
        "json",
        "--",
        &stubborn_script(&dir, &mark),
    ]);
    assert_eq!(out.code(), Some(1), "stderr: {}", out.stderr);
    let c = out.json();
    assert_eq!(c["status"], "TimedOut", "{c}");
    let inv = &invocations(&c)[0];
    assert_eq!(inv["status"], "TimedOut");
    assert_eq!(inv["status_details"], "Execution Timed Out");
    assert_no_survivors(&dir, &mark);
}

#[test]
fn cancel_stops_a_running_command() {
    let server = Server::start();
    let _a = Agent::start(&server, "a", &[]);
    let dir = server.scratch("cancel");
    let mark = marker("cancel");
    let id = server
        .cli(&[
            "send",
            "--targets",
            "all",
            "--",
            &stubborn_script(&dir, &mark),
        ])
        .ok()
        .stdout_str()
        .trim()
        .to_owned();
    wait_until("the script to start", Duration::from_secs(15), || {
        (pids(&dir).len() == 3).then_some(())
    });
    let out = server.cli(&["cancel", &id]).ok().stdout_str();
    assert!(out.contains(&id), "{out}");
    let c = server.wait_terminal(&id, Duration::from_secs(20));
    assert_eq!(c["status"], "Cancelled", "{c}");
    assert_eq!(invocations(&c)[0]["status"], "Cancelled");
    assert_no_survivors(&dir, &mark);

    // Cancelling again is harmless; cancelling an unknown command is a clean error.
    server.cli(&["cancel", &id]).ok();
    let e = server
        .cli(&["cancel", "0b5c1a8e-9d0f-4a6e-8f3e-2c1d0e9f8a7b"])
        .one_line_error();
    assert!(e.contains('('), "{e}");
}

#[test]
fn an_offline_node_times_out_delivery() {
    let server = Server::start();
    let mut a = Agent::start(&server, "a", &[]);
    let node = server.wait_online("a")["node_id"]
        .as_str()
        .expect("id")
        .to_owned();
    a.kill();
    wait_until(
        "the node to be seen offline",
        Duration::from_secs(15),
        || {
            server
                .nodes()
                .into_iter()
                .find(|n| n["name"] == "a" && n["ping_status"] != "Online")
        },
    );
    let out = server.cli(&[
        "send",
        "--node",
        &node,
        "--delivery-timeout",
        "2",
        "--wait",
        "-o",
        "json",
        "--",
        "true",
    ]);
    assert_eq!(out.code(), Some(1), "stderr: {}", out.stderr);
    let c = out.json();
    let inv = &invocations(&c)[0];
    assert_eq!(inv["status"], "TimedOut", "{c}");
    assert_eq!(inv["status_details"], "Delivery Timed Out");
    assert_eq!(c["delivery_timed_out_count"], 1);
}

#[test]
fn a_node_back_in_time_runs_the_command() {
    let server = Server::start();
    let mut a = Agent::start(&server, "a", &[]);
    let node = server.wait_online("a")["node_id"]
        .as_str()
        .expect("id")
        .to_owned();
    a.kill();
    wait_until(
        "the node to be seen offline",
        Duration::from_secs(15),
        || {
            server
                .nodes()
                .into_iter()
                .find(|n| n["name"] == "a" && n["ping_status"] != "Online")
        },
    );
    let id = server
        .cli(&[
            "send",
            "--node",
            &node,
            "--delivery-timeout",
            "60",
            "--",
            "echo back",
        ])
        .ok()
        .stdout_str()
        .trim()
        .to_owned();
    assert_eq!(server.command(&id)["status"], "Pending");
    a.restart();
    let c = server.wait_terminal(&id, Duration::from_secs(30));
    assert_eq!(c["status"], "Success", "{c}");
    assert_eq!(invocations(&c)[0]["stdout"], "back\n");
    // Same node: the restarted agent reused its identity.
    assert_eq!(server.nodes().len(), 1);
}

#[test]
fn five_commands_run_at_once_on_one_node() {
    let server = Server::start();
    let _a = Agent::start(&server, "a", &[]);
    let dir = server.scratch("barrier");
    let d = dir.display();
    // Each command waits (boundedly) until all five have started: they succeed only if they overlap.
    let ids: Vec<String> = (0..5)
        .map(|i| {
            let script = format!(
                "touch {d}/{i}; n=0; while [ $(ls {d} | wc -l) -lt 5 ] && [ $n -lt 300 ]; do sleep 0.05; n=$((n+1)); done; \
                 [ $(ls {d} | wc -l) -ge 5 ]"
            );
            server
                .cli(&["send", "--targets", "all", "--", &script])
                .ok()
                .stdout_str()
                .trim()
                .to_owned()
        })
        .collect();
    for id in &ids {
        let c = server.wait_terminal(id, Duration::from_secs(30));
        assert_eq!(c["status"], "Success", "{c}");
    }
}

#[test]
fn cancel_one_node_leaves_the_others_running() {
    let server = Server::start();
    let _a = Agent::start(&server, "a", &[]);
    let _b = Agent::start(&server, "b", &[]);
    let a_id = server.wait_online("a")["node_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let dir = server.scratch("cancel-one");
    let go = dir.join("go");
    let script = format!(
        "n=0; while [ ! -f '{g}' ] && [ $n -lt 400 ]; do sleep 0.05; n=$((n+1)); done; echo ran",
        g = go.display()
    );
    let id = server
        .cli(&["send", "--targets", "all", "--", &script])
        .ok()
        .stdout_str()
        .trim()
        .to_owned();
    wait_until("both invocations to start", Duration::from_secs(15), || {
        let c = server.command(&id);
        invocations(&c)
            .iter()
            .all(|i| i["status"] == "InProgress")
            .then_some(())
    });
    server.cli(&["cancel", &id, "--node", &a_id]).ok();
    wait_until(
        "a's invocation to be cancelled",
        Duration::from_secs(15),
        || {
            let c = server.command(&id);
            invocations(&c)
                .into_iter()
                .find(|i| i["node_id"] == a_id.as_str() && i["status"] == "Cancelled")
        },
    );
    std::fs::write(&go, b"").expect("create go");
    let c = server.wait_terminal(&id, Duration::from_secs(20));
    let b = invocations(&c)
        .into_iter()
        .find(|i| i["node_name"] == "b")
        .expect("b's invocation");
    assert_eq!(b["status"], "Success", "{c}");
    assert_eq!(b["stdout"], "ran\n");
}
