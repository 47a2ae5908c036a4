//! Issue 5 (security), node identity: an agent proves its node's Ed25519 key over the server's
//! per-connection challenge. Claiming another node's id, or replaying a signature made for another
//! challenge, is refused; keys rotate over the live connection without dropping it, and an old key
//! stops working once the new one is confirmed.

use crate::support::{Agent, AgentOpts, Server, invocations, wait_until};
use fleetrun_agent::identity::{self, Identity};
use fleetrun_proto::NodeId;
use fleetrun_proto::auth::{self, NodeKey};
use fleetrun_proto::channel::{AgentFrame, NodeInfo, ServerFrame};
use fleetrun_proto::version::PROTOCOL_VERSION;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// Opens the agent channel by hand, reads the challenge, and sends a `Hello` for `node_id` with
/// `key`, signed over the challenge or, with `nonce`, over another one. The server's answer.
fn raw_hello(
    server: &Server,
    node_id: &NodeId,
    key: &NodeKey,
    nonce: Option<[u8; 32]>,
) -> ServerFrame {
    raw_session(server, node_id, key, nonce, Vec::new(), |_| true)
        .into_iter()
        .next()
        .expect("an answer")
}

/// [`raw_hello`], then, once welcomed, sends `frames` and collects the server's frames until `done`
/// says enough (within 10 s each). The answer to the Hello comes first.
pub(crate) fn raw_session(
    server: &Server,
    node_id: &NodeId,
    key: &NodeKey,
    nonce: Option<[u8; 32]>,
    frames: Vec<AgentFrame>,
    mut done: impl FnMut(&[ServerFrame]) -> bool,
) -> Vec<ServerFrame> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut ws = dial_channel(server).await.expect("dial the agent channel");
        let ServerFrame::Challenge { nonce: challenge } = next_frame(&mut ws).await else {
            panic!("the server's first frame is not a Challenge");
        };
        let signed = nonce.map_or(challenge, |n| n.to_vec());
        let pk = key.public_key();
        let hello = AgentFrame::Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: node_id.clone(),
            public_key: pk.to_vec(),
            signature: key.sign(&auth::hello_message(node_id, &signed, &pk)),
            info: NodeInfo {
                name: "impostor".into(),
                ..NodeInfo::default()
            },
            known: vec![],
        };
        ws.send(Message::Binary(hello.encode().into()))
            .await
            .expect("send Hello");
        let mut got = vec![next_frame(&mut ws).await];
        if matches!(got[0], ServerFrame::Welcome { .. }) {
            for f in frames {
                ws.send(Message::Binary(f.encode().into()))
                    .await
                    .expect("send a frame");
            }
            while !done(&got) {
                got.push(next_frame(&mut ws).await);
            }
        }
        let _ = ws.close(None).await;
        got
    })
}

/// The server's next frame (skipping pings), within 10 s.
pub(crate) async fn next_frame(ws: &mut Ws) -> ServerFrame {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("an answer within 10 s")
            .expect("an open connection")
            .expect("a message");
        if let Message::Binary(b) = msg {
            return ServerFrame::decode(&b).expect("a server frame");
        }
    }
}

/// Opens the agent channel as an agent does (trusting the server's CA through the agent crate's own
/// TLS set-up): TLS and the WebSocket upgrade done, nothing sent.
pub(crate) async fn dial_channel(server: &Server) -> Result<Ws, String> {
    dial_channel_upgraded(server).await.map(|(ws, _)| ws)
}

/// [`dial_channel`], with the server's upgrade response (its headers name its protocol version).
pub(crate) async fn dial_channel_upgraded(
    server: &Server,
) -> Result<
    (
        Ws,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    String,
> {
    let url = format!(
        "{}/v1/agent/connect",
        server
            .url
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1)
    );
    let mut trust = fleetrun_agent::AgentConfig::new(url.as_str(), server.dir.path());
    trust.ca_cert = server.ca.clone();
    let tls = fleetrun_agent::tls::Tls::new(&trust, &url).map_err(|e| e.to_string())?;
    tokio_tungstenite::connect_async_tls_with_config(
        url.as_str(),
        None,
        false,
        Some(tls.connector()),
    )
    .await
    .map_err(|e| e.to_string())
}

pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(crate) fn load_identity(state_dir: &Path) -> Identity {
    identity::load(state_dir)
        .expect("read identity")
        .expect("an identity")
}

fn error_code(frame: &ServerFrame) -> &str {
    match frame {
        ServerFrame::Error { code, .. } => code,
        other => panic!("expected an Error, got {other:?}"),
    }
}

fn node(server: &Server, name: &str) -> Value {
    server
        .nodes()
        .into_iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

fn audit_results(server: &Server, node: &str, action: &str) -> Vec<String> {
    let v = server
        .cli(&["audit", "--node", node, "--limit", "1000", "-o", "json"])
        .ok()
        .json();
    v.as_array()
        .expect("array")
        .iter()
        .filter(|r| r["action"] == action)
        .filter_map(|r| r["result"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn an_agent_claiming_another_nodes_id_is_refused() {
    let server = Server::start();
    let mut a = Agent::start(&server, "mallory", &[]);
    let _b = Agent::start(&server, "victim", &[]);
    let victim = server.node_id("victim");
    let victim_key = node(&server, "victim")["key_fingerprint"].clone();
    assert!(
        victim_key
            .as_str()
            .is_some_and(|k| k.starts_with("SHA256:")),
        "{victim_key}"
    );

    // Mallory keeps its own key but claims the victim's node id.
    a.kill();
    let path = a.state_dir.join(identity::IDENTITY_FILE);
    let mut file: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    file["node_id"] = Value::String(victim.clone());
    std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
    a.restart();
    let (status, log) = a.wait_exit(Duration::from_secs(20));
    assert!(!status.success(), "agent exited {status}\n{log}");
    assert!(log.contains("BadSignature"), "{log}");
    assert!(log.contains(&format!("not node {victim}'s key")), "{log}");

    // The victim is unaffected: still Online under its own key, and it runs commands.
    let v = node(&server, "victim");
    assert_eq!(v["ping_status"], "Online", "{v}");
    assert_eq!(v["key_fingerprint"], victim_key);
    let id = server.send(&["--node", &victim], "echo still me");
    let c = server.wait_terminal(&id, Duration::from_secs(20));
    assert_eq!(invocations(&c)[0]["status"], "Success", "{c}");
    assert!(
        !server.logs().contains("impostor"),
        "the impostor's info was stored"
    );
    let hellos = audit_results(&server, &victim, "agent.hello");
    assert!(
        hellos
            .iter()
            .any(|r| r == "BadSignature: not the node's key"),
        "{hellos:?}"
    );
}

#[test]
fn a_hello_signed_over_another_challenge_is_refused() {
    let server = Server::start();
    let mut b = Agent::start(&server, "b", &[]);
    let node_id: NodeId = server.node_id("b").parse().unwrap();
    let id = load_identity(&b.state_dir);
    b.kill();
    server.wait_ping("b", "ConnectionLost", Duration::from_secs(15));

    // A signature over another challenge (what a captured Hello would hold) does not verify.
    let answer = raw_hello(&server, &node_id, id.key(), Some([7; 32]));
    assert_eq!(error_code(&answer), "BadSignature", "{answer:?}");
    // A key that is not the node's, signing correctly, is refused too.
    let stranger = identity::generate_key();
    let answer = raw_hello(&server, &node_id, &stranger, None);
    assert_eq!(error_code(&answer), "BadSignature", "{answer:?}");
    // An unknown node id.
    let answer = raw_hello(&server, &NodeId::from_random(1), id.key(), None);
    assert_eq!(error_code(&answer), "UnknownNode", "{answer:?}");
    // The same client with the node's key over this connection's challenge gets in: the refusals
    // above are about the signatures, not the client.
    let answer = raw_hello(&server, &node_id, id.key(), None);
    assert!(matches!(answer, ServerFrame::Welcome { .. }), "{answer:?}");
}

#[test]
fn keys_rotate_without_dropping_the_connection() {
    let server = Server::start();
    let agent = Agent::start_opts(&server, "rot", AgentOpts::args(&["--key-rotation", "1s"]));
    let node_id: NodeId = server.node_id("rot").parse().unwrap();
    let first = load_identity(&agent.state_dir);
    let first_fp = auth::fingerprint(&first.key().public_key());

    // A command runs across the rotations.
    let dir = server.scratch("rot");
    let done = dir.join("go");
    let script = format!(
        "echo before; while [ ! -e '{}' ]; do sleep 0.1; done; echo after",
        done.display()
    );
    let cmd = server.send(&["--node", node_id.as_str()], &script);

    // At least two rotations, seen in the store, while the node stays Online.
    let mut seen = vec![first_fp.clone()];
    wait_until("two key rotations", Duration::from_secs(30), || {
        let n = node(&server, "rot");
        assert_eq!(n["ping_status"], "Online", "{n}\n{}", agent.logs());
        let fp = n["key_fingerprint"].as_str().unwrap_or_default().to_owned();
        if !seen.contains(&fp) {
            seen.push(fp);
        }
        (seen.len() >= 3).then_some(())
    });
    std::fs::write(&done, "").unwrap();
    let c = server.wait_terminal(&cmd, Duration::from_secs(30));
    let inv = &invocations(&c)[0];
    assert_eq!(inv["status"], "Success", "{c}");
    assert_eq!(
        String::from_utf8_lossy(&server.output(&cmd, node_id.as_str())),
        "before\nafter\n"
    );
    let n = node(&server, "rot");
    assert_eq!(n["ping_status"], "Online", "{n}");
    assert!(n["key_rotated_at"].is_string(), "{n}");
    let id = server.send(&["--node", node_id.as_str()], "echo again");
    let c = server.wait_terminal(&id, Duration::from_secs(20));
    assert_eq!(invocations(&c)[0]["status"], "Success", "{c}");

    // One connection all along.
    let log = agent.all_logs();
    assert!(!log.contains("disconnected"), "{log}");
    assert!(log.matches("node key rotated").count() >= 2, "{log}");
    assert!(
        !log.contains(&hex(&first.key().seed())),
        "the private key was logged"
    );

    // The first key is no longer accepted; the agent's current one is.
    let answer = raw_hello(&server, &node_id, first.key(), None);
    assert_eq!(error_code(&answer), "BadSignature", "{answer:?}");
    let rotations = audit_results(&server, node_id.as_str(), "agent.rotate_key");
    assert!(
        rotations.iter().filter(|r| *r == "KeyRotated").count() >= 2,
        "{rotations:?}"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_node_cannot_write_another_nodes_output_or_result() {
    let server = Server::start();
    let mut a = Agent::start(&server, "writer-a", &[]);
    let _b = Agent::start(&server, "writer-b", &[]);
    let (a_id, b_id) = (server.node_id("writer-a"), server.node_id("writer-b"));
    let cmd = server.send(&["--node", &b_id], "echo b-output");
    server.wait_terminal(&cmd, Duration::from_secs(30));

    // Node a, authenticated as itself, sends output and a result for b's command.
    let key = load_identity(&a.state_dir);
    a.kill();
    server.wait_ping("writer-a", "ConnectionLost", Duration::from_secs(15));
    let command_id: fleetrun_proto::CommandId = cmd.parse().expect("command id");
    let stream = fleetrun_proto::channel::StreamId::Output {
        command_id: command_id.clone(),
        pipe: fleetrun_proto::channel::Pipe::Stdout,
    };
    let forged = AgentFrame::Output {
        stream: stream.clone(),
        offset: 0,
        data: b"forged by a\n".to_vec(),
    };
    let finished = AgentFrame::Finished {
        command_id: command_id.clone(),
        result: fleetrun_proto::channel::ExecResult {
            outcome: fleetrun_proto::channel::Outcome::Exited,
            exit_code: 1,
            signal: None,
            started_at_ms: 0,
            finished_at_ms: 0,
            cpu_user_ms: 0,
            cpu_system_ms: 0,
            max_rss_kb: 0,
            stdout_bytes: 12,
            stderr_bytes: 0,
            message: String::new(),
            limits_applied: String::new(),
        },
    };
    let a_node: NodeId = a_id.parse().expect("node id");
    let got = raw_session(
        &server,
        &a_node,
        key.key(),
        None,
        vec![forged, finished],
        |got| {
            got.iter()
                .any(|f| matches!(f, ServerFrame::ResultAck { .. }))
        },
    );
    assert!(matches!(got[0], ServerFrame::Welcome { .. }), "{got:?}");
    // Acknowledged (so a confused agent's spool drains) but stored nowhere: b's output and result
    // are untouched, and a gained no invocation of the command.
    assert!(
        got.iter()
            .any(|f| matches!(f, ServerFrame::Ack { stream: s, offset: 12 } if *s == stream)),
        "{got:?}"
    );
    assert_eq!(server.output(&cmd, &b_id), b"b-output\n");
    let c = server.command(&cmd);
    let invs = invocations(&c);
    assert_eq!(invs.len(), 1, "{c}");
    assert_eq!(
        (invs[0]["node_id"].as_str(), invs[0]["status"].as_str()),
        (Some(b_id.as_str()), Some("Success"))
    );
    assert!(
        !server
            .data_dir
            .join("objects/output")
            .join(&cmd)
            .join(&a_id)
            .exists(),
        "objects were written for node a"
    );
    assert!(
        server.logs().contains("has no invocation of"),
        "the server says why it ignored them"
    );
}

#[test]
fn a_node_id_guessed_at_too_often_is_locked_but_its_neighbours_get_in() {
    let server = Server::start();
    let mut a = Agent::start(&server, "a", &[]);
    let mut b = Agent::start(&server, "b", &[]);
    let a_id: NodeId = server.node_id("a").parse().unwrap();
    let b_id: NodeId = server.node_id("b").parse().unwrap();
    let b_identity = load_identity(&b.state_dir);
    a.kill();
    b.kill();
    server.wait_ping("b", "ConnectionLost", Duration::from_secs(15));

    // Ten guesses at node a's key from this address: each refused for its signature.
    let stranger = identity::generate_key();
    for _ in 0..10 {
        let answer = raw_hello(&server, &a_id, &stranger, None);
        assert_eq!(error_code(&answer), "BadSignature", "{answer:?}");
    }
    // The eleventh is refused before its signature is looked at: node a is locked.
    let answer = raw_hello(&server, &a_id, &stranger, None);
    assert_eq!(
        error_code(&answer),
        "TooManyFailedAuthentications",
        "{answer:?}"
    );
    // Node b, from the same address, with its own key, still gets in.
    let answer = raw_hello(&server, &b_id, b_identity.key(), None);
    assert!(matches!(answer, ServerFrame::Welcome { .. }), "{answer:?}");
}
