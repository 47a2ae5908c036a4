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

/// Opens a put's stream on the scripted agent (offset 0, `credit` bytes) and waits for the
/// client's start.
async fn start_put(agent: &mut ScriptedAgent, ws: &mut ClientWs, credit: u64) -> StreamNo {
    let (stream, _) = expect_open(agent).await;
    agent
        .send(AgentFrame::StreamFileInfo {
            stream,
            offset: 0,
            size: 5,
            mode: 0,
        })
        .await;
    agent
        .send(AgentFrame::StreamCredit {
            stream,
            bytes: credit,
        })
        .await;
    expect_event(ws, "file").await;
    expect_event(ws, "started").await;
    stream
}

const KEY: &str = "0123456789abcdef";

/// A put with `key=` (protocol version 6): the client sends at once and ends with the trailer,
/// which reaches the agent as the stream's last 32 bytes (the raw SHA-256) before its end; the
/// trail has the agent's hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_put_hands_the_trailers_hash_to_the_agent_after_the_bytes() {
    let server = TestServer::start().await;
    let mut agent = ScriptedAgent::online(&server, "cp-trailer").await;
    let node = agent.node_id.to_string();
    let path = format!("/v1/nodes/{node}/files/put?path=/opt/f&size=5&key={KEY}&resume=true");
    let mut ws = dial(&server, &path, &server.token).await.expect("upgrade");
    let (stream, kind) = {
        let (stream, kind) = expect_open(&mut agent).await;
        agent
            .send(AgentFrame::StreamFileInfo {
                stream,
                offset: 0,
                size: 5,
                mode: 0,
            })
            .await;
        agent
            .send(AgentFrame::StreamCredit { stream, bytes: 100 })
            .await;
        (stream, kind)
    };
    assert!(
        matches!(&kind, StreamKind::FilePut { sha256, size: 5, resume: true, .. } if sha256 == KEY),
        "{kind:?}"
    );
    expect_event(&mut ws, "file").await;
    expect_event(&mut ws, "started").await;
    ws.send(Message::Binary(b"\0hello".to_vec().into()))
        .await
        .unwrap();
    let end = json!({"type": "end", "size": 5, "sha256": SHA});
    ws.send(Message::Text(end.to_string().into()))
        .await
        .unwrap();
    for want in [b"hello".to_vec(), hex::decode(SHA).unwrap()] {
        let got = agent
            .expect("StreamData", |f| match f {
                ServerFrame::StreamData { stream: s, bytes } if s == stream => Some(bytes),
                _ => None,
            })
            .await;
        assert_eq!(got, want);
    }
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
    assert_eq!(expect_event(&mut ws, "done").await["sha256"], SHA);
    let trail = audited(&server, "cp.put", 1).await;
    let p = &trail[0]["params"];
    assert_eq!(trail[0]["result"], "Done", "{trail:?}");
    assert_eq!((&p["sha256"], &p["key"]), (&json!(SHA), &json!(KEY)), "{p}");
}

/// A keyed put's hostile ends: a trailer whose size is not the declared one, or not what was
/// sent; a bad hash in it; the plain end without a trailer; bytes after it; a trailer on a put
/// that named its hash. Each is the client's error and hangs the stream up (the agent renames
/// nothing); bad or missing keys are refused before the upgrade, and an agent of version 5 (no
/// trailers) is refused a keyed put, naming `sha256=`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_trailers_are_refused_and_hang_the_put_up() {
    let server = TestServer::start().await;
    let mut agent = ScriptedAgent::online(&server, "cp-bad-trailer").await;
    let node = agent.node_id.to_string();
    let keyed = format!("/v1/nodes/{node}/files/put?path=/opt/f&size=5&key={KEY}");
    let hashed = format!("/v1/nodes/{node}/files/put?path=/opt/f&size=5&sha256={SHA}");
    let end = |size: u64, sha: &str| {
        Message::Text(
            json!({"type": "end", "size": size, "sha256": sha})
                .to_string()
                .into(),
        )
    };
    let cases: Vec<(&str, Vec<Message>, &str)> = vec![
        (
            &keyed,
            vec![Message::Binary(b"\0hello".to_vec().into()), end(6, SHA)],
            "size 6, but the put declared 5",
        ),
        (
            &keyed,
            vec![Message::Binary(b"\0hel".to_vec().into()), end(5, SHA)],
            "but 3 bytes were sent",
        ),
        (
            &keyed,
            vec![Message::Binary(b"\0hello".to_vec().into()), end(5, "abc")],
            "bad trailer: bad sha256",
        ),
        (
            &keyed,
            vec![
                Message::Binary(b"\0hello".to_vec().into()),
                Message::Text(json!({"type": "eof"}).to_string().into()),
            ],
            "without its trailer",
        ),
        (
            &keyed,
            vec![
                Message::Binary(b"\0hello".to_vec().into()),
                end(5, SHA),
                Message::Binary(b"\0x".to_vec().into()),
            ],
            "after their end",
        ),
        (
            &hashed,
            vec![Message::Binary(b"\0hello".to_vec().into()), end(5, SHA)],
            "not a trailer",
        ),
    ];
    for (path, msgs, says) in cases {
        let mut ws = dial(&server, path, &server.token).await.expect("upgrade");
        // Little credit: the bytes after the trailer reach the relay while it still holds them.
        let stream = start_put(&mut agent, &mut ws, 100).await;
        for m in msgs {
            ws.send(m).await.unwrap();
        }
        expect_error(&mut ws, says).await;
        // Hung up, never ended: the agent renames nothing. (Bytes after a good trailer come
        // after the end went: the agent's own check of its trailer stands.)
        let mut ended = false;
        let why = loop {
            let heard = agent
                .expect("StreamClose", |f| match f {
                    ServerFrame::StreamClose { stream: s, reason } if s == stream => {
                        Some(Some(reason))
                    }
                    ServerFrame::StreamEof { stream: s } if s == stream => Some(None),
                    _ => None,
                })
                .await;
            match heard {
                Some(why) => break why,
                None => ended = true,
            }
        };
        assert!(why.contains(says), "{says}: the agent heard {why:?}");
        assert_eq!(ended, says == "after their end", "{says}");
        agent
            .send(AgentFrame::StreamClose {
                stream,
                error: None,
            })
            .await;
    }
    // The client goes without a trailer: a hang-up, never an end (the agent keeps its temp
    // file for a resume and renames nothing); the trail says the client left.
    let mut ws = dial(&server, &keyed, &server.token).await.expect("upgrade");
    let stream = start_put(&mut agent, &mut ws, 100).await;
    ws.send(Message::Binary(b"\0hello".to_vec().into()))
        .await
        .unwrap();
    ws.close(None).await.unwrap();
    let heard = agent
        .expect("StreamClose", |f| match f {
            ServerFrame::StreamClose { stream: s, reason } if s == stream => Some(Some(reason)),
            ServerFrame::StreamEof { stream: s } if s == stream => Some(None),
            _ => None,
        })
        .await;
    assert_eq!(heard.as_deref(), Some("the client left"));
    agent
        .send(AgentFrame::StreamClose {
            stream,
            error: None,
        })
        .await;
    let put = |q: &str| format!("/v1/nodes/{node}/files/put?path=/opt/f&size=5{q}");
    for (q, says) in [
        ("", "needs one of sha256= "),
        (
            &format!("&key={KEY}&sha256={SHA}")[..],
            "needs one of sha256= ",
        ),
        ("&key=0123", "bad key"),
        ("&key=0123456789ABCDEF", "bad key"),
    ] {
        let (status, m) = refused(&server, &put(q), &server.token).await;
        assert_eq!(status, 400, "{q}: {m}");
        assert!(m.contains(says), "{q}: {m:?} should say {says:?}");
    }
    let mut old = ScriptedAgent::register(&server, "cp-v5").await;
    old.connect_as_version(&server, &[], fleetrun_proto::version::FILES_SINCE)
        .await;
    let path = format!(
        "/v1/nodes/{}/files/put?path=/a&size=1&key={KEY}",
        old.node_id
    );
    let (status, m) = refused(&server, &path, &server.token).await;
    assert_eq!(status, 503, "{m}");
    assert!(
        m.contains("protocol version 5") && m.contains("sha256="),
        "{m}"
    );
}

/// A list: the query becomes a `FileList` stream, the agent's records reach the client as
/// stdout bytes, its exit 0 is the client's (then a normal close), the trail says `cp.list`.
/// Bad paths are 400s before the upgrade, no `cp` a 403, an agent before version 6 a 503
/// naming its version, and bytes from the client hang the list up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_relays_the_agents_records_and_refusals() {
    let server = TestServer::start().await;
    let mut agent = ScriptedAgent::online(&server, "cp-list").await;
    let node = agent.node_id.to_string();
    let list = |q: &str| format!("/v1/nodes/{node}/files/list?{q}");
    let mut ws = dial(&server, &list("path=/var/log/app"), &server.token)
        .await
        .expect("upgrade");
    let (stream, kind) = expect_open(&mut agent).await;
    assert_eq!(
        kind,
        StreamKind::FileList {
            path: "/var/log/app".into()
        }
    );
    agent
        .send(AgentFrame::StreamCredit {
            stream,
            bytes: 1 << 20,
        })
        .await;
    let records = b"fa.txt\0dsub\0fsub/b\0lout\0".to_vec();
    agent
        .send(AgentFrame::StreamData {
            stream,
            fd: StreamFd::Stdout,
            bytes: records.clone(),
        })
        .await;
    agent
        .send(AgentFrame::StreamExit {
            stream,
            code: 0,
            signal: None,
        })
        .await;
    agent
        .send(AgentFrame::StreamClose {
            stream,
            error: None,
        })
        .await;
    expect_event(&mut ws, "started").await;
    assert!(matches!(hear(&mut ws).await, Heard::Bytes(b) if b == [&[1u8][..], &records].concat()));
    assert_eq!(expect_event(&mut ws, "exit").await["code"], 0);
    assert!(matches!(hear(&mut ws).await, Heard::Closed(Some(1000))));
    let trail = audited(&server, "cp.list", 1).await;
    assert_eq!(trail[0]["result"], "Done", "{trail:?}");
    assert_eq!(trail[0]["params"]["path"], "/var/log/app");
    assert_eq!(trail[0]["params"]["bytes"], records.len());

    // The agent refuses (a missing directory): the client hears why, the trail has it.
    let mut ws = dial(&server, &list("path=/nope"), &server.token)
        .await
        .expect("upgrade");
    let (stream, _) = expect_open(&mut agent).await;
    let error = Some("no directory /nope on the node".into());
    agent.send(AgentFrame::StreamClose { stream, error }).await;
    expect_error(&mut ws, "no directory /nope on the node").await;
    let trail = audited(&server, "cp.list", 2).await;
    assert!(
        trail
            .iter()
            .any(|r| r["result"] == "no directory /nope on the node"),
        "{trail:?}"
    );

    // An agent that closes without its exit did not finish.
    let mut ws = dial(&server, &list("path=/x"), &server.token)
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

    // Bytes from the client break the list; the agent's stream is hung up.
    let mut ws = dial(&server, &list("path=/y"), &server.token)
        .await
        .expect("upgrade");
    let (stream, _) = expect_open(&mut agent).await;
    ws.send(Message::Binary(vec![0, 1].into())).await.unwrap();
    expect_error(&mut ws, "a list takes no bytes").await;
    agent
        .expect("StreamClose", |f| {
            matches!(f, ServerFrame::StreamClose { stream: s, .. } if s == stream).then_some(())
        })
        .await;

    // Refused before the upgrade, each naming what is wrong.
    let long = format!("path=/{}", "a".repeat(5000));
    for (q, says) in [
        ("path=var/log", "bad path"),
        ("path=/var/../etc", "without `..`"),
        ("path=/a%00b", "bad path"),
        ("path=/", "bad path"),
        (long.as_str(), "more than 4096"),
        ("", "path"),
        ("path=/a&offset=1", "unknown field"),
    ] {
        let (status, m) = refused(&server, &list(q), &server.token).await;
        assert_eq!(status, 400, "{q}: {m}");
        assert!(m.contains(says), "{q}: {m:?} should say {says:?}");
    }
    let shell_only = server
        .token_for(
            "sh-list",
            "none",
            Some(r#"permit (principal, action == Action::"shell", resource is Node);"#),
        )
        .await;
    let (status, m) = refused(&server, &list("path=/a"), &shell_only).await;
    assert_eq!(status, 403, "{m}");
    assert!(m.contains("cp"), "{m}");

    let mut old = ScriptedAgent::register(&server, "cp-list-v5").await;
    old.connect_as_version(&server, &[], fleetrun_proto::version::FILES_SINCE)
        .await;
    let path = format!("/v1/nodes/{}/files/list?path=/a", old.node_id);
    let (status, m) = refused(&server, &path, &server.token).await;
    assert_eq!(status, 503, "{m}");
    assert!(
        m.contains("protocol version 5, without file list sessions (version 7 or later"),
        "{m}"
    );
}
