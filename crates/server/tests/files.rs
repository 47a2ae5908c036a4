//! The server's side of file transfers, with a scripted agent and real WebSocket clients:
//! `GET /v1/nodes/{node_id}/files/put` and `/files/get`, each one `FilePut` / `FileGet` stream;
//! the trail (`cp.put` / `cp.get`), the `cp` action, old agents and hostile clients.

mod support;

use fleetrun_proto::channel::{AgentFrame, ServerFrame};
use fleetrun_proto::stream::{StreamFd, StreamKind, StreamNo};
use futures_util::SinkExt;
use serde_json::{Value, json};
use std::time::Duration;
use support::{ClientWs, ScriptedAgent, TestServer, next_message, within};
use tokio_tungstenite::tungstenite::Message;

async fn dial(server: &TestServer, path: &str, token: &str) -> Result<ClientWs, (u16, Value)> {
    server
        .dial_ws(path, token)
        .await
        .map_err(|(status, body)| (status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

async fn refused(server: &TestServer, path: &str, token: &str) -> (u16, String) {
    match dial(server, path, token).await {
        Ok(_) => panic!("{path} was upgraded"),
        Err((status, body)) => (
            status,
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ),
    }
}

#[derive(Debug)]
enum Heard {
    Event(Value),
    Bytes(Vec<u8>),
    Closed(Option<u16>),
}

async fn hear(ws: &mut ClientWs) -> Heard {
    match next_message(ws).await {
        Some(Message::Text(t)) => Heard::Event(serde_json::from_str(t.as_str()).expect("JSON")),
        Some(Message::Binary(b)) => Heard::Bytes(b.to_vec()),
        Some(Message::Close(f)) => Heard::Closed(f.map(|f| f.code.into())),
        Some(other) => panic!("unexpected message {other:?}"),
        None => Heard::Closed(None),
    }
}

async fn expect_event(ws: &mut ClientWs, kind: &str) -> Value {
    match hear(ws).await {
        Heard::Event(v) if v["type"] == kind => v,
        other => panic!("expected a {kind} event, got {other:?}"),
    }
}

async fn expect_error(ws: &mut ClientWs, says: &str) {
    let e = expect_event(ws, "error").await;
    let m = e["message"].as_str().unwrap_or_default();
    assert!(m.contains(says), "{m:?} should say {says:?}");
    assert!(matches!(hear(ws).await, Heard::Closed(_)));
}

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

async fn expect_open(agent: &mut ScriptedAgent) -> (StreamNo, StreamKind) {
    agent
        .expect("StreamOpen", |f| match f {
            ServerFrame::StreamOpen { stream, kind, .. } => Some((stream, kind)),
            _ => None,
        })
        .await
}

const SHA: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"; // "hello"

/// A put: the query becomes the stream's kind, the agent's offset reaches the client before
/// its start, the client's bytes and end go to the agent within its credit, the agent's done is
/// the client's (then a normal close), and the trail says who put what where.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_relays_bytes_and_ends_with_the_agents_hash() {
    let server = TestServer::start().await;
    let mut agent = ScriptedAgent::online(&server, "cp-put").await;
    let node = agent.node_id.to_string();
    let path = format!(
        "/v1/nodes/{node}/files/put?path=/opt/f&size=5&sha256={SHA}&mode=0755&owner=root&resume=true"
    );
    let mut ws = dial(&server, &path, &server.token).await.expect("upgrade");
    let (stream, kind) = expect_open(&mut agent).await;
    assert_eq!(
        kind,
        StreamKind::FilePut {
            path: "/opt/f".into(),
            mode: Some(0o755),
            owner: Some("root".into()),
            group: None,
            size: 5,
            sha256: SHA.into(),
            resume: true,
            parents: false,
        }
    );
    agent
        .send(AgentFrame::StreamFileInfo {
            stream,
            offset: 2,
            size: 5,
            mode: 0,
        })
        .await;
    agent
        .send(AgentFrame::StreamCredit { stream, bytes: 2 })
        .await;
    let file = expect_event(&mut ws, "file").await;
    assert_eq!(
        (file["offset"].as_u64(), file["size"].as_u64()),
        (Some(2), Some(5))
    );
    expect_event(&mut ws, "started").await;
    ws.send(Message::Binary(vec![0, b'l', b'l', b'o'].into()))
        .await
        .unwrap();
    ws.send(Message::Text(json!({"type": "eof"}).to_string().into()))
        .await
        .unwrap();
    // Two bytes of credit: the rest waits for more.
    let got = agent
        .expect("StreamData", |f| match f {
            ServerFrame::StreamData { stream: s, bytes } if s == stream => Some(bytes),
            _ => None,
        })
        .await;
    assert_eq!(got, b"ll");
    agent
        .send(AgentFrame::StreamCredit { stream, bytes: 10 })
        .await;
    let got = agent
        .expect("StreamData", |f| match f {
            ServerFrame::StreamData { stream: s, bytes } if s == stream => Some(bytes),
            _ => None,
        })
        .await;
    assert_eq!(got, b"o");
    agent
        .expect("StreamEof", |f| {
            matches!(f, ServerFrame::StreamEof { stream: s } if s == stream).then_some(())
        })
        .await;
    agent
        .send(AgentFrame::StreamFileDone {
            stream,
            sha256: SHA.into(),
        })
        .await;
    agent
        .send(AgentFrame::StreamClose {
            stream,
            error: None,
        })
        .await;
    let done = expect_event(&mut ws, "done").await;
    assert_eq!(done["sha256"], SHA);
    assert!(matches!(hear(&mut ws).await, Heard::Closed(Some(1000))));
    let trail = audited(&server, "cp.put", 1).await;
    let p = &trail[0]["params"];
    assert_eq!(trail[0]["result"], "Done", "{trail:?}");
    assert_eq!(
        (&p["path"], &p["size"], &p["sha256"], &p["mode"]),
        (&json!("/opt/f"), &json!(5), &json!(SHA), &json!("0755")),
        "{p}"
    );
    assert_eq!(p["bytes"], 3, "{p}");
}

/// A get: the agent's size and mode, its bytes (credit granted back as the client takes them)
/// and its hash reach the client; an agent's refusal is the client's error, in the trail too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_relays_info_bytes_and_hash_and_refusals() {
    let server = TestServer::start().await;
    let mut agent = ScriptedAgent::online(&server, "cp-get").await;
    let node = agent.node_id.to_string();
    let mut ws = dial(
        &server,
        &format!("/v1/nodes/{node}/files/get?path=/etc/motd&offset=1"),
        &server.token,
    )
    .await
    .expect("upgrade");
    let (stream, kind) = expect_open(&mut agent).await;
    assert_eq!(
        kind,
        StreamKind::FileGet {
            path: "/etc/motd".into(),
            offset: 1
        }
    );
    agent
        .send(AgentFrame::StreamFileInfo {
            stream,
            offset: 1,
            size: 5,
            mode: 0o640,
        })
        .await;
    agent
        .send(AgentFrame::StreamCredit {
            stream,
            bytes: 1 << 20,
        })
        .await;
    let (fd, bytes) = (StreamFd::Stdout, b"ello".to_vec());
    agent
        .send(AgentFrame::StreamData { stream, fd, bytes })
        .await;
    agent
        .send(AgentFrame::StreamFileDone {
            stream,
            sha256: SHA.into(),
        })
        .await;
    agent
        .send(AgentFrame::StreamClose {
            stream,
            error: None,
        })
        .await;
    let file = expect_event(&mut ws, "file").await;
    assert_eq!(
        (file["size"].as_u64(), file["mode"].as_u64()),
        (Some(5), Some(0o640))
    );
    expect_event(&mut ws, "started").await;
    assert!(matches!(hear(&mut ws).await, Heard::Bytes(b) if b == [&[1u8][..], b"ello"].concat()));
    assert_eq!(expect_event(&mut ws, "done").await["sha256"], SHA);
    let trail = audited(&server, "cp.get", 1).await;
    assert_eq!(trail[0]["result"], "Done", "{trail:?}");
    assert_eq!(trail[0]["params"]["sha256"], SHA);

    // The agent refuses: the client hears why.
    let mut ws = dial(
        &server,
        &format!("/v1/nodes/{node}/files/get?path=/nope"),
        &server.token,
    )
    .await
    .expect("upgrade");
    let (stream, _) = expect_open(&mut agent).await;
    let error = Some("no such file /nope on the node".into());
    agent.send(AgentFrame::StreamClose { stream, error }).await;
    expect_error(&mut ws, "no such file /nope").await;
    let trail = audited(&server, "cp.get", 2).await;
    assert!(
        trail
            .iter()
            .any(|r| r["result"] == "no such file /nope on the node"),
        "{trail:?}"
    );

    // A client that sends bytes on a get breaks it; the agent's stream is hung up.
    let mut ws = dial(
        &server,
        &format!("/v1/nodes/{node}/files/get?path=/x"),
        &server.token,
    )
    .await
    .expect("upgrade");
    let (stream, _) = expect_open(&mut agent).await;
    ws.send(Message::Binary(vec![0, 1].into())).await.unwrap();
    expect_error(&mut ws, "a get takes no bytes").await;
    agent
        .expect("StreamClose", |f| {
            matches!(f, ServerFrame::StreamClose { stream: s, .. } if s == stream).then_some(())
        })
        .await;

    // An agent that closes without its done frame did not finish.
    let mut ws = dial(
        &server,
        &format!("/v1/nodes/{node}/files/get?path=/y"),
        &server.token,
    )
    .await
    .expect("upgrade");
    let (stream, _) = expect_open(&mut agent).await;
    agent
        .send(AgentFrame::StreamClose {
            stream,
            error: None,
        })
        .await;
    expect_error(&mut ws, "without finishing").await;

    // A bad hash from the agent is a protocol error: its connection goes, the client hears it.
    let mut ws = dial(
        &server,
        &format!("/v1/nodes/{node}/files/get?path=/z"),
        &server.token,
    )
    .await
    .expect("upgrade");
    let (stream, _) = expect_open(&mut agent).await;
    agent
        .send(AgentFrame::StreamFileDone {
            stream,
            sha256: "not hex".into(),
        })
        .await;
    expect_error(&mut ws, "agent disconnected").await;
}

/// Bad queries are 400s naming what is wrong; without the `cp` action a 403; a node of an agent
/// older than version 5 a 503 saying so; an offline node a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_are_checked_before_the_upgrade() {
    let server = TestServer::start().await;
    let agent = ScriptedAgent::online(&server, "cp-refuse").await;
    let node = agent.node_id.to_string();
    let put = |q: &str| format!("/v1/nodes/{node}/files/put?{q}");
    for (q, says) in [
        (format!("path=rel&size=1&sha256={SHA}"), "bad path"),
        (format!("path=/a&sha256={SHA}"), "size"),
        (format!("path=/a&size=1&sha256={SHA}&mode=999"), "bad mode"),
        (
            format!("path=/a&size=1&sha256={SHA}&mode=17777"),
            "bad mode",
        ),
        ("path=/a&size=1&sha256=abc".to_owned(), "bad sha256"),
        (format!("path=/a&size=1&sha256={SHA}&owner=-x"), "bad owner"),
        (
            format!("path=/a&size=1&sha256={SHA}&extra=1"),
            "unknown field",
        ),
    ] {
        let (status, m) = refused(&server, &put(&q), &server.token).await;
        assert_eq!(status, 400, "{q}: {m}");
        assert!(m.contains(says), "{q}: {m:?} should say {says:?}");
    }
    let (status, m) = refused(
        &server,
        &format!("/v1/nodes/{node}/files/get?path=%00"),
        &server.token,
    )
    .await;
    assert_eq!(status, 400, "{m}");

    let shell_only = server
        .token_for(
            "sh",
            "none",
            Some(r#"permit (principal, action == Action::"shell", resource is Node);"#),
        )
        .await;
    let (status, m) = refused(
        &server,
        &put(&format!("path=/a&size=1&sha256={SHA}")),
        &shell_only,
    )
    .await;
    assert_eq!(status, 403, "{m}");
    assert!(m.contains("cp"), "{m}");
    let (status, _) = refused(
        &server,
        &format!("/v1/nodes/{node}/files/get?path=/a"),
        &shell_only,
    )
    .await;
    assert_eq!(status, 403);

    let mut old = ScriptedAgent::register(&server, "cp-v4").await;
    old.connect_as_version(&server, &[], fleetrun_proto::version::SHELLS_AND_TCP_SINCE)
        .await;
    let path = format!("/v1/nodes/{}/files/get?path=/a", old.node_id);
    let (status, m) = refused(&server, &path, &server.token).await;
    assert_eq!(status, 503, "{m}");
    assert!(
        m.contains("protocol version 4, without file transfer sessions"),
        "{m}"
    );
    old.disconnect();
    let path = format!(
        "/v1/nodes/{}/files/put?path=/a&size=1&sha256={SHA}",
        old.node_id
    );
    let (status, m) = within("offline", async {
        loop {
            let r = refused(&server, &path, &server.token).await;
            if r.1.contains("not connected") {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(status, 503, "{m}");
    let trail = audited(&server, "cp.put", 1).await;
    assert!(
        trail[0]["result"]
            .as_str()
            .unwrap_or_default()
            .contains("not connected"),
        "{trail:?}"
    );
}
