//! Issue "Nothing lost", agent side: an agent killed with SIGKILL mid-command or after a command ended
//! but before the server stored the result. The agent's journal and output spool on disk must make the
//! outcome exact: output kept byte for byte, nothing run twice, nothing left running.

use crate::support::{
    Agent, Server, invocations, marker, processes_with, runs, wait_for_file, wait_until,
};
use std::time::Duration;

#[test]
fn agent_killed_mid_command_ends_terminated_with_its_output_and_no_rerun() {
    let server = Server::start();
    let mut a = Agent::start(&server, "a", &[]);
    let node = server.node_id("a");
    let dir = server.scratch("kill-agent");
    let (counter, mark_file) = (dir.join("runs"), dir.join("started"));
    let mark = marker("killagent");
    // The inner shell carries the marker in its command line, so a survivor can be found.
    let script = format!(
        "echo before; echo run >> '{c}'; touch '{m}'; sh -c 'sleep 30; true' {mark}; echo after",
        c = counter.display(),
        m = mark_file.display()
    );
    let id = server.send(&["--node", &node], &script);
    wait_until(
        "the script to start and `before` to be stored",
        Duration::from_secs(20),
        || {
            let c = server.command(&id);
            (mark_file.exists()
                && !processes_with(&mark).is_empty()
                && invocations(&c)[0]["stdout"] == "before\n")
                .then_some(())
        },
    );
    a.kill();
    a.restart();

    let c = server.wait_terminal(&id, Duration::from_secs(30));
    let inv = &invocations(&c)[0];
    assert_eq!(inv["status"], "Failed", "{c}");
    assert_eq!(inv["status_details"], "Terminated", "{c}");
    assert_eq!(server.output(&id, &node), b"before\n");
    assert_eq!(runs(&counter), 1, "the script ran more than once");
    wait_until(
        "the killed agent's command to be gone",
        Duration::from_secs(10),
        || processes_with(&mark).is_empty().then_some(()),
    );
    // And it stays gone: the restarted agent did not run it again.
    server.wait_online("a");
    assert_eq!(runs(&counter), 1, "the script ran again after the restart");
    assert_eq!(server.output(&id, &node), b"before\n");
}

#[test]
fn a_result_the_server_never_stored_survives_an_agent_crash() {
    let server = Server::start();
    let mut a = Agent::start(&server, "a", &[]);
    let node = server.node_id("a");
    let dir = server.scratch("unacked");
    let (counter, go) = (dir.join("runs"), dir.join("go"));
    let script = format!(
        "echo run >> '{c}'; echo one; {wait}; echo two; printf 'err\\n' >&2",
        c = counter.display(),
        wait = wait_for_file(&go)
    );
    let id = server.send(&["--node", &node], &script);
    wait_until("the invocation to start", Duration::from_secs(20), || {
        let c = server.command(&id);
        (invocations(&c)[0]["status"] == "InProgress").then_some(())
    });
    // The server freezes with the Run delivered; the command ends while nobody can store its result.
    server.stop();
    std::fs::write(&go, b"").expect("create go");
    let result = a.run_dir(&id).join("result.json");
    wait_until(
        "the agent to record the result on disk",
        Duration::from_secs(20),
        || result.exists().then_some(()),
    );
    a.kill();
    server.cont();
    a.restart();

    let c = server.wait_terminal(&id, Duration::from_secs(30));
    let inv = &invocations(&c)[0];
    assert_eq!(inv["status"], "Success", "{c}");
    assert_eq!(server.output(&id, &node), b"one\ntwo\n");
    let err = server.cli(&["output", &id, &node, "--stderr"]).ok().stdout;
    assert_eq!(err, b"err\n");
    assert_eq!(runs(&counter), 1, "the script ran more than once");
}
