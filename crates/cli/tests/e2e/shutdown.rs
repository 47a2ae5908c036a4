//! Issue 10, shutdown order: SIGTERM to a real `fleetrun server` stops it cleanly (exit 0, within a
//! bound), what was accepted just before is in the database after a restart and runs, a request
//! in flight when the signal comes is answered before the process exits, and a long poll (a
//! command's watch) is ended rather than waited for; a request outlasting the grace period makes
//! the exit code 1.

use crate::support::{Agent, Server, wait_until};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// How long a clean shutdown may take here (the grace period is 30 s; nothing should need it).
const EXIT_BOUND: Duration = Duration::from_secs(20);

#[test]
fn sigterm_exits_0_and_a_command_accepted_just_before_survives_the_restart() {
    let mut server = Server::start();
    let _agent = Agent::start(&server, "term-1", &[("role", "term")]);
    server.wait_online("term-1");
    let id = server.send(
        &["--targets", "tag:role=term"],
        "sleep 1; echo after-restart",
    );

    let (status, took) = server.terminate(EXIT_BOUND);
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(took < EXIT_BOUND, "shutdown took {took:?}");
    let logs = server.all_logs();
    assert!(logs.contains("shut down"), "no shutdown line in:\n{logs}");

    server.start_again();
    let c = server.command(&id);
    assert_eq!(c["command_id"], id.as_str(), "{c}");
    // The agent reconnects to the restarted server, and the command ends as it would have.
    let c = server.wait_terminal(&id, Duration::from_secs(60));
    assert_eq!(c["status"], "Success", "{c}");
    let node = server.node_id("term-1");
    assert_eq!(server.output(&id, &node), b"after-restart\n");
}

#[test]
fn a_request_in_flight_at_sigterm_is_answered_and_a_watch_is_ended() {
    // A grace far longer than the bound below: the watch must not hold the shutdown.
    let mut server = Server::start_with(&["--insecure-http", "--shutdown-grace", "120s"]);
    let _agent = Agent::start(&server, "term-2", &[]);
    server.wait_online("term-2");
    let addr = server
        .url
        .strip_prefix("http://")
        .expect("plain HTTP url")
        .to_owned();
    let long = server.send(&["--targets", "all"], "sleep 120");
    let mut watch = TcpStream::connect(&addr).expect("connect");
    write!(
        watch,
        "GET /v1/commands/{long}/watch HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
        server.token
    )
    .expect("send the watch request");
    watch
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut head = [0u8; 12];
    watch.read_exact(&mut head).expect("read the watch answer");
    assert_eq!(&head, b"HTTP/1.1 200", "{}", String::from_utf8_lossy(&head));
    let body = br#"{"targets": "all", "commands": ["true"]}"#;
    let mut conn = TcpStream::connect(&addr).expect("connect");
    // `Expect: 100-continue`: the server says when the handler starts reading the body, so the
    // signal below comes while the request is certainly in progress.
    write!(
        conn,
        "POST /v1/commands HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        server.token,
        body.len()
    )
    .expect("send the head");
    conn.flush().expect("flush");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut interim = Vec::new();
    let mut byte = [0u8; 1];
    while !interim.ends_with(b"\r\n\r\n") {
        let n = conn.read(&mut byte).expect("read the interim answer");
        assert_eq!(n, 1, "closed before 100 Continue: {interim:?}");
        interim.push(byte[0]);
    }
    assert!(
        interim.starts_with(b"HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&interim)
    );

    let pid = server.pid();
    crate::support::signal(pid, libc::SIGTERM);
    // The listener closes first: new connections are refused while the request is still open.
    wait_until(
        "the server to stop accepting",
        Duration::from_secs(10),
        || TcpStream::connect(&addr).is_err().then_some(()),
    );
    conn.write_all(body).expect("send the body");
    conn.flush().expect("flush");
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 201"), "answer: {answer}");
    let id = answer
        .split("\"command_id\":\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("no command id in {answer}"))
        .to_owned();

    let (status, took) = server.terminate_wait(EXIT_BOUND);
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(took < EXIT_BOUND, "shutdown took {took:?}");
    // The watch was ended with its last chunk, not cut.
    let mut rest = Vec::new();
    let _ = watch.read_to_end(&mut rest);
    assert!(
        rest.ends_with(b"0\r\n\r\n"),
        "watch did not end cleanly: {}",
        String::from_utf8_lossy(&rest)
    );
    server.start_again();
    assert_eq!(server.command(&id)["command_id"], id.as_str());
}

#[test]
fn a_request_that_outlasts_the_grace_makes_the_exit_code_1() {
    let mut server = Server::start_with(&["--insecure-http", "--shutdown-grace", "1s"]);
    let addr = server
        .url
        .strip_prefix("http://")
        .expect("plain HTTP url")
        .to_owned();
    // A body announced and never sent: the request stays in progress (the body deadline is 60 s).
    let mut conn = TcpStream::connect(&addr).expect("connect");
    write!(
        conn,
        "POST /v1/commands HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n",
        server.token
    )
    .expect("send the head");
    conn.flush().expect("flush");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut interim = [0u8; 12];
    conn.read_exact(&mut interim).expect("read 100 Continue");
    assert_eq!(
        &interim,
        b"HTTP/1.1 100",
        "{}",
        String::from_utf8_lossy(&interim)
    );

    let (status, took) = server.terminate(EXIT_BOUND);
    assert_eq!(status.code(), Some(1), "exit status {status}");
    assert!(took < EXIT_BOUND, "shutdown took {took:?}");
    let logs = server.all_logs();
    assert!(
        logs.contains("requests still in progress at the end of the grace period"),
        "{logs}"
    );
    // The data dir is intact: the server starts again on it.
    server.start_again();
    assert_eq!(server.get("/v1/health").status, 200);
}
