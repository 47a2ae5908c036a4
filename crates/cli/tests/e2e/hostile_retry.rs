//! Issue 9, retries and reconnects: a send retried with its idempotency key runs once, and
//! `fleetrun output --follow` survives a server restart (kill -9, started again on the same data dir
//! and port) without showing a byte twice or missing one.

use crate::support::{Agent, RawRequest, Server, raw_request, runs, wait_until};
use serde_json::{Value, json};
use std::io::Read;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `POST /v1/commands` with an optional `Idempotency-Key`: (status, replayed header, JSON body).
fn post_send(server: &Server, key: Option<&str>, body: &Value) -> (u16, Option<String>, Value) {
    post_send_as(server, &server.token, key, body)
}

/// [`post_send`] with another bearer token.
fn post_send_as(
    server: &Server,
    token: &str,
    key: Option<&str>,
    body: &Value,
) -> (u16, Option<String>, Value) {
    let mut req = RawRequest::new("POST", "/v1/commands");
    req.headers = vec![
        ("authorization", format!("Bearer {token}")),
        ("content-type", "application/json".into()),
    ];
    if let Some(k) = key {
        req.headers.push(("idempotency-key", k.to_owned()));
    }
    req.body = body.to_string().into_bytes();
    let answer = raw_request(server, req).expect("POST /v1/commands");
    let replayed = answer.header("idempotent-replayed").map(str::to_owned);
    (answer.status, replayed, answer.json())
}

/// What a child printed on one pipe so far.
type Collected = Arc<Mutex<Vec<u8>>>;

/// Spawns `cmd` with no stdin and its stdout and stderr collected as they come.
fn spawn_collected(cmd: &mut std::process::Command, what: &str) -> (Child, Collected, Collected) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let out = collect(child.stdout.take().expect("stdout"));
    let err = collect(child.stderr.take().expect("stderr"));
    (child, out, err)
}

/// A child's pipe read into a shared buffer by a thread, so a test can wait on what it printed.
fn collect(mut pipe: impl Read + Send + 'static) -> Collected {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().expect("lock").extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

fn text(buf: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&buf.lock().expect("lock")).into_owned()
}

/// Waits (bounded) for a child to exit.
fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    wait_until("the CLI to exit", timeout, || {
        child.try_wait().expect("try_wait")
    })
}

fn commands_count(server: &Server) -> usize {
    server
        .get_json("/v1/commands?limit=1000")
        .as_array()
        .map(Vec::len)
        .unwrap_or(0)
}

#[test]
fn same_idempotency_key_twice_makes_one_command_that_runs_once_per_node() {
    let server = Server::start();
    let _a = Agent::start(&server, "idem-a", &[("role", "idem")]);
    let _b = Agent::start(&server, "idem-b", &[("role", "idem")]);
    server.wait_online("idem-a");
    server.wait_online("idem-b");
    let dir = server.scratch("idem");
    let body = json!({
        "targets": "tag:role=idem",
        "commands": [format!("echo run >> '{}/'$FLEETRUN_NODE_ID", dir.display())],
    });

    let (st1, replayed1, first) = post_send(&server, Some("key-1"), &body);
    assert_eq!(st1, 201, "{first}");
    assert_eq!(replayed1, None);
    let (st2, replayed2, second) = post_send(&server, Some("key-1"), &body);
    assert_eq!(st2, 200, "a retry answers the stored command: {second}");
    assert_eq!(replayed2.as_deref(), Some("true"));
    assert_eq!(second["command_id"], first["command_id"]);
    let id = first["command_id"].as_str().expect("command id").to_owned();

    let c = server.wait_terminal(&id, Duration::from_secs(60));
    assert_eq!(c["status"], "Success", "{c}");
    for name in ["idem-a", "idem-b"] {
        let node = server.node_id(name);
        assert_eq!(
            runs(&dir.join(&node)),
            1,
            "{name} ran the script more or less than once"
        );
    }
    // A retry after the command ended is still the same command, and nothing runs again.
    let (st3, _, third) = post_send(&server, Some("key-1"), &body);
    assert_eq!((st3, &third["command_id"]), (200, &first["command_id"]));
    assert_eq!(commands_count(&server), 1, "one command stored");

    // The same key with another body is refused, naming the command it made.
    let other = json!({"targets": "tag:role=idem", "commands": ["echo other"]});
    let (st, _, err) = post_send(&server, Some("key-1"), &other);
    assert_eq!(st, 422, "{err}");
    assert_eq!(err["error"]["code"], "IdempotencyKeyMismatch", "{err}");
    let msg = err["error"]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains(&id) && msg.contains("different request"),
        "{msg}"
    );

    // Bad keys: named, with the limit.
    let (st, _, err) = post_send(&server, Some(&"k".repeat(129)), &body);
    assert_eq!(st, 400, "{err}");
    assert_eq!(err["error"]["code"], "InvalidIdempotencyKey", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("1 to 128"),
        "{err}"
    );
    // A new key is a new command.
    let (st, _, fresh) = post_send(&server, Some("key-2"), &body);
    assert_eq!(st, 201, "{fresh}");
    assert_ne!(fresh["command_id"], first["command_id"]);
    assert_eq!(commands_count(&server), 2);

    // Keys are per principal: another user's same key is its own, a new command.
    let user = server.post_json("/v1/users", &json!({"name": "op2", "role": "operator"}));
    assert_eq!(user.status, 201, "{}", String::from_utf8_lossy(&user.body));
    let token = server.post_json("/v1/tokens", &json!({"name": "op2", "user": "op2"}));
    assert_eq!(
        token.status,
        201,
        "{}",
        String::from_utf8_lossy(&token.body)
    );
    let token = token.json()["token"].as_str().expect("token").to_owned();
    let (st, replayed, theirs) = post_send_as(&server, &token, Some("key-1"), &body);
    assert_eq!((st, replayed), (201, None), "{theirs}");
    assert_ne!(theirs["command_id"], first["command_id"]);
    assert_eq!(commands_count(&server), 3);
}

#[test]
fn cli_send_carries_its_idempotency_key_and_a_resend_with_it_answers_the_same_command() {
    let server = Server::start();
    let _a = Agent::start(&server, "cli-idem", &[]);
    server.wait_online("cli-idem");
    let dir = server.scratch("cli-idem");
    let script = format!("echo run >> '{}/count'", dir.display());
    let id = server.send(
        &["--targets", "all", "--idempotency-key", "cli-key-1"],
        &script,
    );
    // The same key from a plain POST with the same request: the CLI's command, not a new one.
    let (st, _, again) = post_send(
        &server,
        Some("cli-key-1"),
        &json!({"targets": "all", "commands": [script]}),
    );
    assert_eq!(st, 200, "{again}");
    assert_eq!(again["command_id"], id.as_str());
    // And the CLI run again with the key prints the same id.
    let id2 = server.send(
        &["--targets", "all", "--idempotency-key", "cli-key-1"],
        &script,
    );
    assert_eq!(id2, id);
    server.wait_terminal(&id, Duration::from_secs(60));
    assert_eq!(runs(&dir.join("count")), 1);
    assert_eq!(commands_count(&server), 1);
    // Without --idempotency-key every invocation is a new key.
    let id3 = server.send(&["--targets", "all"], &script);
    assert_ne!(id3, id);
    let bad = server.cli(&[
        "send",
        "--targets",
        "all",
        "--idempotency-key",
        "a b",
        "--",
        "x",
    ]);
    assert_eq!(bad.code(), Some(1));
    assert!(bad.stderr.contains("--idempotency-key"), "{}", bad.stderr);
}

#[test]
fn cli_send_retries_while_the_server_is_down_and_succeeds_when_it_is_back() {
    let mut server = Server::start();
    let _a = Agent::start(&server, "retry-a", &[]);
    server.wait_online("retry-a");
    let dir = server.scratch("retry");
    server.kill9();
    let (mut child, out, err) = spawn_collected(
        &mut server.cli_cmd(&[
            "send",
            "--targets",
            "all",
            "--",
            &format!("echo run >> '{}/count'", dir.display()),
        ]),
        "spawn fleetrun send",
    );
    wait_until(
        "the CLI to say it is retrying",
        Duration::from_secs(20),
        || text(&err).contains("retrying").then_some(()),
    );
    server.restart();
    let st = wait_exit(&mut child, Duration::from_secs(60));
    let stderr = text(&err);
    assert!(st.success(), "send failed: {stderr}");
    assert!(stderr.contains("cannot reach server"), "{stderr}");
    assert!(stderr.contains("idempotency key"), "{stderr}");
    let id = text(&out).trim().to_owned();
    let c = server.wait_terminal(&id, Duration::from_secs(60));
    assert_eq!(c["status"], "Success", "{c}");
    assert_eq!(runs(&dir.join("count")), 1);
    assert_eq!(commands_count(&server), 1);
}

#[test]
fn output_follow_survives_a_server_restart_without_dup_or_gap() {
    const LINES: usize = 100;
    let mut server = Server::start();
    let _a = Agent::start(&server, "follow-a", &[]);
    server.wait_online("follow-a");
    let node = server.node_id("follow-a");
    let id = server.send(
        &["--targets", "all"],
        &format!("for i in $(seq {LINES}); do echo \"line $i\"; sleep 0.1; done"),
    );
    let (mut child, out, err) = spawn_collected(
        &mut server.cli_cmd(&["output", "--follow", &id, &node]),
        "spawn fleetrun output --follow",
    );
    wait_until(
        "the follower to show some lines",
        Duration::from_secs(30),
        || (text(&out).lines().count() >= 5).then_some(()),
    );
    server.kill9();
    wait_until("the follower to notice", Duration::from_secs(20), || {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("follower exited with {st} at the kill: {}", text(&err));
        }
        text(&err).contains("reconnecting").then_some(())
    });
    server.restart();
    let st = wait_exit(&mut child, Duration::from_secs(90));
    let stderr = text(&err);
    assert!(st.success(), "follower failed: {stderr}");
    assert!(stderr.contains("connection lost"), "{stderr}");
    let expected: String = (1..=LINES).map(|i| format!("line {i}\n")).collect();
    assert_eq!(text(&out), expected, "follower output (stderr: {stderr})");
    let c = server.wait_terminal(&id, Duration::from_secs(30));
    assert_eq!(c["status"], "Success", "{c}");
}

/// A TCP relay in front of a plain-HTTP server that loses the first answer: it passes the first
/// connection's request on, and when the answer starts it closes that connection instead of passing
/// the answer (the request was stored; the client sees the connection die). Then it waits for
/// `go` before it accepts again, and relays every later connection whole.
fn lossy_proxy(
    upstream: String,
    lost: std::sync::mpsc::Sender<()>,
    go: std::sync::mpsc::Receiver<()>,
) -> String {
    use std::net::{Shutdown, TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let addr = listener.local_addr().expect("proxy addr");
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        });
    };
    std::thread::spawn(move || {
        let Ok((client, _)) = listener.accept() else {
            return;
        };
        let mut up = TcpStream::connect(&upstream).expect("connect upstream");
        pipe(
            client.try_clone().expect("clone"),
            up.try_clone().expect("clone"),
        );
        let mut first = [0u8; 1];
        let _ = up.read(&mut first);
        let _ = client.shutdown(Shutdown::Both);
        let _ = up.shutdown(Shutdown::Both);
        let _ = lost.send(());
        if go.recv().is_err() {
            return;
        }
        for conn in listener.incoming() {
            let Ok(client) = conn else { return };
            let Ok(up) = TcpStream::connect(&upstream) else {
                continue;
            };
            pipe(
                client.try_clone().expect("clone"),
                up.try_clone().expect("clone"),
            );
            pipe(up, client);
        }
    });
    format!("http://{addr}")
}

#[test]
fn cli_send_whose_answer_is_lost_and_server_restarted_runs_once() {
    let mut server = Server::start_with(&["--insecure-http"]);
    let _a = Agent::start(&server, "lost-a", &[]);
    let _b = Agent::start(&server, "lost-b", &[]);
    server.wait_online("lost-a");
    server.wait_online("lost-b");
    let dir = server.scratch("lost");
    let upstream = server
        .url
        .strip_prefix("http://")
        .expect("plain-HTTP server")
        .to_owned();
    let (lost_tx, lost_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    let proxy = lossy_proxy(upstream, lost_tx, go_rx);
    let (mut child, out, err) = spawn_collected(
        server
            .cli_cmd(&[
                "send",
                "--targets",
                "all",
                "--",
                &format!("echo run >> '{}/'$FLEETRUN_NODE_ID", dir.display()),
            ])
            .env("FLEETRUN_SERVER", &proxy),
        "spawn fleetrun send",
    );
    lost_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the first answer to be cut");
    // The first attempt was stored; the CLI did not hear so. Crash the server before the retry.
    assert_eq!(commands_count(&server), 1);
    server.restart();
    go_tx.send(()).expect("proxy alive");
    let st = wait_exit(&mut child, Duration::from_secs(60));
    let stderr = text(&err);
    assert!(st.success(), "send failed: {stderr}");
    assert!(stderr.contains("retrying"), "{stderr}");
    let id = text(&out).trim().to_owned();
    let c = server.wait_terminal(&id, Duration::from_secs(60));
    assert_eq!(c["status"], "Success", "{c}");
    assert_eq!(
        commands_count(&server),
        1,
        "the retry made no second command"
    );
    for name in ["lost-a", "lost-b"] {
        let node = server.node_id(name);
        assert_eq!(
            runs(&dir.join(&node)),
            1,
            "{name} ran more or less than once"
        );
    }
}

#[test]
fn output_offset_skips_served_bytes_masked_or_not() {
    let server = Server::start();
    let _a = Agent::start(&server, "offset-a", &[]);
    let node = server.node_id("offset-a");
    server
        .cli(&["params", "put", "pw", "a-long-secret-value", "--secure"])
        .ok();
    let plain = server.send(&["--targets", "all"], "seq 1 50");
    let masked = server.send(
        &["--targets", "all"],
        "echo start; echo 'pw={{param:pw}} end'; seq 1 20",
    );
    for id in [&plain, &masked] {
        server.wait_terminal(id, Duration::from_secs(30));
        let path = format!("/v1/commands/{id}/invocations/{node}/output/stdout");
        let full = server.get(&path);
        assert_eq!(full.status, 200);
        let full = full.body;
        if id == &masked {
            let text = String::from_utf8_lossy(&full);
            assert!(
                text.contains("pw=**** end") && !text.contains("secret"),
                "{text}"
            );
        }
        let len = full.len();
        for k in [0, 1, 7, 13, len - 1, len, len + 10] {
            let part = server.get(&format!("{path}?offset={k}"));
            assert_eq!(part.status, 200);
            assert_eq!(part.body, full[k.min(len)..].to_vec(), "{id} from byte {k}");
        }
        let bad = server.get(&format!("{path}?offset=-1"));
        assert_eq!(bad.status, 400);
    }
}

#[test]
fn an_idempotency_key_expires_with_its_command() {
    let server = Server::start_with(&["--retention", "2s", "--purge-interval", "1s"]);
    let _a = Agent::start(&server, "expiry-a", &[]);
    server.wait_online("expiry-a");
    let body = json!({"targets": "all", "commands": ["true"]});
    let (st, _, first) = post_send(&server, Some("expiring"), &body);
    assert_eq!(st, 201, "{first}");
    let id = first["command_id"].as_str().expect("id").to_owned();
    server.wait_terminal(&id, Duration::from_secs(30));
    wait_until("the command to be purged", Duration::from_secs(20), || {
        (server.get(&format!("/v1/commands/{id}")).status == 404).then_some(())
    });
    // Purged with its command: the key makes a new command now.
    let (st, replayed, again) = post_send(&server, Some("expiring"), &body);
    assert_eq!((st, replayed), (201, None), "{again}");
    assert_ne!(again["command_id"], first["command_id"]);
}
