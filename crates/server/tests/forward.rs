//! The server's side of port forwards, with a scripted agent and real WebSocket clients: the
//! control socket (`GET /v1/nodes/{node_id}/port-forward`) and one data socket per TCP connection
//! (`GET /v1/sessions/{session_id}/tcp`), each its own `Tcp` stream with its own credit; the
//! session's record and trail; authz; terminate; and hostile clients.

mod support;

use fleetrun_proto::channel::{AgentFrame, ServerFrame};
use fleetrun_proto::stream::{StreamFd, StreamKind, StreamNo};
use futures_util::SinkExt;
use serde_json::{Value, json};
use std::time::Duration;
use support::{ClientWs, ScriptedAgent, TestServer, next_message, within};
use tokio_tungstenite::tungstenite::Message;

type Client = ClientWs;

/// Opens a WebSocket on `path` with `token`: the socket, or the refusal's status and body.
async fn dial(server: &TestServer, path: &str, token: &str) -> Result<Client, (u16, Value)> {
    server
        .dial_ws(path, token)
        .await
        .map_err(|(status, body)| (status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

/// A refused upgrade: its status and body.
async fn refused(server: &TestServer, path: &str, token: &str) -> (u16, Value) {
    match dial(server, path, token).await {
        Ok(_) => panic!("{path} was upgraded"),
        Err(refusal) => refusal,
    }
}

#[derive(Debug)]
enum Heard {
    Event(Value),
    Bytes(Vec<u8>),
    /// The close, with its code when one came.
    Closed(Option<u16>),
}

async fn hear(ws: &mut Client) -> Heard {
    match next_message(ws).await {
        Some(Message::Text(t)) => Heard::Event(serde_json::from_str(t.as_str()).expect("JSON")),
        Some(Message::Binary(b)) => Heard::Bytes(b.to_vec()),
        Some(Message::Close(f)) => Heard::Closed(f.map(|f| f.code.into())),
        Some(other) => panic!("unexpected message {other:?}"),
        None => Heard::Closed(None),
    }
}

async fn expect_event(ws: &mut Client, kind: &str) -> Value {
    match hear(ws).await {
        Heard::Event(v) if v["type"] == kind => v,
        other => panic!("expected a {kind} event, got {other:?}"),
    }
}

/// An error event naming `says`, then the close.
async fn expect_error(ws: &mut Client, says: &str) {
    let e = expect_event(ws, "error").await;
    let m = e["message"].as_str().unwrap_or_default();
    assert!(m.contains(says), "{m:?} should say {says:?}");
    assert!(matches!(hear(ws).await, Heard::Closed(_)));
}

/// A forward's control socket, ready: the socket and the session id.
async fn forward(server: &TestServer, node: &str, target: &str, token: &str) -> (Client, String) {
    let path = format!("/v1/nodes/{node}/port-forward?{target}");
    let mut ws = dial(server, &path, token).await.expect("upgrade");
    let ready = expect_event(&mut ws, "ready").await;
    let id = ready["session_id"].as_str().expect("session id").to_owned();
    (ws, id)
}

/// The agent's next `StreamOpen` of a Tcp stream: its number, host and port.
async fn expect_tcp_open(agent: &mut ScriptedAgent) -> (StreamNo, String, u16) {
    agent
        .expect("StreamOpen", |f| match f {
            ServerFrame::StreamOpen {
                stream,
                kind: StreamKind::Tcp { host, port },
                ..
            } => Some((stream, host, port)),
            _ => None,
        })
        .await
}

/// A data socket connected on the node: the socket and its stream's number.
async fn connection(
    server: &TestServer,
    agent: &mut ScriptedAgent,
    id: &str,
    token: &str,
) -> (Client, StreamNo) {
    let mut ws = dial(server, &format!("/v1/sessions/{id}/tcp"), token)
        .await
        .expect("data upgrade");
    let (stream, _, _) = expect_tcp_open(agent).await;
    agent
        .send(AgentFrame::StreamCredit {
            stream,
            bytes: 1 << 20,
        })
        .await;
    expect_event(&mut ws, "started").await;
    (ws, stream)
}

async fn expect_data(agent: &mut ScriptedAgent, stream: StreamNo) -> Vec<u8> {
    agent
        .expect("StreamData", |f| match f {
            ServerFrame::StreamData { stream: s, bytes } if s == stream => Some(bytes),
            _ => None,
        })
        .await
}

async fn expect_close(agent: &mut ScriptedAgent, stream: StreamNo) -> String {
    agent
        .expect("StreamClose", |f| match f {
            ServerFrame::StreamClose { stream: s, reason } if s == stream => Some(reason),
            _ => None,
        })
        .await
}

/// The audit records of `action` on `node`, once there are `n`.
async fn audited(server: &TestServer, action: &str, n: usize) -> Vec<Value> {
    within("the trail", async {
        loop {
            let r = server.get(&format!("/v1/audit?action={action}")).await;
            let r = r.as_array().cloned().unwrap_or_default();
            if r.len() >= n {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// The session's record once it is no longer active.
async fn ended_record(server: &TestServer, id: &str) -> Value {
    within("the session's end", async {
        loop {
            let s = server.get(&format!("/v1/sessions/{id}")).await;
            if s["status"] != "Active" {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// One forward carries two connections at once, each its own stream with its own bytes; half
/// closes go through; the peer's close is a normal close; the session's record and trail count
/// both connections' bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_carries_many_connections_each_its_own_stream() {
    let server = TestServer::start().await;
    let mut agent = ScriptedAgent::online(&server, "fwd-node").await;
    let node = agent.node_id.to_string();
    let (mut control, id) = forward(&server, &node, "port=5432", &server.token).await;
    let s = server.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(
        (&s["kind"], &s["command"], &s["status"]),
        (
            &json!("port-forward"),
            &json!("localhost:5432"),
            &json!("Active")
        ),
        "{s}"
    );
    let (mut a, sa) = connection(&server, &mut agent, &id, &server.token).await;
    let (mut b, sb) = connection(&server, &mut agent, &id, &server.token).await;
    assert_ne!(sa, sb);
    a.send(Message::Binary(b"to a".to_vec().into()))
        .await
        .expect("send");
    b.send(Message::Binary(b"to bb".to_vec().into()))
        .await
        .expect("send");
    // The two sockets race: their frames come in either order.
    let mut got = std::collections::HashMap::new();
    while got.len() < 2 {
        let (stream, bytes) = agent
            .expect("StreamData", |f| match f {
                ServerFrame::StreamData { stream, bytes } => Some((stream, bytes)),
                _ => None,
            })
            .await;
        got.insert(stream, bytes);
    }
    assert_eq!(got[&sa], b"to a");
    assert_eq!(got[&sb], b"to bb");
    for (stream, bytes) in [(sb, &b"from b"[..]), (sa, b"from a!")] {
        let (fd, bytes) = (StreamFd::Stdout, bytes.to_vec());
        agent
            .send(AgentFrame::StreamData { stream, fd, bytes })
            .await;
    }
    assert!(matches!(hear(&mut a).await, Heard::Bytes(x) if x == b"from a!"));
    assert!(matches!(hear(&mut b).await, Heard::Bytes(x) if x == b"from b"));
    // a half-closes: the node's socket gets its end; then the node's peer closes.
    a.send(Message::Text(json!({"type": "eof"}).to_string().into()))
        .await
        .expect("send");
    agent
        .expect("StreamEof", |f| match f {
            ServerFrame::StreamEof { stream } if stream == sa => Some(()),
            _ => None,
        })
        .await;
    agent
        .send(AgentFrame::StreamClose {
            stream: sa,
            error: None,
        })
        .await;
    assert!(matches!(hear(&mut a).await, Heard::Closed(Some(1000))));
    // b's client leaves: its stream is hung up.
    drop(b);
    expect_close(&mut agent, sb).await;
    // The control socket closing ends the session.
    control.close(None).await.expect("close");
    let s = ended_record(&server, &id).await;
    assert_eq!(s["status"], "Ended", "{s}");
    assert_eq!(
        (s["bytes_in"].as_u64(), s["bytes_out"].as_u64()),
        (Some(9), Some(13))
    );
    let open = audited(&server, "port-forward.open", 1).await;
    assert_eq!(open[0]["params"]["session_id"], id.as_str(), "{open:?}");
    let end = audited(&server, "port-forward.end", 1).await;
    let p = &end[0]["params"];
    assert_eq!(p["connections"], 2, "{p}");
    assert_eq!(
        (p["bytes_in"].as_u64(), p["bytes_out"].as_u64()),
        (Some(9), Some(13))
    );
    assert_eq!(p["host"], "localhost", "{p}");
}

/// A connection that fails on the node tells its client why and leaves the session running for
/// the next connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_connection_says_why_and_the_forward_goes_on() {
    let server = TestServer::start().await;
    let mut agent = ScriptedAgent::online(&server, "fwd-fail").await;
    let node = agent.node_id.to_string();
    let (_control, id) = forward(&server, &node, "host=127.0.0.1&port=9", &server.token).await;
    let mut ws = dial(&server, &format!("/v1/sessions/{id}/tcp"), &server.token)
        .await
        .expect("upgrade");
    let (stream, host, port) = expect_tcp_open(&mut agent).await;
    assert_eq!((host.as_str(), port), ("127.0.0.1", 9));
    let error = Some("cannot connect to 127.0.0.1:9: Connection refused (os error 111)".into());
    agent.send(AgentFrame::StreamClose { stream, error }).await;
    expect_error(&mut ws, "cannot connect to 127.0.0.1:9: Connection refused").await;
    let (_ok, _) = connection(&server, &mut agent, &id, &server.token).await;
    assert_eq!(
        server.get(&format!("/v1/sessions/{id}")).await["status"],
        "Active"
    );
}

/// A terminate ends the session and every connection: the agent hangs each stream up, the
/// clients hear why, the record is Terminated; a data socket after the end is not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_ends_the_forward_and_its_connections() {
    let server = TestServer::start().await;
    let mut agent = ScriptedAgent::online(&server, "fwd-term").await;
    let node = agent.node_id.to_string();
    let (mut control, id) = forward(&server, &node, "port=22", &server.token).await;
    let (mut a, sa) = connection(&server, &mut agent, &id, &server.token).await;
    let (mut b, sb) = connection(&server, &mut agent, &id, &server.token).await;
    let path = format!("/v1/sessions/{id}/terminate");
    let (status, _, body) = server.call(reqwest::Method::POST, &path, None, &[]).await;
    assert_eq!(status, 200, "{body}");
    expect_error(&mut control, "terminated by admin").await;
    let mut closed = Vec::new();
    for _ in 0..2 {
        let (stream, _) = agent
            .expect("StreamClose", |f| match f {
                ServerFrame::StreamClose { stream, reason } => Some((stream, reason)),
                _ => None,
            })
            .await;
        closed.push(stream);
    }
    closed.sort();
    assert_eq!(closed, [sa.min(sb), sa.max(sb)]);
    for ws in [&mut a, &mut b] {
        expect_error(ws, "the port-forward session ended").await;
    }
    let s = ended_record(&server, &id).await;
    assert_eq!(
        (&s["status"], &s["end_reason"]),
        (&json!("Terminated"), &json!("terminated by admin"))
    );
    let (status, body) = refused(&server, &format!("/v1/sessions/{id}/tcp"), &server.token).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "SessionNotFound", "{body}");
}

/// No bytes over any connection for the idle timeout ends the session; bytes keep it alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timeout_counts_every_connections_bytes() {
    let server =
        TestServer::start_with(|c| c.session_idle_timeout = Duration::from_millis(600)).await;
    let mut agent = ScriptedAgent::online(&server, "fwd-idle").await;
    let node = agent.node_id.to_string();
    let (mut control, id) = forward(&server, &node, "port=80", &server.token).await;
    let (mut a, sa) = connection(&server, &mut agent, &id, &server.token).await;
    // Bytes every 200 ms for 1.2 s: twice the idle time, and still running.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        a.send(Message::Binary(b"x".to_vec().into()))
            .await
            .expect("send");
        expect_data(&mut agent, sa).await;
    }
    assert_eq!(
        server.get(&format!("/v1/sessions/{id}")).await["status"],
        "Active"
    );
    expect_error(&mut control, "idle timeout").await;
    expect_close(&mut agent, sa).await;
    let s = ended_record(&server, &id).await;
    assert_eq!(s["end_reason"], "idle timeout", "{s}");
}

/// `port-forward` is needed for the node's own ports, `port-forward-remote` too for any other
/// host; each refusal is a 403 in the trail. Another user cannot join a session's connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_need_their_actions_and_sessions_are_their_users_own() {
    let server = TestServer::start().await;
    let agent = ScriptedAgent::online(&server, "fwd-authz").await;
    let node = agent.node_id.to_string();
    let shell_only = server
        .token_for(
            "sh",
            "none",
            Some(r#"permit (principal, action == Action::"shell", resource is Node);"#),
        )
        .await;
    let local_only = server
        .token_for(
            "local",
            "none",
            Some(r#"permit (principal, action == Action::"port-forward", resource is Node);"#),
        )
        .await;
    let path = |target: &str| format!("/v1/nodes/{node}/port-forward?{target}");
    let (status, body) = refused(&server, &path("port=22"), &shell_only).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("port-forward"),
        "{body}"
    );
    for target in [
        "port=22",
        "host=127.0.0.2&port=22",
        "host=::1&port=22",
        "host=%5B::1%5D&port=22",
    ] {
        let (ws, _) = forward(&server, &node, target, &local_only).await;
        drop(ws);
    }
    for target in [
        "host=10.1.2.3&port=22",
        "host=db.internal&port=5432",
        "host=0.0.0.0&port=22",
    ] {
        let (status, body) = refused(&server, &path(target), &local_only).await;
        assert_eq!(status, 403, "{target}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("port-forward-remote"),
            "{body}"
        );
    }
    let refusals = audited(&server, "nodes.port-forward", 8).await;
    let denied = refusals
        .iter()
        .filter(|r| r["result"].as_str().unwrap_or_default().contains("403"))
        .count();
    assert_eq!(denied, 4, "{refusals:?}");
    // The admin's session is not the other user's to join: not found, as one that does not exist.
    let (_control, id) = forward(&server, &node, "port=22", &server.token).await;
    for (sid, token) in [
        (id.as_str(), &local_only),
        ("no-such-session", &server.token),
    ] {
        let (status, body) = refused(&server, &format!("/v1/sessions/{sid}/tcp"), token).await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"]["code"], "SessionNotFound", "{body}");
    }
    // Sessions are seen on the nodes one may open a shell or a forward on: a user with only
    // `port-forward` sees the forwards of its nodes (and may show one).
    let (status, _, list) = server
        .call_as(&local_only, reqwest::Method::GET, "/v1/sessions", None, &[])
        .await;
    assert_eq!(status, 200, "{list}");
    let ids: Vec<&str> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["session_id"].as_str())
        .collect();
    assert!(ids.contains(&id.as_str()), "{list}");
    let (status, _, one) = server
        .call_as(
            &local_only,
            reqwest::Method::GET,
            &format!("/v1/sessions/{id}"),
            None,
            &[],
        )
        .await;
    assert_eq!(
        (status, one["kind"].as_str()),
        (200, Some("port-forward")),
        "{one}"
    );
}

/// Bad targets are 400s naming what is wrong; hostile clients on either socket get a clear
/// close; the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_forward_clients_get_a_clear_refusal() {
    let server = TestServer::start().await;
    let mut agent = ScriptedAgent::online(&server, "fwd-hostile").await;
    let node = agent.node_id.to_string();
    let long = "h".repeat(300);
    for (target, says) in [
        ("port=0", "port 0"),
        ("", "port"),
        ("port=70000", "port"),
        ("port=22&host=", "bad host"),
        (&format!("port=22&host={long}") as &str, "bad host"),
        ("port=22&bogus=1", "bogus"),
    ] {
        let path = format!("/v1/nodes/{node}/port-forward?{target}");
        let (status, body) = refused(&server, &path, &server.token).await;
        assert_eq!(status, 400, "{target}: {body}");
        let m = body["error"]["message"].as_str().unwrap_or_default();
        assert!(m.contains(says), "{target}: {m}");
    }
    // The control socket takes no messages.
    let (mut control, _) = forward(&server, &node, "port=22", &server.token).await;
    control
        .send(Message::Text("hello".into()))
        .await
        .expect("send");
    expect_error(&mut control, "carries no messages").await;

    let (_control, id) = forward(&server, &node, "port=22", &server.token).await;
    // A bad text message, data after the end of input, an oversize message.
    let (mut ws, stream) = connection(&server, &mut agent, &id, &server.token).await;
    ws.send(Message::Text("{\"type\":\"nope\"}".into()))
        .await
        .expect("send");
    expect_error(&mut ws, "bad message").await;
    expect_close(&mut agent, stream).await;
    let (mut ws, stream) = connection(&server, &mut agent, &id, &server.token).await;
    ws.send(Message::Text(json!({"type": "eof"}).to_string().into()))
        .await
        .expect("send");
    ws.send(Message::Binary(b"more".to_vec().into()))
        .await
        .expect("send");
    expect_error(&mut ws, "after the client's end").await;
    expect_close(&mut agent, stream).await;
    let (mut ws, stream) = connection(&server, &mut agent, &id, &server.token).await;
    let big = vec![0u8; fleetrun_proto::forward::DATA_MESSAGE_MAX + 1];
    let _ = ws.send(Message::Binary(big.into())).await;
    match hear(&mut ws).await {
        Heard::Event(e) => {
            let m = e["message"].as_str().unwrap_or_default();
            assert!(m.contains("bad message"), "{m}");
        }
        Heard::Closed(_) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
    expect_close(&mut agent, stream).await;
    // A full message is fine, and sent within the agent's credit.
    let (mut ws, stream) = connection(&server, &mut agent, &id, &server.token).await;
    let full = vec![7u8; fleetrun_proto::forward::DATA_MESSAGE_MAX];
    ws.send(Message::Binary(full.clone().into()))
        .await
        .expect("send");
    assert_eq!(expect_data(&mut agent, stream).await, full);
    // Still serving.
    server.get("/v1/nodes").await;
}

/// A node whose agent has no Tcp streams (protocol version 3) is refused before the upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_tcp_streams_is_not_asked_for_one() {
    let server = TestServer::start().await;
    let mut agent = ScriptedAgent::register(&server, "v3-fwd").await;
    agent
        .connect_as_version(&server, &[], fleetrun_proto::version::STREAMS_SINCE)
        .await;
    let path = format!("/v1/nodes/{}/port-forward?port=22", agent.node_id);
    let (status, body) = refused(&server, &path, &server.token).await;
    assert_eq!(status, 503, "{body}");
    let m = body["error"]["message"].as_str().unwrap_or_default();
    assert!(m.contains("without tcp sessions"), "{m}");
    // The attempt is a Failed record naming why; so is one to a node not connected.
    let store = server.store().await;
    let listed = store
        .list_sessions(false, None, None, 10)
        .await
        .expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    let s = &listed[0];
    assert_eq!(
        (s.status, s.kind.as_str(), s.command.as_str()),
        (
            fleetrun_proto::api::SessionStatus::Failed,
            "port-forward",
            "localhost:22"
        )
    );
    assert!(s.end_reason.contains("without tcp sessions"), "{s:?}");
    let offline = ScriptedAgent::register(&server, "offline-fwd").await;
    let path = format!("/v1/nodes/{}/port-forward?port=5432", offline.node_id);
    let (status, body) = refused(&server, &path, &server.token).await;
    assert_eq!(status, 503, "{body}");
    let listed = store
        .list_sessions(false, None, None, 10)
        .await
        .expect("list");
    let s = listed
        .iter()
        .find(|s| s.node_id == offline.node_id)
        .expect("a record of the attempt");
    assert_eq!(s.status, fleetrun_proto::api::SessionStatus::Failed);
    assert!(s.end_reason.contains("is not connected"), "{s:?}");
    // An unknown node is no record.
    let path = format!(
        "/v1/nodes/{}/port-forward?port=22",
        fleetrun_proto::NodeId::from_random(9)
    );
    assert_eq!(refused(&server, &path, &server.token).await.0, 404);
    assert_eq!(
        store
            .list_sessions(false, None, None, 10)
            .await
            .expect("list")
            .len(),
        2
    );
}
