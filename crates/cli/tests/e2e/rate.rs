//! Rate control: max concurrency and max errors across several nodes.

use crate::support::{Agent, Server, invocations};

#[test]
fn max_concurrency_is_never_exceeded() {
    let server = Server::start();
    let _agents: Vec<Agent> = (0..6)
        .map(|i| Agent::start(&server, &format!("n{i}"), &[("group", "rate")]))
        .collect();
    let log = server.scratch("rate").join("events");
    let script = logged_run(&log);
    let c = server
        .cli(&[
            "send",
            "--targets",
            "tag:group=rate",
            "--max-concurrency",
            "2",
            "--wait",
            "-o",
            "json",
            "--",
            &script,
        ])
        .ok()
        .json();
    assert_eq!(c["status"], "Success", "{c}");
    assert_eq!(invocations(&c).len(), 6);

    let text = std::fs::read_to_string(&log).expect("events");
    let (events, most) = most_at_once(&text);
    assert_eq!(events, 12, "{text}");
    assert!(most <= 2, "{most} ran at once:\n{text}");
    // And the limit is used, not just respected: runs of 0.4 s dispatched two at a time overlap.
    assert_eq!(most, 2, "never two at once:\n{text}");
}

/// A script that logs its start and end to `log`, 0.4 s apart. Logged intervals lie inside the real
/// ones, so any overlap seen in the log really happened.
fn logged_run(log: &std::path::Path) -> String {
    let l = log.display();
    format!("echo \"S $(date +%s%N)\" >> {l}; sleep 0.4; echo \"E $(date +%s%N)\" >> {l}")
}

/// The number of events in a log of [`logged_run`]s, and the most runs that overlapped.
fn most_at_once(text: &str) -> (usize, i32) {
    let mut events: Vec<(u128, i32)> = text
        .lines()
        .map(|line| {
            let (kind, t) = line.split_once(' ').expect("event line");
            let t: u128 = t.trim().parse().expect("timestamp");
            // Ends sort before starts at the same instant.
            (t, if kind == "S" { 1 } else { -1 })
        })
        .collect();
    events.sort();
    let (mut running, mut most) = (0, 0);
    for (_, d) in &events {
        running += d;
        most = most.max(running);
    }
    (events.len(), most)
}

// The dispatcher resolves the spec's parsed rate against the target count: 50% of 4 nodes is 2 at
// once (SSM's default, 50, would run all 4 together).
#[test]
fn a_percentage_max_concurrency_is_resolved_against_the_targets() {
    let server = Server::start();
    let _agents: Vec<Agent> = (0..4)
        .map(|i| Agent::start(&server, &format!("n{i}"), &[("group", "pct")]))
        .collect();
    let log = server.scratch("rate-pct").join("events");
    let c = server
        .cli(&[
            "send",
            "--targets",
            "tag:group=pct",
            "--max-concurrency",
            "50%",
            "--wait",
            "-o",
            "json",
            "--",
            &logged_run(&log),
        ])
        .ok()
        .json();
    assert_eq!(c["status"], "Success", "{c}");
    assert_eq!(c["max_concurrency"], "50%", "shown as given: {c}");
    assert_eq!(invocations(&c).len(), 4);
    let text = std::fs::read_to_string(&log).expect("events");
    assert_eq!(most_at_once(&text), (8, 2), "{text}");
}

// 25% of 4 nodes is 1 error allowed: one at a time, the second failure stops the rest.
#[test]
fn a_percentage_max_errors_is_resolved_against_the_targets() {
    let server = Server::start();
    let _agents: Vec<Agent> = (0..4)
        .map(|i| Agent::start(&server, &format!("n{i}"), &[]))
        .collect();
    let out = server.cli(&[
        "send",
        "--targets",
        "all",
        "--max-concurrency",
        "1",
        "--max-errors",
        "25%",
        "--wait",
        "-o",
        "json",
        "--",
        "exit 7",
    ]);
    assert_eq!(out.code(), Some(1), "stderr: {}", out.stderr);
    let c = out.json();
    assert_eq!(c["status"], "Failed", "{c}");
    let inv = invocations(&c);
    let count = |status: &str| inv.iter().filter(|i| i["status"] == status).count();
    assert_eq!((count("Failed"), count("Cancelled")), (2, 2), "{c}");
}

#[test]
fn max_errors_zero_stops_after_the_first_failure() {
    let server = Server::start();
    let _agents: Vec<Agent> = (0..3)
        .map(|i| Agent::start(&server, &format!("n{i}"), &[]))
        .collect();
    let out = server.cli(&[
        "send",
        "--targets",
        "all",
        "--max-concurrency",
        "1",
        "--max-errors",
        "0",
        "--wait",
        "-o",
        "json",
        "--",
        "exit 7",
    ]);
    assert_eq!(out.code(), Some(1), "stderr: {}", out.stderr);
    let c = out.json();
    assert_eq!(c["status"], "Failed", "{c}");
    let inv = invocations(&c);
    assert_eq!(inv.len(), 3);
    let failed: Vec<_> = inv.iter().filter(|i| i["status"] == "Failed").collect();
    assert_eq!(failed.len(), 1, "exactly one ran: {c}");
    assert_eq!(failed[0]["exit_code"], 7);
    for i in inv.iter().filter(|i| i["status"] != "Failed") {
        assert_eq!(i["status"], "Cancelled", "{i}");
        assert!(
            i["status_details"]
                .as_str()
                .is_some_and(|d| d.contains("Max Errors")),
            "{i}"
        );
    }
}
