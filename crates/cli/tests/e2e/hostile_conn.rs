//! Issue 9 (hardening), connections and the agent channel: clients that never finish a request,
//! hold many connections or silent WebSocket upgrades are closed or refused within the configured
//! bounds, while healthy clients and agents keep being served; a node's frames for commands it has
//! no invocation of leave nothing running behind.
//!
//! The raw clients here are real sockets: std TCP with rustls on top, trusting the server's CA.

use crate::node_identity::{Ws, dial_channel, load_identity, raw_session};
use crate::support::{Agent, RawRequest, Server, invocations, raw_request, wait_until};
use fleetrun_proto::channel::{AgentFrame, Pipe, ServerFrame, StreamId};
use fleetrun_proto::{CommandId, NodeId};
use futures_util::StreamExt;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TCP connection to the server, not yet speaking anything.
fn tcp(server: &Server) -> TcpStream {
    let addr = server
        .url
        .split_once("://")
        .map(|(_, a)| a.to_owned())
        .expect("server url");
    TcpStream::connect(addr).expect("connect to the server")
}

/// A TLS connection to the server (trusting its CA), with the handshake done.
fn tls(server: &Server) -> Tls {
    try_tls(server).expect("TLS handshake")
}

/// [`tls`], or why not.
fn try_tls(server: &Server) -> std::io::Result<Tls> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let pem = std::fs::read(server.ca.as_ref().expect("a TLS server")).expect("read CA");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.expect("CA PEM")).expect("add CA");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name");
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("TLS client");
    let sock = tcp(server);
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut s = rustls::StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

use rustls::pki_types::pem::PemObject;

/// Reads until the server closes the connection or `within` passes: what it sent, and when it
/// closed (None: still open at the deadline).
fn read_until_closed(r: &mut impl ReadTimeout, within: Duration) -> (Vec<u8>, Option<Duration>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.saturating_sub(start.elapsed());
        if left.is_zero() {
            return (got, None);
        }
        r.set_timeout(left);
        match r.read(&mut buf) {
            Ok(0) => return (got, Some(start.elapsed())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            // Reset, or a TLS stream cut without close_notify: closed all the same.
            Err(_) => return (got, Some(start.elapsed())),
        }
    }
}

/// A readable socket whose reads can be bounded.
trait ReadTimeout: Read {
    fn set_timeout(&mut self, t: Duration);
}

impl ReadTimeout for TcpStream {
    fn set_timeout(&mut self, t: Duration) {
        self.set_read_timeout(Some(t.max(Duration::from_millis(1))))
            .expect("read timeout");
    }
}

impl ReadTimeout for Tls {
    fn set_timeout(&mut self, t: Duration) {
        self.sock.set_timeout(t);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `/v1/health` from a client bound to `local` (another loopback address is another source).
fn health_from(server: &Server, local: &str) -> Result<u16, String> {
    let mut req = RawRequest::new("GET", "/v1/health");
    req.local = local.parse().ok();
    req.timeout = Duration::from_secs(10);
    raw_request(server, req).map(|a| a.status)
}

#[test]
fn a_half_request_head_and_an_idle_connection_are_closed_within_the_header_timeout() {
    let server = Server::start_with(&["--header-read-timeout", "1s"]);
    let bound = Duration::from_secs(8);

    // Half a request head, over TLS.
    let mut half = tls(&server);
    half.write_all(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .expect("send half a head");
    half.flush().expect("flush");
    // A TLS connection that never sends a request.
    let mut idle = tls(&server);
    // A TCP connection that never even starts TLS.
    let mut silent = tcp(&server);
    // A kept-alive connection, idle after one answered request.
    let mut kept = tls(&server);
    kept.write_all(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("send a request");
    kept.flush().expect("flush");

    let (_, closed) = read_until_closed(&mut half, bound);
    assert!(closed.is_some(), "a half request head was held open");
    let (_, closed) = read_until_closed(&mut idle, bound);
    assert!(closed.is_some(), "an idle TLS connection was held open");
    let (_, closed) = read_until_closed(&mut silent, bound);
    assert!(closed.is_some(), "a silent TCP connection was held open");
    let (answer, closed) = read_until_closed(&mut kept, bound);
    assert!(
        text(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        text(&answer)
    );
    assert!(
        closed.is_some(),
        "an idle kept-alive connection was held open"
    );

    // The server is unharmed.
    assert_eq!(server.get("/v1/health").status, 200);
}

/// The types of the HTTP/2 frames in `bytes` (whole frames only).
fn h2_frame_types(bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        types.push(rest[3]);
        rest = rest.get(9 + len..).unwrap_or_default();
    }
    types
}

#[test]
fn an_idle_http2_connection_is_closed_within_the_header_timeout() {
    let server = Server::start_with(&["--insecure-http", "--header-read-timeout", "1s"]);
    let bound = Duration::from_secs(8);
    let authority = server.url.trim_start_matches("http://").to_owned();
    let mut conn = tcp(&server);
    // HTTP/2 with prior knowledge: the preface, empty SETTINGS, then one GET /v1/health on stream
    // 1 (HPACK: :method GET, :scheme http, :path and :authority as literals), END_STREAM.
    let mut block = vec![0x82, 0x86, 0x44, 10];
    block.extend_from_slice(b"/v1/health");
    block.extend_from_slice(&[
        0x41,
        u8::try_from(authority.len()).expect("short authority"),
    ]);
    block.extend_from_slice(authority.as_bytes());
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    let len = u32::try_from(block.len())
        .expect("short block")
        .to_be_bytes();
    out.extend_from_slice(&[len[1], len[2], len[3], 0x1, 0x5, 0, 0, 0, 1]);
    out.extend_from_slice(&block);
    conn.write_all(&out).expect("send the request");
    conn.flush().expect("flush");

    // Answered, then (no stream open any more) closed with a GOAWAY after about a second.
    let (got, closed) = read_until_closed(&mut conn, bound);
    let types = h2_frame_types(&got);
    assert!(
        types.contains(&0x1),
        "no HEADERS answer in frames {types:?}"
    );
    assert!(types.contains(&0x7), "no GOAWAY in frames {types:?}");
    assert!(
        closed.is_some(),
        "an idle HTTP/2 connection was held open past {bound:?}"
    );

    // The server is unharmed.
    assert_eq!(server.get("/v1/health").status, 200);
}

#[test]
fn a_body_that_stops_is_answered_408_on_both_apis() {
    let server = Server::start_with(&["--body-read-timeout", "1s"]);
    let bound = Duration::from_secs(8);

    // Native API: a send whose body stops after 10 of 1,000 bytes.
    let mut native = tls(&server);
    let head = format!(
        "POST /v1/commands HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"targets\"",
        server.token
    );
    native.write_all(head.as_bytes()).expect("send");
    native.flush().expect("flush");
    // SSM API: the same, on `POST /`.
    let mut ssm = tls(&server);
    let head = "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Amz-Target: AmazonSSM.ListCommands\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: 1000\r\n\r\n{\"Max";
    ssm.write_all(head.as_bytes()).expect("send");
    ssm.flush().expect("flush");

    let (answer, _) = read_until_closed(&mut native, bound);
    let answer = text(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"));
    assert_eq!(v["error"]["code"], "RequestTimeout", "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("1s") && msg.contains("body read timeout"),
        "{msg}"
    );

    let (answer, _) = read_until_closed(&mut ssm, bound);
    let answer = text(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"));
    assert_eq!(v["__type"], "RequestTimeout", "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("body read timeout")),
        "{v}"
    );
    // Whole bodies are unaffected.
    let nodes = server.http("GET", "/v1/nodes", Some(&server.token), None);
    assert_eq!(nodes.map(|r| r.status), Ok(200));
}

/// One HTTP/1.1 answer read off `conn`: its head and body (by Content-Length).
fn read_answer(conn: &mut Tls) -> (String, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut buf).expect("read an answer");
        assert!(n > 0, "closed before an answer: {}", text(&got));
        got.extend_from_slice(&buf[..n]);
    };
    let head = text(&got[..head_end]);
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().expect("content-length"))
        })
        .expect("a content-length");
    while got.len() < head_end + length {
        let n = conn.read(&mut buf).expect("read the body");
        assert!(n > 0, "closed mid-body: {head}");
        got.extend_from_slice(&buf[..n]);
    }
    (head, got[head_end..head_end + length].to_vec())
}

/// A body over the SSM door's 2 MiB is answered while the client is still sending it, the rest is
/// read and dropped (not reset: a client still writing would get the reset instead of the answer),
/// and the connection then serves the next request.
#[test]
fn an_oversize_body_is_answered_while_it_is_still_coming_and_the_connection_lives_on() {
    let server = Server::start();
    let mut conn = tls(&server);
    let total = 3 * 1024 * 1024;
    let head = format!(
        "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Amz-Target: AmazonSSM.ListCommands\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {total}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).expect("send the head");
    let first = total - 512 * 1024;
    conn.write_all(&vec![b' '; first])
        .expect("send most of the body");
    conn.flush().expect("flush");
    let (head, body) = read_answer(&mut conn);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let v: serde_json::Value = serde_json::from_slice(&body).expect("a JSON error");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("larger than 2097152 bytes")),
        "{v}"
    );
    // The rest goes through, then the same connection answers another request.
    conn.write_all(&vec![b' '; total - first])
        .expect("send the rest of the body (the server reads it)");
    conn.write_all(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("send a second request");
    conn.flush().expect("flush");
    let (head, _) = read_answer(&mut conn);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[test]
fn connections_over_the_per_address_cap_are_refused_while_other_clients_are_served() {
    let server = Server::start_with(&["--max-connections-per-address", "3"]);
    // Wait until the harness's own start-up connections are gone (each one answered and closed).
    let held: Vec<Tls> = wait_until("three held connections", Duration::from_secs(10), || {
        (0..3)
            .map(|_| try_tls(&server).ok())
            .collect::<Option<Vec<Tls>>>()
    });

    // A fourth from the same address is closed at once, before TLS.
    let mut excess = tcp(&server);
    let (_, closed) = read_until_closed(&mut excess, Duration::from_secs(5));
    assert!(closed.is_some(), "the connection over the cap was kept");
    let err = health_from(&server, "127.0.0.1");
    assert!(err.is_err(), "a fourth connection was served: {err:?}");

    // Another source is served all along.
    assert_eq!(health_from(&server, "127.0.0.2"), Ok(200));

    // Once one of the three closes, the address is served again.
    drop(held);
    wait_until(
        "the address to be served again",
        Duration::from_secs(10),
        || (health_from(&server, "127.0.0.1") == Ok(200)).then_some(()),
    );
    assert!(
        server.logs().contains("connection refused"),
        "the refusal is not logged"
    );
}

/// Opens the agent channel (TLS and the WebSocket upgrade done) and sends nothing.
async fn silent_upgrade(server: &Server) -> Result<Ws, String> {
    dial_channel(server).await
}

/// The server frames a connection gets until it closes (or `within` passes: then None).
async fn frames_until_closed(ws: &mut Ws, within: Duration) -> Option<Vec<ServerFrame>> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return None,
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return Some(got),
            Ok(Some(Ok(Message::Binary(b)))) => {
                got.push(ServerFrame::decode(&b).expect("a server frame"))
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

#[test]
fn silent_agent_upgrades_are_closed_at_the_handshake_deadline_and_real_agents_get_in() {
    let server = Server::start_with(&["--max-handshakes", "2", "--agent-handshake-timeout", "2s"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let opened = Instant::now();
    let (mut a, mut b) = rt.block_on(async {
        let a = silent_upgrade(&server).await.expect("first silent upgrade");
        let b = silent_upgrade(&server)
            .await
            .expect("second silent upgrade");
        (a, b)
    });
    // Both slots are taken: a third handshake is told to come back later.
    let third = rt.block_on(silent_upgrade(&server));
    assert!(
        third.as_ref().is_err_and(|e| e.contains("503")),
        "a third handshake was not refused: {:?}",
        third.map(|_| ())
    );
    // A real agent dials meanwhile; it is refused until the silent ones are gone.
    let _agent = Agent::start_with_code(&server, "real", &[], &server.activation_code(&[], 1));

    for ws in [&mut a, &mut b] {
        let frames = rt
            .block_on(frames_until_closed(ws, Duration::from_secs(15)))
            .expect("the silent upgrade to be closed");
        let codes: Vec<&str> = frames
            .iter()
            .filter_map(|f| match f {
                ServerFrame::Error { code, .. } => Some(code.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(codes, ["HandshakeTimeout"], "{frames:?}");
    }
    // Closed at the configured 2 s, well before the old fixed 10 s.
    let took = opened.elapsed();
    assert!(took < Duration::from_secs(8), "closed after {took:?}");
    let node = server.wait_ping("real", "Online", Duration::from_secs(30));
    assert_eq!(node["name"], "real");
}

#[test]
fn handshakes_are_capped_per_address() {
    let server = Server::start_with(&["--max-handshakes-per-address", "1"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let held = rt
        .block_on(silent_upgrade(&server))
        .expect("a silent upgrade");
    let second = rt.block_on(silent_upgrade(&server));
    assert!(
        second.as_ref().is_err_and(|e| e.contains("503")),
        "a second handshake from the address was not refused: {:?}",
        second.map(|_| ())
    );
    // Its slot is given back when it goes.
    drop(held);
    wait_until(
        "a handshake slot for the address",
        Duration::from_secs(10),
        || rt.block_on(silent_upgrade(&server)).ok(),
    );
}

#[test]
fn healthy_agents_outlive_short_http_timeouts() {
    let server = Server::start_with(&["--header-read-timeout", "1s", "--body-read-timeout", "1s"]);
    let agent = Agent::start(&server, "steady", &[]);
    let node = server.node_id("steady");
    // A command that runs past several header timeouts, on the agent's one connection.
    let id = server.send(&["--node", &node], "sleep 3; echo still here");
    let c = server.wait_terminal(&id, Duration::from_secs(30));
    assert_eq!(invocations(&c)[0]["status"], "Success", "{c}");
    assert_eq!(server.output(&id, &node), b"still here\n");
    let n = server.wait_online("steady");
    assert_eq!(n["name"], "steady");
    let log = agent.all_logs();
    assert!(!log.contains("disconnected"), "{log}");
}

#[test]
fn output_for_commands_the_node_has_no_invocation_of_starts_no_actor() {
    let server = Server::start();
    let mut a = Agent::start(&server, "stray", &[]);
    let node: NodeId = server.node_id("stray").parse().expect("node id");
    let key = load_identity(&a.state_dir);
    a.kill();
    server.wait_ping("stray", "ConnectionLost", Duration::from_secs(15));

    // Output for 40 commands the node has none of (two frames each), and a result for 5 of them.
    let ids: Vec<CommandId> = (0..40u128)
        .map(|i| CommandId::from_random(0xdead_0000 + i))
        .collect();
    let mut frames = Vec::new();
    for id in &ids {
        for offset in [0u64, 5] {
            frames.push(AgentFrame::Output {
                stream: StreamId::Output {
                    command_id: id.clone(),
                    pipe: Pipe::Stdout,
                },
                offset,
                data: b"stray".to_vec(),
            });
        }
    }
    let finished = |id: &CommandId| AgentFrame::Finished {
        command_id: id.clone(),
        result: fleetrun_proto::channel::ExecResult {
            outcome: fleetrun_proto::channel::Outcome::Exited,
            exit_code: 0,
            signal: None,
            started_at_ms: 0,
            finished_at_ms: 0,
            cpu_user_ms: 0,
            cpu_system_ms: 0,
            max_rss_kb: 0,
            stdout_bytes: 10,
            stderr_bytes: 0,
            message: String::new(),
            limits_applied: String::new(),
        },
    };
    frames.extend(ids[..5].iter().map(finished));
    let acks = |got: &[ServerFrame]| {
        got.iter()
            .filter(|f| matches!(f, ServerFrame::Ack { .. }))
            .count()
    };
    let result_acks = |got: &[ServerFrame]| {
        got.iter()
            .filter(|f| matches!(f, ServerFrame::ResultAck { .. }))
            .count()
    };
    let got = raw_session(&server, &node, key.key(), None, frames, |got| {
        acks(got) >= 80 && result_acks(got) >= 5
    });
    assert!(matches!(got[0], ServerFrame::Welcome { .. }), "{got:?}");
    // Every frame acknowledged (so a confused agent's spool drains), each at its end.
    assert!(
        got.iter()
            .any(|f| matches!(f, ServerFrame::Ack { offset: 10, .. })),
        "{got:?}"
    );

    // Nothing is left running for them.
    let storage = server.get_json("/v1/storage");
    assert_eq!(storage["live_output_actors"], 0, "{storage}");
    // Said once for the connection (its first such frame, then a count when it ends), not per frame.
    let said = wait_until("the connection's summary", Duration::from_secs(10), || {
        let logs = server.all_logs();
        logs.contains("85 output or result frames")
            .then(|| logs.matches("no invocation of").count())
    });
    assert!(said <= 2, "logged {said} times");
    assert!(
        server.all_logs().contains("for 40 commands"),
        "{}",
        server.logs()
    );
}
