//! Issue "Nothing lost", flow control: an agent whose output spool is full while the server is frozen
//! holds the command back instead of growing; a fast producer leaves the agent's and the server's memory
//! bounded.

use crate::support::{
    Agent, AgentOpts, Server, invocations, marker, processes_with, rss, wait_for_file, wait_until,
};
use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

const MIB: u64 = 1024 * 1024;

/// Bytes of output spooled for one invocation: its `stdout.*`/`stderr.*` segment files.
fn spooled(run_dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name.starts_with("stdout.") || name.starts_with("stderr."))
                && !name.ends_with(".acked")
        })
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

#[test]
fn a_full_spool_blocks_the_command_and_nothing_is_lost() {
    const SPOOL_MAX: u64 = 2 * MIB;
    const LEN: u64 = 20 * MIB;
    let server = Server::start();
    let agent = Agent::start_opts(
        &server,
        "spool",
        AgentOpts::args(&["--spool-max-bytes", &SPOOL_MAX.to_string()]),
    );
    let node = server.node_id("spool");
    let go = server.scratch("spool").join("go");
    let mark = marker("spool");
    let script = format!("{}; yes {mark} | head -c {LEN}", wait_for_file(&go));
    let id = server.send(&["--node", &node], &script);
    wait_until("the invocation to start", Duration::from_secs(20), || {
        (invocations(&server.command(&id))[0]["status"] == "InProgress").then_some(())
    });
    server.stop();
    std::fs::write(&go, b"").expect("create go");

    let run_dir = agent.run_dir(&id);
    // Bound: the spool's size, plus one segment being filled and one read in flight.
    let bound = SPOOL_MAX + MIB + 64 * 1024;
    let mut samples = Vec::new();
    wait_until(
        "the spool to fill and stay put",
        Duration::from_secs(20),
        || {
            let s = spooled(&run_dir);
            assert!(s <= bound, "spool holds {s} bytes, bound {bound}");
            samples.push(s);
            let n = samples.len();
            (n >= 4 && s >= SPOOL_MAX / 2 && samples[n - 4..].iter().all(|x| *x == s)).then_some(())
        },
    );
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(200));
        let s = spooled(&run_dir);
        assert!(s <= bound, "spool holds {s} bytes, bound {bound}");
    }
    assert!(
        !processes_with(&mark).is_empty(),
        "the producer finished while the server was frozen: it was not held back"
    );
    assert!(!run_dir.join("result.json").exists());
    server.cont();

    let c = server.wait_terminal(&id, Duration::from_secs(90));
    let inv = &invocations(&c)[0];
    assert_eq!(inv["status"], "Success", "{c}");
    assert_eq!(inv["stdout_bytes"], LEN, "{inv}");
    let msg = inv["message"].as_str().unwrap_or("");
    assert!(msg.to_lowercase().contains("spool"), "message: {msg:?}");
    let out = server.output(&id, &node);
    let line = format!("{mark}\n").into_bytes();
    let expected = line.iter().copied().cycle().take(LEN as usize);
    assert_eq!(out.len() as u64, LEN);
    let first_diff = out.iter().zip(expected).position(|(a, b)| *a != b);
    assert_eq!(first_diff, None, "output differs at byte {first_diff:?}");
}

#[test]
fn a_fast_producer_keeps_memory_bounded() {
    const LEN: u64 = 200_000_000;
    let server = Server::start();
    let agent = Agent::start(&server, "fast", &[]);
    let node = server.node_id("fast");
    let (server_before, agent_before) = (rss(server.pid()), rss(agent.pid()));
    let id = server.send(
        &["--node", &node, "--execution-timeout", "300"],
        &format!("yes | head -c {LEN}"),
    );
    let c = server.wait_terminal(&id, Duration::from_secs(150));
    let inv = &invocations(&c)[0];
    assert_eq!(inv["status"], "Success", "{c}");
    assert_eq!(inv["stdout_bytes"], LEN, "{inv}");
    let (server_after, agent_after) = (rss(server.pid()), rss(agent.pid()));
    eprintln!(
        "VmHWM KiB: server {} -> {}, agent {} -> {}",
        server_before.hwm_kb, server_after.hwm_kb, agent_before.hwm_kb, agent_after.hwm_kb
    );
    let limit_kb = 100 * 1024;
    assert!(
        server_after.hwm_kb - server_before.hwm_kb < limit_kb,
        "server peak RSS grew by {} KiB",
        server_after.hwm_kb - server_before.hwm_kb
    );
    assert!(
        agent_after.hwm_kb - agent_before.hwm_kb < limit_kb,
        "agent peak RSS grew by {} KiB",
        agent_after.hwm_kb - agent_before.hwm_kb
    );

    // Every byte is there: count and check them as they stream, without holding 200 MB.
    let mut child = server
        .cli_cmd(&["output", &id, &node])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fleetrun output");
    let mut out = child.stdout.take().expect("stdout");
    let mut buf = vec![0u8; 1 << 20];
    let (mut total, mut bad) = (0u64, None);
    loop {
        let n = out.read(&mut buf).expect("read output");
        if n == 0 {
            break;
        }
        if bad.is_none()
            && let Some(p) = buf[..n].iter().enumerate().position(|(i, b)| {
                *b != if (total + i as u64).is_multiple_of(2) {
                    b'y'
                } else {
                    b'\n'
                }
            })
        {
            bad = Some(total + p as u64);
        }
        total += n as u64;
    }
    assert!(child.wait().expect("wait").success());
    assert_eq!(total, LEN);
    assert_eq!(bad, None, "output differs at byte {bad:?}");
}
