//! Rate control: max concurrency and max errors across several nodes.

use crate::support::{Agent, Server, invocations};

#[test]
fn max_concurrency_is_never_exceeded() {
    let server = Server::start();
    let _agents: Vec<Agent> = (0..6)
        .map(|i| Agent::start(&server, &format!("n{i}"), &[("group", "rate")]))
        .collect();
    let log = server.scratch("rate").join("events");
    let l = log.display();
    // Each run logs its start and end; logged intervals lie inside the real ones, so any overlap seen
    // here really happened.
    let script =
        format!("echo \"S $(date +%s%N)\" >> {l}; sleep 0.4; echo \"E $(date +%s%N)\" >> {l}");
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
    let mut events: Vec<(u128, i32)> = text
        .lines()
        .map(|line| {
            let (kind, t) = line.split_once(' ').expect("event line");
            let t: u128 = t.trim().parse().expect("timestamp");
            // Ends sort before starts at the same instant.
            (t, if kind == "S" { 1 } else { -1 })
        })
        .collect();
    assert_eq!(events.len(), 12, "{text}");
    events.sort();
    let (mut running, mut most) = (0, 0);
    for (_, d) in events {
        running += d;
        most = most.max(running);
    }
    assert!(most <= 2, "{most} ran at once:\n{text}");
    // And the limit is used, not just respected: runs of 0.4 s dispatched two at a time overlap.
    assert_eq!(most, 2, "never two at once:\n{text}");
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
