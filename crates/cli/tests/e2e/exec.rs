//! Issue 11, `fleetrun exec NODE -- CMD`: a live one-shot command through the real server and
//! agent: output as written, stdin piped byte for byte, the remote exit status, SIGTERM leaving
//! nothing on the node, the `shell` action enforced and audited, node names resolved.

use crate::support::{
    Agent, AgentOpts, Server, marker, processes_with, run, run_input, signal, wait_until,
};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

/// Audit records of an action, newest first.
fn audited(server: &Server, action: &str) -> Vec<serde_json::Value> {
    server
        .get_json(&format!("/v1/audit?action={action}"))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn exec_streams_stdout_and_stderr_and_exits_with_the_remote_status() {
    let server = Server::start();
    let _agent = Agent::start(&server, "exec-a", &[]);
    let out = run(
        server.cli_cmd(&["exec", "exec-a", "--", "echo hi; echo err >&2; exit 3"]),
        LIMIT,
    );
    assert_eq!(out.stdout_str(), "hi\n");
    assert!(out.stderr.contains("err\n"), "{}", out.stderr);
    assert_eq!(out.code(), Some(3), "{}", out.stderr);
    // By node id too, and the session's open and end are in the trail.
    let id = server.node_id("exec-a");
    let out = run(server.cli_cmd(&["exec", &id, "--", "true"]), LIMIT);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let ends = wait_until("the end to be audited", LIMIT, || {
        let e = audited(&server, "exec.end");
        (e.len() >= 2).then_some(e)
    });
    let first = ends
        .iter()
        .find(|r| r["result"] == "Exited 3")
        .expect("the first session's end");
    assert_eq!(first["params"]["bytes_out"], 7, "{first}");
    assert_eq!(
        first["params"]["command"], "echo hi; echo err >&2; exit 3",
        "{first}"
    );
    let opens = audited(&server, "exec.open");
    assert_eq!(opens.len(), 2, "{opens:?}");
}

#[test]
fn stdin_is_piped_byte_exact() {
    let server = Server::start();
    let _agent = Agent::start(&server, "exec-stdin", &[]);
    // 4 MiB that no compression or line handling would leave alone: a xorshift stream.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let input: Vec<u8> = (0..4 * 1024 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let out = run_input(
        server.cli_cmd(&["exec", "exec-stdin", "--", "cat"]),
        Some(&input),
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input, "the bytes differ");
    // And as the node saw them.
    let out = run_input(
        server.cli_cmd(&["exec", "exec-stdin", "--", "sha256sum"]),
        Some(&input),
        LIMIT,
    );
    let local = run_input(std::process::Command::new("sha256sum"), Some(&input), LIMIT);
    assert_eq!(out.stdout_str(), local.stdout_str());
}

/// 100 MiB of stdin, from a file (never whole in the test's memory either), arrives whole: the
/// node's SHA-256 of it is the file's.
#[test]
fn a_hundred_mib_of_stdin_arrives_whole() {
    use std::io::Write;
    let server = Server::start();
    let _agent = Agent::start(&server, "exec-big-stdin", &[]);
    let path = server.scratch("exec-big-stdin").join("input");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
    for block in 0..100 {
        file.write_all(&crate::support::noise(1 << 20, block + 1))
            .expect("write");
    }
    file.flush().expect("flush");
    drop(file);
    let cmd = server.cli_cmd(&["exec", "exec-big-stdin", "--", "sha256sum"]);
    let out = crate::support::run_from_file(cmd, &path, Duration::from_secs(240));
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let mut sum = std::process::Command::new("sha256sum");
    sum.arg(&path);
    let local = run(sum, LIMIT);
    let hash = |s: &str| s.split_whitespace().next().unwrap_or_default().to_owned();
    assert_eq!(hash(&out.stdout_str()), hash(&local.stdout_str()));
    assert_eq!(
        hash(&local.stdout_str()).len(),
        64,
        "{}",
        local.stdout_str()
    );
}

#[test]
fn a_slow_loop_streams_its_first_line_before_it_ends() {
    let server = Server::start();
    let _agent = Agent::start(&server, "exec-slow", &[]);
    let gate = server.scratch("exec-slow").join("gate");
    // The second line waits for a file that the test writes only once it has read the first.
    let script = format!(
        "echo first; {}; echo second",
        crate::support::wait_for_file(&gate)
    );
    let mut child = server
        .cli_cmd(&["exec", "exec-slow", "--", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let first = rx.recv_timeout(LIMIT).expect("the first line");
    assert_eq!(first, "first");
    assert!(!gate.exists());
    std::fs::write(&gate, b"").expect("open the gate");
    assert_eq!(rx.recv_timeout(LIMIT).expect("the second line"), "second");
    let status = wait_until("the CLI to exit", LIMIT, || child.try_wait().ok().flatten());
    assert_eq!(status.code(), Some(0));
}

/// The process group of a pid: field 5 of /proc/PID/stat (after the command's parentheses).
fn pgrp(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(2)?.parse().ok()
}

fn group_members(group: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&pid| pgrp(pid) == Some(group))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn sigterm_to_the_cli_leaves_no_process_on_the_node() {
    let server = Server::start();
    let _agent = Agent::start(&server, "exec-term", &[]);
    let mark = marker("exec_term");
    let (mut child, shell) = exec_sleeper(&server, "exec-term", &mark);
    // The shell leads its own group; the sleep is in it.
    wait_until("the sleep to run", LIMIT, || {
        (group_members(shell).len() >= 2).then_some(())
    });
    assert!(!processes_with(&mark).is_empty());
    signal(child.id(), libc::SIGTERM);
    let status = wait_until("the CLI to exit", LIMIT, || child.try_wait().ok().flatten());
    assert_eq!(status.code(), Some(143));
    wait_until("the node's processes to end", LIMIT, || {
        (processes_with(&mark).is_empty() && group_members(shell).is_empty()).then_some(())
    });
    let ends = wait_until("the end to be audited", LIMIT, || {
        let e = audited(&server, "exec.end");
        (!e.is_empty()).then_some(e)
    });
    assert_eq!(ends[0]["result"], "Failed", "{:?}", ends[0]);
}

#[test]
fn a_user_whose_policy_lacks_shell_is_refused_and_audited() {
    let server = Server::start();
    let _agent = Agent::start(&server, "exec-deny", &[]);
    let policy = server.dir.path().join("lister.cedar");
    std::fs::write(
        &policy,
        "permit (principal, action == Action::\"list\", resource);\n",
    )
    .expect("write policy");
    let policy = policy.to_str().expect("utf-8 path");
    server
        .cli(&[
            "users", "create", "lister", "--role", "none", "--policy", policy,
        ])
        .ok();
    let token = server
        .cli(&["tokens", "create", "--user", "lister", "-o", "json"])
        .ok()
        .json()["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let mut cmd = server.cli_cmd(&["exec", "exec-deny", "--", "touch /tmp/never"]);
    cmd.env("FLEETRUN_TOKEN", &token);
    let out = run(cmd, LIMIT);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("AccessDenied"), "{}", out.stderr);
    let refused = wait_until("the refusal to be audited", LIMIT, || {
        audited(&server, "nodes.exec")
            .into_iter()
            .find(|r| r["principal"] == "lister")
    });
    assert_eq!(refused["result"], "403 AccessDenied", "{refused}");
    assert!(audited(&server, "exec.open").is_empty());
}

#[test]
fn unknown_and_ambiguous_node_names_are_errors_naming_candidates() {
    let server = Server::start();
    let twin = |dir: &str| AgentOpts {
        state_name: Some(dir.into()),
        ..AgentOpts::default()
    };
    let _one = Agent::start_opts(&server, "twin", twin("twin-1"));
    let _two = Agent::start_opts(&server, "twin", twin("twin-2"));
    wait_until("both twins online", LIMIT, || {
        let n = server
            .nodes()
            .iter()
            .filter(|n| n["name"] == "twin" && n["ping_status"] == "Online")
            .count();
        (n == 2).then_some(())
    });
    let ids: Vec<String> = server
        .nodes()
        .iter()
        .filter_map(|n| n["node_id"].as_str().map(str::to_owned))
        .collect();
    let out = run(server.cli_cmd(&["exec", "twin", "--", "true"]), LIMIT);
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("2 nodes are named"), "{}", out.stderr);
    for id in &ids {
        assert!(out.stderr.contains(id.as_str()), "{}", out.stderr);
    }
    let out = run(server.cli_cmd(&["exec", "nosuch", "--", "true"]), LIMIT);
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr.contains("no node is named \"nosuch\""),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("twin ("), "{}", out.stderr);
}

/// What a hostile client hears on the exec socket: the error event's message, or "" when the
/// socket layer closed it without one.
async fn hostile_answer(
    url: &str,
    token: &str,
    msg: tokio_tungstenite::tungstenite::Message,
) -> String {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().expect("request");
    let bearer = format!("Bearer {token}").parse().expect("header");
    req.headers_mut().insert("authorization", bearer);
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    let _ = ws.send(msg).await;
    let mut said = String::new();
    // Bounded: the server closes within its first-message timeout at the latest.
    let read = async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Text(t)) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("JSON");
                    assert_eq!(v["type"], "error", "{v}");
                    said = v["message"].as_str().unwrap_or_default().to_owned();
                }
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(LIMIT, read)
        .await
        .expect("the server closes");
    said
}

#[test]
fn hostile_clients_get_a_clear_close_and_the_server_goes_on() {
    use tokio_tungstenite::tungstenite::Message;
    let server = Server::start_with(&["--insecure-http"]);
    let _agent = Agent::start(&server, "exec-hostile", &[]);
    let id = server.node_id("exec-hostile");
    let url = format!(
        "{}/v1/nodes/{id}/exec",
        server.url.replacen("http://", "ws://", 1)
    );
    let cases = [
        (
            Message::Binary(vec![0, 1, 2].into()),
            "first message must be",
        ),
        (Message::Text("{".into()), "bad first message"),
        (
            Message::Text(r#"{"command":"true","shell":"bash"}"#.into()),
            "unknown field",
        ),
        (
            Message::Text(r#"{"command":"true","run_as":"../root"}"#.into()),
            "run-as",
        ),
        // Over the largest client message: the socket layer closes it.
        (Message::Binary(vec![0; 1024 * 1024].into()), ""),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for (msg, says) in cases {
        let said = rt.block_on(hostile_answer(&url, &server.token, msg));
        assert!(said.contains(says), "{said:?} should say {says:?}");
    }
    // Still serving, without a panic.
    let out = run(
        server.cli_cmd(&["exec", "exec-hostile", "--", "echo ok"]),
        LIMIT,
    );
    assert_eq!(out.stdout_str(), "ok\n", "{}", out.stderr);
    assert!(
        !server.all_logs().contains("panicked"),
        "{}",
        server.all_logs()
    );
}

/// `fleetrun sessions` lists a finished exec with its exit code; `sessions terminate` ends a
/// running one: the CLI exits non-zero naming who ended it, and nothing is left on the node.
#[test]
fn sessions_list_finished_execs_and_terminate_ends_a_running_one() {
    let server = Server::start();
    let _agent = Agent::start(&server, "exec-sessions", &[]);
    let out = run(
        server.cli_cmd(&["exec", "exec-sessions", "--", "echo hi; exit 5"]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(5), "{}", out.stderr);
    let listed = server.cli(&["sessions", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed.stdout_str()).expect("JSON");
    let first = &listed.as_array().expect("sessions")[0];
    assert_eq!(first["status"], "Ended", "{first}");
    assert_eq!(first["exit_code"], 5, "{first}");
    assert_eq!(first["bytes_out"], 3, "{first}");
    let table = server.cli(&["sessions"]).stdout_str();
    assert!(
        table.contains("echo hi; exit 5") && table.contains("exited"),
        "{table}"
    );

    let mark = marker("exec_session_terminate");
    let (mut child, shell) = exec_sleeper(&server, "exec-sessions", &mark);
    let active = server.cli(&["sessions", "--active", "-o", "json"]);
    let active: serde_json::Value = serde_json::from_str(&active.stdout_str()).expect("JSON");
    let active = active.as_array().expect("sessions");
    assert_eq!(active.len(), 1, "{active:?}");
    let id = active[0]["session_id"].as_str().expect("id").to_owned();
    let out = server.cli(&["sessions", "terminate", &id]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let status = wait_until("the CLI to exit", LIMIT, || child.try_wait().ok().flatten());
    assert_ne!(status.code(), Some(0));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(stderr.contains("terminated by admin"), "{stderr}");
    wait_until("the node's processes to end", LIMIT, || {
        (processes_with(&mark).is_empty() && group_members(shell).is_empty()).then_some(())
    });
    let shown = server.cli(&["sessions", "show", &id, "-o", "json"]);
    let shown: serde_json::Value = serde_json::from_str(&shown.stdout_str()).expect("JSON");
    assert_eq!(shown["status"], "Terminated", "{shown}");
    assert_eq!(shown["end_reason"], "terminated by admin", "{shown}");
}

/// `fleetrun sessions` follows the pages to the end (each after the last of the one before), or
/// stops at `--limit`; a page size out of range is refused naming the flag.
#[test]
fn sessions_listing_follows_the_pages_and_stops_at_the_limit() {
    let server = Server::start();
    let _agent = Agent::start(&server, "exec-pages", &[]);
    for i in 0..5 {
        let out = run(
            server.cli_cmd(&["exec", "exec-pages", "--", &format!("exit {i}")]),
            LIMIT,
        );
        assert_eq!(out.code(), Some(i), "{}", out.stderr);
    }
    let ids = |v: serde_json::Value| -> Vec<String> {
        v.as_array()
            .expect("sessions")
            .iter()
            .map(|s| s["session_id"].as_str().expect("id").to_owned())
            .collect()
    };
    let every = ids(server.get_json("/v1/sessions?limit=1000"));
    assert_eq!(every.len(), 5, "{every:?}");
    // Pages of 2: three requests, the last one short; same sessions in the same order.
    let paged = ids(server
        .cli(&["sessions", "--page-size", "2", "-o", "json"])
        .ok()
        .json());
    assert_eq!(paged, every);
    // A page that ends exactly at the last session: one more (empty) request, nothing repeated.
    let paged = ids(server
        .cli(&["sessions", "--page-size", "5", "-o", "json"])
        .ok()
        .json());
    assert_eq!(paged, every);
    let first3 = ids(server
        .cli(&["sessions", "--limit", "3", "--page-size", "2", "-o", "json"])
        .ok()
        .json());
    assert_eq!(first3, every[..3]);
    let table = server.cli(&["sessions", "--limit", "1"]).ok().stdout_str();
    assert!(
        table.contains(&every[0]) && !table.contains(&every[1]),
        "{table}"
    );
    for bad in [
        ["--page-size", "0"],
        ["--page-size", "1001"],
        ["--limit", "0"],
    ] {
        let out = server.cli(&["sessions", bad[0], bad[1]]);
        assert_eq!(out.code(), Some(2), "{bad:?}: {}", out.stderr);
        assert!(out.stderr.contains(bad[0]), "{bad:?}: {}", out.stderr);
    }
}

/// Starts `fleetrun exec NODE` of a shell that prints its pid, sleeps 100 s, then prints `mark`;
/// returns the CLI child and the remote shell's pid (the leader of the command's process group).
fn exec_sleeper(server: &Server, node: &str, mark: &str) -> (std::process::Child, u32) {
    let script = format!("echo $$; sleep 100; echo {mark}");
    let mut child = server
        .cli_cmd(&["exec", node, "--", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let shell: u32 = rx
        .recv_timeout(LIMIT)
        .expect("the remote shell's pid")
        .trim()
        .parse()
        .expect("a pid");
    (child, shell)
}
