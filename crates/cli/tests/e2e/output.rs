//! `fleetrun output`: byte-exact output (non-UTF-8, large) and `--follow` while a command runs.

use crate::support::{Agent, Server, invocations, wait_until};
use std::io::Read;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn send_and_wait(server: &Server, node: &str, script: &str) -> String {
    let c = server
        .cli(&[
            "send",
            "--node",
            node,
            "--wait",
            "-o",
            "json",
            "--execution-timeout",
            "120",
            "--",
            script,
        ])
        .ok()
        .json();
    c["command_id"].as_str().expect("id").to_owned()
}

#[test]
fn non_utf8_output_is_byte_exact() {
    let server = Server::start();
    let _a = Agent::start(&server, "a", &[]);
    let node = server.wait_online("a")["node_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let id = send_and_wait(
        &server,
        &node,
        r"printf '\377\376\000x'; printf '\200err' >&2",
    );
    let out = server.cli(&["output", &id, &node]).ok();
    assert_eq!(out.stdout, b"\xff\xfe\x00x");
    let out = server.cli(&["output", &id, &node, "--stderr"]).ok();
    assert_eq!(out.stdout, b"\x80err");
}

#[test]
fn large_output_is_byte_exact() {
    const LEN: usize = 30_000_000;
    let server = Server::start();
    let _a = Agent::start(&server, "a", &[]);
    let node = server.wait_online("a")["node_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let id = send_and_wait(&server, &node, &format!("yes abcdefghij | head -c {LEN}"));
    let c = server.command(&id);
    let inv = &invocations(&c)[0];
    assert_eq!(inv["stdout_bytes"], LEN as u64, "{inv}");
    assert_eq!(inv["stdout_truncated"], true);
    assert_eq!(inv["stdout"].as_str().map(str::len), Some(24_000));

    let out = server.cli(&["output", &id, &node]).ok();
    assert_eq!(out.stdout.len(), LEN);
    let expected: Vec<u8> = b"abcdefghij\n".iter().copied().cycle().take(LEN).collect();
    // Compare without dumping 30 MB into the failure message.
    let first_diff = out.stdout.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "output differs at byte {first_diff:?}");
}

#[test]
fn follow_prints_output_before_the_command_ends() {
    let server = Server::start();
    let _a = Agent::start(&server, "a", &[]);
    let node = server.wait_online("a")["node_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let marker = server.scratch("follow").join("go");
    let script = format!(
        "echo first; while [ ! -f '{m}' ]; do sleep 0.05; done; echo second",
        m = marker.display()
    );
    let id = server
        .cli(&[
            "send",
            "--node",
            &node,
            "--execution-timeout",
            "60",
            "--",
            &script,
        ])
        .ok()
        .stdout_str()
        .trim()
        .to_owned();
    wait_until("the invocation to start", Duration::from_secs(15), || {
        let c = server.command(&id);
        (invocations(&c)[0]["status"] == "InProgress").then_some(())
    });

    let mut child = server
        .cli_cmd(&["output", &id, &node, "--follow"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn output --follow");
    let mut stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut got = Vec::new();
    let read_until = |got: &mut Vec<u8>, want: &[u8], what: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !got.windows(want.len()).any(|w| w == want) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(chunk) => got.extend_from_slice(&chunk),
                Err(e) => panic!(
                    "waiting for {what}: {e:?}; got {:?}",
                    String::from_utf8_lossy(got)
                ),
            }
        }
    };
    read_until(&mut got, b"first\n", "the first line");
    // The script is still blocked on the marker, so this output arrived while it ran.
    assert_eq!(invocations(&server.command(&id))[0]["status"], "InProgress");
    std::fs::write(&marker, b"").expect("create marker");
    read_until(&mut got, b"second\n", "the second line");
    let status = wait_until("output --follow to exit", Duration::from_secs(15), || {
        child.try_wait().ok().flatten()
    });
    assert!(status.success(), "output --follow exited with {status}");
    while let Ok(chunk) = rx.recv_timeout(Duration::from_secs(5)) {
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"first\nsecond\n");
    let c = server.wait_terminal(&id, Duration::from_secs(15));
    assert_eq!(c["status"], "Success");
}

/// Output first kept inline (it fits the 24,000-byte copy), then outgrowing it, reads back whole —
/// around the boundary and across a pause that makes the server store the inline part first.
#[test]
fn output_that_outgrows_its_inline_copy_is_byte_exact() {
    let server = Server::start();
    let _a = Agent::start(&server, "a", &[]);
    let node = server.wait_online("a")["node_id"]
        .as_str()
        .expect("id")
        .to_owned();
    for len in [23_999usize, 24_000, 24_001] {
        let id = send_and_wait(
            &server,
            &node,
            &format!("head -c {len} /dev/zero | tr '\\0' x"),
        );
        assert_eq!(server.output(&id, &node), vec![b'x'; len], "{len} bytes");
    }
    // 20,000 bytes, a pause (stored inline meanwhile), then 10,000 more.
    let script =
        "head -c 20000 /dev/zero | tr '\\0' a; sleep 0.5; head -c 10000 /dev/zero | tr '\\0' b";
    let id = send_and_wait(&server, &node, script);
    let mut expected = vec![b'a'; 20_000];
    expected.extend(vec![b'b'; 10_000]);
    assert_eq!(server.output(&id, &node), expected);
    let followed = server.cli(&["output", &id, &node, "--follow"]).ok().stdout;
    assert_eq!(followed, expected, "--follow of an ended invocation");
}
