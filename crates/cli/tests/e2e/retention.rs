//! Retention: commands older than `--retention` are purged with their output, and `fleetrun storage`
//! reports what is kept.

use crate::support::{Agent, Server, wait_until};
use std::time::Duration;

#[test]
fn old_commands_are_purged_with_their_output() {
    let server = Server::start_with(&["--retention", "2s", "--purge-interval", "1s"]);
    let _a = Agent::start(&server, "a", &[]);
    let c = server
        .cli(&[
            "send",
            "--targets",
            "all",
            "--wait",
            "-o",
            "json",
            "--",
            "echo kept; echo err >&2",
        ])
        .ok()
        .json();
    let id = c["command_id"].as_str().expect("id").to_owned();
    let node = c["invocations"][0]["node_id"]
        .as_str()
        .expect("node")
        .to_owned();
    let objects = server.data_dir.join("objects/output").join(&id);

    let s = server.cli(&["storage", "-o", "json"]).ok().json();
    assert_eq!(s["retention_secs"], 2, "{s}");
    assert!(s["database_bytes"].as_u64().unwrap_or(0) > 0, "{s}");
    // Purged at most 2 s + 1 s after it was requested; it may already be gone.
    if s["commands"] == 1 {
        assert!(s["oldest_command_at"].is_string(), "{s}");
        let table = server.cli(&["storage"]).ok().stdout_str();
        for needle in ["database", "output", "commands", "retention", "2s"] {
            assert!(table.contains(needle), "{needle} not in\n{table}");
        }
    }

    wait_until("the command to be purged", Duration::from_secs(20), || {
        let list = server.cli(&["commands", "-o", "json"]).ok().json();
        let listed = list
            .as_array()
            .is_some_and(|l| l.iter().any(|c| c["command_id"] == id.as_str()));
        (!listed).then_some(())
    });
    let s = wait_until(
        "storage to show nothing kept",
        Duration::from_secs(10),
        || {
            let s = server.cli(&["storage", "-o", "json"]).ok().json();
            (s["commands"] == 0).then_some(s)
        },
    );
    assert_eq!(s["invocations"], 0, "{s}");
    assert_eq!(s["output_bytes"], 0, "{s}");
    assert!(s["oldest_command_at"].is_null(), "{s}");
    wait_until(
        "the command's output objects to be deleted",
        Duration::from_secs(10),
        || (!objects.exists()).then_some(()),
    );
    let e = server.cli(&["output", &id, &node]).one_line_error();
    assert!(
        e.contains("CommandNotFound") || e.contains("not found"),
        "{e}"
    );
}
