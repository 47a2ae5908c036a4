//! The server's side of session streams, with a scripted agent and a real WebSocket client on
//! `GET /v1/nodes/{node_id}/exec`: the relay both ways with credit, the exit status, hang-ups
//! either way, the audit trail, and refusals (old agents, hostile clients, frames for streams the
//! server never opened).

mod support;

use fleetrun_proto::channel::{AgentFrame, ErrorCode, ServerFrame};
use fleetrun_proto::stream::client::{TAG_STDERR, TAG_STDIN, TAG_STDOUT};
use fleetrun_proto::stream::{StreamFd, StreamKind, StreamNo};
use fleetrun_proto::version::PROTOCOL_VERSION_MIN;
use futures_util::SinkExt;
use serde_json::{Value, json};
use std::time::Duration;
use support::{ClientWs, ScriptedAgent, TestServer, next_message, within};
use tokio_tungstenite::tungstenite::Message;

type Client = ClientWs;

/// Opens the exec WebSocket to a node with `token`: the socket, or the refusal's status and body.
async fn dial(server: &TestServer, node: &str, token: &str) -> Result<Client, (u16, String)> {
    let path = format!("/v1/nodes/{node}/exec");
    server
        .dial_ws(&path, token)
        .await
        .map_err(|(status, body)| (status, String::from_utf8_lossy(&body).into_owned()))
}

/// What the client hears next: a text message as JSON, a binary one as (tag, bytes), or the close.
#[derive(Debug)]
enum Heard {
    Event(Value),
    Bytes(u8, Vec<u8>),
    Closed,
}

async fn hear(ws: &mut Client) -> Heard {
    match next_message(ws).await {
        Some(Message::Text(t)) => Heard::Event(serde_json::from_str(t.as_str()).expect("JSON")),
        Some(Message::Binary(b)) => {
            let (tag, rest) = b.split_first().expect("a tag byte");
            Heard::Bytes(*tag, rest.to_vec())
        }
        Some(Message::Close(_)) | None => Heard::Closed,
        Some(other) => panic!("unexpected message {other:?}"),
    }
}

/// The next event of a given type, failing on anything else.
async fn expect_event(ws: &mut Client, kind: &str) -> Value {
    match hear(ws).await {
        Heard::Event(v) if v["type"] == kind => v,
        other => panic!("expected a {kind} event, got {other:?}"),
    }
}

/// The agent's next `StreamOpen`: its number and kind.
async fn expect_open(agent: &mut ScriptedAgent) -> (StreamNo, StreamKind, u64) {
    agent
        .expect("StreamOpen", |f| match f {
            ServerFrame::StreamOpen {
                stream,
                kind,
                window,
            } => Some((stream, kind, window)),
            _ => None,
        })
        .await
}

async fn start(command: &str) -> (TestServer, ScriptedAgent, Client, StreamNo) {
    open(TestServer::start().await, command).await
}

/// An exec session on a new node of `server`, started.
async fn open(server: TestServer, command: &str) -> (TestServer, ScriptedAgent, Client, StreamNo) {
    let mut agent = ScriptedAgent::online(&server, "exec-node").await;
    let mut ws = dial(&server, &agent.node_id.to_string(), &server.token)
        .await
        .expect("upgrade");
    let first = json!({"command": command, "env": {"A": "b"}});
    ws.send(Message::Text(first.to_string().into()))
        .await
        .expect("send");
    let (stream, kind, window) = expect_open(&mut agent).await;
    match kind {
        StreamKind::Exec {
            command: c, env, ..
        } => {
            assert_eq!(c, command);
            assert_eq!(env, vec![("A".to_owned(), "b".to_owned())]);
        }
        other => panic!("an exec stream was expected, not {other:?}"),
    }
    assert!(window > 0);
    agent
        .send(AgentFrame::StreamCredit {
            stream,
            bytes: 1 << 20,
        })
        .await;
    expect_event(&mut ws, "started").await;
    (server, agent, ws, stream)
}

async fn audit_actions(server: &TestServer, node: &str) -> Vec<(String, Value, String)> {
    let records = server.get(&format!("/v1/audit?node={node}")).await;
    records
        .as_array()
        .expect("records")
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap_or_default().to_owned(),
                r["params"].clone(),
                r["result"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Stdin goes to the agent within its credit, output comes back tagged, the exit status last;
/// the open and the end are audited with the command and the bytes each way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_session_is_relayed_both_ways_and_audited() {
    let (server, mut agent, mut ws, stream) = start("cat; exit 3").await;
    let mut stdin = vec![TAG_STDIN];
    stdin.extend_from_slice(b"input");
    ws.send(Message::Binary(stdin.into())).await.expect("send");
    ws.send(Message::Text(json!({"type": "eof"}).to_string().into()))
        .await
        .expect("send");
    let data = agent
        .expect("StreamData", |f| match f {
            ServerFrame::StreamData { stream: s, bytes } if s == stream => Some(bytes),
            _ => None,
        })
        .await;
    assert_eq!(data, b"input");
    agent
        .expect("StreamEof", |f| match f {
            ServerFrame::StreamEof { stream: s } if s == stream => Some(()),
            _ => None,
        })
        .await;
    for (fd, bytes) in [(StreamFd::Stdout, &b"out"[..]), (StreamFd::Stderr, b"err")] {
        let bytes = bytes.to_vec();
        agent
            .send(AgentFrame::StreamData { stream, fd, bytes })
            .await;
    }
    agent.exit_stream(stream, 3).await;
    match hear(&mut ws).await {
        Heard::Bytes(TAG_STDOUT, b) => assert_eq!(b, b"out"),
        other => panic!("expected stdout, got {other:?}"),
    }
    match hear(&mut ws).await {
        Heard::Bytes(TAG_STDERR, b) => assert_eq!(b, b"err"),
        other => panic!("expected stderr, got {other:?}"),
    }
    let exit = expect_event(&mut ws, "exit").await;
    assert_eq!(exit["code"], 3, "{exit}");
    assert!(matches!(hear(&mut ws).await, Heard::Closed));

    let node = agent.node_id.to_string();
    let records = within("the end to be audited", async {
        loop {
            let r = audit_actions(&server, &node).await;
            if r.iter().any(|(a, _, _)| a == "exec.end") {
                return r;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let open = records
        .iter()
        .find(|(a, _, _)| a == "exec.open")
        .expect("open");
    assert_eq!(open.1["command"], "cat; exit 3", "{open:?}");
    let end = records
        .iter()
        .find(|(a, _, _)| a == "exec.end")
        .expect("end");
    assert_eq!(end.2, "Exited 3");
    assert_eq!(
        (end.1["bytes_in"].as_u64(), end.1["bytes_out"].as_u64()),
        (Some(5), Some(6))
    );
    assert_eq!(end.1["exit_code"], 3);
}

/// The agent gets output credit back only as the client takes the bytes, and never more than it
/// was granted: a full window passes, then the grant follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_credit_is_granted_back_as_the_client_reads() {
    let (_server, mut agent, mut ws, stream) = start("yes").await;
    let chunk = vec![b'y'; 64 * 1024];
    // Half of the output window consumed earns a grant.
    let half = (fleetrun_server::sessions::exec::OUTPUT_WINDOW / 2 / (64 * 1024)) as usize;
    for _ in 0..half {
        let bytes = chunk.clone();
        agent
            .send(AgentFrame::StreamData {
                stream,
                fd: StreamFd::Stdout,
                bytes,
            })
            .await;
    }
    for _ in 0..half {
        match hear(&mut ws).await {
            Heard::Bytes(TAG_STDOUT, b) => assert_eq!(b.len(), chunk.len()),
            other => panic!("expected stdout, got {other:?}"),
        }
    }
    let granted = agent
        .expect("StreamCredit", |f| match f {
            ServerFrame::StreamCredit { stream: s, bytes } if s == stream => Some(bytes),
            _ => None,
        })
        .await;
    assert_eq!(granted, half as u64 * 64 * 1024);
}

/// The client leaving hangs the stream up on the agent; the agent's late answers about it are
/// dropped, and a number the server never opened is still a protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_hangs_the_stream_up() {
    let (_server, mut agent, ws, stream) = start("sleep 100").await;
    drop(ws);
    agent
        .expect("StreamClose", |f| match f {
            ServerFrame::StreamClose { stream: s, .. } if s == stream => Some(()),
            _ => None,
        })
        .await;
    // Crossed the end on the wire: ignored.
    agent
        .send(AgentFrame::StreamData {
            stream,
            fd: StreamFd::Stdout,
            bytes: b"late".to_vec(),
        })
        .await;
    agent
        .send(AgentFrame::StreamClose {
            stream,
            error: None,
        })
        .await;
    agent
        .send(AgentFrame::StreamCredit {
            stream: stream + 1,
            bytes: 1,
        })
        .await;
    let (code, message) = expect_error(&mut agent).await;
    assert_eq!(ErrorCode::parse(&code), ErrorCode::ProtocolError);
    assert!(
        message.contains(&format!("session stream {}", stream + 1)),
        "{message}"
    );
}

/// The agent's connection dropping tells the client clearly, and closes its socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_agent_ends_the_session_with_a_clear_error() {
    let (_server, mut agent, mut ws, _stream) = start("sleep 100").await;
    agent.disconnect();
    let error = expect_event(&mut ws, "error").await;
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("agent disconnected"), "{message}");
    assert!(matches!(hear(&mut ws).await, Heard::Closed));
}

/// A data frame over the stream frame size is a protocol error on the agent's connection, and the
/// client hears that the agent is gone. (Output past the credit: the unit tests of the table.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_stream_frame_is_a_protocol_error() {
    let (_server, mut agent, mut ws, stream) = start("yes").await;
    let bytes = vec![b'y'; fleetrun_proto::stream::STREAM_FRAME_MAX + 1];
    agent
        .send(AgentFrame::StreamData {
            stream,
            fd: StreamFd::Stdout,
            bytes,
        })
        .await;
    let (code, message) = expect_error(&mut agent).await;
    assert_eq!(ErrorCode::parse(&code), ErrorCode::ProtocolError);
    assert!(message.contains("more than"), "{message}");
    let error = expect_event(&mut ws, "error").await;
    assert!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("agent disconnected"),
        "{error}"
    );
}

/// No stream is opened to an agent of a protocol without streams: the upgrade is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_streams_is_not_sent_one() {
    let server = TestServer::start().await;
    let mut agent = ScriptedAgent::register(&server, "v2-exec").await;
    agent
        .connect_as_version(&server, &[], PROTOCOL_VERSION_MIN)
        .await;
    let Err((status, body)) = dial(&server, &agent.node_id.to_string(), &server.token).await else {
        panic!("an exec to a version 2 agent was upgraded");
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("protocol version 2"), "{body}");
}

/// Hostile clients get a clear error and a close, and the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_get_a_clear_close() {
    let server = TestServer::start().await;
    let mut agent = ScriptedAgent::online(&server, "hostile-exec").await;
    let node = agent.node_id.to_string();
    let cases: Vec<(Message, &str)> = vec![
        (
            Message::Binary(vec![0, 1, 2].into()),
            "first message must be",
        ),
        (Message::Text("not json".into()), "bad first message"),
        (
            Message::Text(
                json!({"command": "true", "run_as": "bad user!"})
                    .to_string()
                    .into(),
            ),
            "run-as",
        ),
        (
            Message::Text(json!({"command": "true", "bogus": 1}).to_string().into()),
            "bad first message",
        ),
        (Message::Binary(vec![0; 200 * 1024].into()), ""),
    ];
    for (msg, says) in cases {
        let mut ws = dial(&server, &node, &server.token).await.expect("upgrade");
        let _ = ws.send(msg).await;
        match hear(&mut ws).await {
            Heard::Event(v) => {
                assert_eq!(v["type"], "error", "{v}");
                let m = v["message"].as_str().unwrap_or_default();
                assert!(m.contains(says), "{m} should say {says}");
                assert!(matches!(hear(&mut ws).await, Heard::Closed));
            }
            // An oversize frame is refused by the socket layer itself.
            Heard::Closed => assert!(says.is_empty()),
            other => panic!("expected an error, got {other:?}"),
        }
    }
    // Binary stdin with a wrong tag after a good start.
    let mut ws = dial(&server, &node, &server.token).await.expect("upgrade");
    ws.send(Message::Text(json!({"command": "cat"}).to_string().into()))
        .await
        .expect("send");
    let (stream, _, _) = expect_open(&mut agent).await;
    agent
        .send(AgentFrame::StreamCredit {
            stream,
            bytes: 1024,
        })
        .await;
    expect_event(&mut ws, "started").await;
    ws.send(Message::Binary(vec![7, 1].into()))
        .await
        .expect("send");
    let v = expect_event(&mut ws, "error").await;
    assert!(
        v["message"].as_str().unwrap_or_default().contains("tag"),
        "{v}"
    );
    agent
        .expect("StreamClose", |f| match f {
            ServerFrame::StreamClose { stream: s, .. } if s == stream => Some(()),
            _ => None,
        })
        .await;
    // Still serving.
    server.get("/v1/nodes").await;
}

/// The session's record, waited for until `done` holds (bounded).
async fn session_when(
    store: &fleetrun_store::Store,
    done: impl Fn(&fleetrun_proto::api::Session) -> bool,
) -> fleetrun_proto::api::Session {
    within("the session's record", async {
        loop {
            let all = store
                .list_sessions(false, None, None, 10)
                .await
                .expect("list");
            if let Some(s) = all.into_iter().find(|s| done(s)) {
                return s;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

/// A session is recorded Active once the agent started it, and Ended with its exit code and the
/// bytes each way once it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_recorded_active_then_ended() {
    use fleetrun_proto::api::SessionStatus;
    let (server, mut agent, mut ws, stream) = start("cat; exit 4").await;
    let store = server.store().await;
    // The record is written before the client hears `started`.
    let active = store
        .list_sessions(true, None, None, 10)
        .await
        .expect("list");
    assert_eq!(active.len(), 1, "{active:?}");
    let s = &active[0];
    assert_eq!(
        (s.kind.as_str(), s.command.as_str(), &s.node_id),
        ("exec", "cat; exit 4", &agent.node_id)
    );
    assert_eq!(s.principal, "admin");
    assert_eq!(s.status, SessionStatus::Active);

    let mut stdin = vec![TAG_STDIN];
    stdin.extend_from_slice(b"abc");
    ws.send(Message::Binary(stdin.into())).await.expect("send");
    agent
        .expect("StreamData", |f| match f {
            ServerFrame::StreamData { stream: s, bytes } if s == stream => Some(bytes),
            _ => None,
        })
        .await;
    let (fd, bytes) = (StreamFd::Stdout, b"hello".to_vec());
    agent
        .send(AgentFrame::StreamData { stream, fd, bytes })
        .await;
    agent.exit_stream(stream, 4).await;
    let id = s.session_id.clone();
    let ended = session_when(&store, |s| {
        s.session_id == id && s.status != SessionStatus::Active
    })
    .await;
    assert_eq!(ended.status, SessionStatus::Ended);
    assert_eq!(ended.exit_code, Some(4));
    assert_eq!((ended.bytes_in, ended.bytes_out), (3, 5));
    assert_eq!(ended.end_reason, "exited");
    assert!(ended.ended_at.is_some());
    // The trail's open names the record.
    let node = agent.node_id.to_string();
    let records = audit_actions(&server, &node).await;
    let open = records
        .iter()
        .find(|(a, _, _)| a == "exec.open")
        .expect("open");
    assert_eq!(open.1["session_id"], id.as_str(), "{open:?}");
}

/// A server that stops with a session running marks it ended when it starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_marks_active_sessions_ended() {
    use fleetrun_proto::api::SessionStatus;
    let (mut server, _agent, _ws, _stream) = start("sleep 100").await;
    server.restart().await;
    let store = server.store().await;
    let s = session_when(&store, |_| true).await;
    assert_eq!(s.status, SessionStatus::Terminated);
    assert_eq!(s.end_reason, "server restarted");
    assert!(s.ended_at.is_some());
    assert!(
        store
            .list_sessions(true, None, None, 10)
            .await
            .expect("list")
            .is_empty()
    );
}

/// The id of the one active session.
async fn the_active_session(server: &TestServer) -> String {
    let list = server.get("/v1/sessions?active=true").await;
    let list = list.as_array().expect("sessions");
    assert_eq!(list.len(), 1, "{list:?}");
    list[0]["session_id"].as_str().expect("id").to_owned()
}

/// The client's error event and close after the server ended its session.
async fn expect_ended_with(ws: &mut Client, reason: &str) {
    let e = expect_event(ws, "error").await;
    assert_eq!(e["message"], reason, "{e}");
    assert!(matches!(hear(ws).await, Heard::Closed));
}

/// The agent's StreamClose for `stream`.
async fn expect_close(agent: &mut ScriptedAgent, stream: StreamNo) -> String {
    agent
        .expect("StreamClose", |f| match f {
            ServerFrame::StreamClose { stream: s, reason } if s == stream => Some(reason),
            _ => None,
        })
        .await
}

/// A terminate hangs the stream up on the agent, tells the client who ended it, and leaves the
/// record Terminated with that reason; a second terminate is refused (409).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_ends_the_session_and_the_client_hears_why() {
    use fleetrun_proto::api::SessionStatus;
    let (server, mut agent, mut ws, stream) = start("sleep 100").await;
    let id = the_active_session(&server).await;
    let shown = server.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(shown["status"], "Active", "{shown}");
    let path = format!("/v1/sessions/{id}/terminate");
    let (status, _, body) = server.call(reqwest::Method::POST, &path, None, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        expect_close(&mut agent, stream).await,
        "terminated by admin"
    );
    expect_ended_with(&mut ws, "terminated by admin").await;
    let store = server.store().await;
    let s = session_when(&store, |s| s.status != SessionStatus::Active).await;
    assert_eq!(s.status, SessionStatus::Terminated);
    assert_eq!(s.end_reason, "terminated by admin");
    let (status, _, body) = server.call(reqwest::Method::POST, &path, None, &[]).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "SessionEnded", "{body}");
    let (status, _, body) = server
        .call(
            reqwest::Method::POST,
            "/v1/sessions/nope/terminate",
            None,
            &[],
        )
        .await;
    assert_eq!(status, 404, "{body}");
}

/// A session with no bytes either way for the idle timeout is ended as a terminate would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timeout_ends_a_silent_session() {
    use fleetrun_proto::api::SessionStatus;
    let server =
        TestServer::start_with(|c| c.session_idle_timeout = Duration::from_millis(300)).await;
    let (server, mut agent, mut ws, stream) = open(server, "sleep 100").await;
    assert_eq!(expect_close(&mut agent, stream).await, "idle timeout");
    expect_ended_with(&mut ws, "idle timeout").await;
    let store = server.store().await;
    let s = session_when(&store, |s| s.status != SessionStatus::Active).await;
    assert_eq!(
        (s.status, s.end_reason.as_str()),
        (SessionStatus::Terminated, "idle timeout")
    );
}

/// A session running past the maximum duration is ended, however busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_max_duration_ends_a_long_session() {
    use fleetrun_proto::api::SessionStatus;
    let server =
        TestServer::start_with(|c| c.session_max_duration = Some(Duration::from_millis(300))).await;
    let (server, mut agent, mut ws, stream) = open(server, "sleep 100").await;
    assert_eq!(expect_close(&mut agent, stream).await, "max duration");
    expect_ended_with(&mut ws, "max duration").await;
    let store = server.store().await;
    let s = session_when(&store, |s| s.status != SessionStatus::Active).await;
    assert_eq!(
        (s.status, s.end_reason.as_str()),
        (SessionStatus::Terminated, "max duration")
    );
}

/// An operator may see sessions (it may open shells) but not terminate them without
/// `terminate-session` (403, audited); a viewer (no shells) sees none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_needs_its_action_and_listings_follow_the_shell_scope() {
    let (server, _agent, _ws, _stream) = start("sleep 100").await;
    let id = the_active_session(&server).await;
    let operator = server.token_for("op", "operator", None).await;
    let viewer = server.token_for("view", "viewer", None).await;
    let get = reqwest::Method::GET;

    let (status, _, list) = server
        .call_as(&operator, get.clone(), "/v1/sessions", None, &[])
        .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let path = format!("/v1/sessions/{id}/terminate");
    let (status, _, body) = server
        .call_as(&operator, reqwest::Method::POST, &path, None, &[])
        .await;
    assert_eq!(status, 403, "{body}");

    let (status, _, list) = server
        .call_as(&viewer, get.clone(), "/v1/sessions", None, &[])
        .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    let (status, _, body) = server
        .call_as(&viewer, get, &format!("/v1/sessions/{id}"), None, &[])
        .await;
    assert_eq!(status, 404, "{body}");

    // Still running, and the refusal is in the trail.
    assert_eq!(the_active_session(&server).await, id);
    let records = server.get("/v1/audit?principal=op").await;
    let refused = records
        .as_array()
        .expect("records")
        .iter()
        .find(|r| r["action"] == "sessions.terminate")
        .cloned()
        .expect("the refusal audited");
    assert!(
        refused["result"]
            .as_str()
            .unwrap_or_default()
            .contains("403"),
        "{refused}"
    );
}

/// The next `Error` frame the server sends the agent: its code and message.
async fn expect_error(agent: &mut ScriptedAgent) -> (String, String) {
    agent
        .expect("an Error", |f| match f {
            ServerFrame::Error { code, message } => Some((code, message)),
            _ => None,
        })
        .await
}

/// A session's recording holds its output as text even when a character is split across frames
/// or a byte is invalid, and its input only when the server records input; it is served as
/// `application/x-asciicast` once the session ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_holds_split_characters_and_input_when_configured() {
    let server = TestServer::start_with(|c| c.recording.record_input = true).await;
    // Sessions on a terminal are the recorded ones.
    let mut agent = ScriptedAgent::online(&server, "rec-node").await;
    let mut ws = dial(&server, &agent.node_id.to_string(), &server.token)
        .await
        .expect("upgrade");
    ws.send(shell_request("cat")).await.expect("send");
    let (stream, _, _) = expect_open(&mut agent).await;
    agent
        .send(AgentFrame::StreamCredit {
            stream,
            bytes: 1 << 20,
        })
        .await;
    expect_event(&mut ws, "started").await;
    let id = the_active_session(&server).await;
    let mut stdin = vec![TAG_STDIN];
    stdin.extend_from_slice(b"pass\n");
    ws.send(Message::Binary(stdin.into())).await.expect("send");
    agent
        .expect("StreamData", |f| match f {
            ServerFrame::StreamData { stream: s, bytes } if s == stream => Some(bytes),
            _ => None,
        })
        .await;
    for (fd, bytes) in [
        (StreamFd::Stdout, &b"caf\xc3"[..]),
        (StreamFd::Stdout, b"\xa9 \xff!"),
        (StreamFd::Stderr, b"e"),
    ] {
        let bytes = bytes.to_vec();
        agent
            .send(AgentFrame::StreamData { stream, fd, bytes })
            .await;
    }
    agent.exit_stream(stream, 0).await;
    expect_event_after_output(&mut ws, "exit").await;
    let (status, headers, _) = server
        .call(
            reqwest::Method::GET,
            &format!("/v1/sessions/{id}/recording"),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/x-asciicast");
    let path = server.data.join(format!("objects/sessions/{id}.cast"));
    let cast = std::fs::read_to_string(path).expect("the recording");
    let lines: Vec<Value> = cast
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines[0]["version"], 2);
    let text = |code: &str| -> String {
        lines[1..]
            .iter()
            .filter(|l| l[1] == code)
            .map(|l| l[2].as_str().expect("text"))
            .collect()
    };
    assert_eq!(text("o"), "café \u{fffd}!e");
    assert_eq!(text("i"), "pass\n");
    let s = server.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(s["recording"], "complete", "{s}");
    assert_eq!(s["recording_bytes"], cast.len() as u64, "{s}");
}

/// Skips the output messages, then the next event must be of type `kind`.
async fn expect_event_after_output(ws: &mut Client, kind: &str) -> Value {
    loop {
        match hear(ws).await {
            Heard::Bytes(..) => continue,
            Heard::Event(v) if v["type"] == kind => return v,
            other => panic!("expected a {kind} event, got {other:?}"),
        }
    }
}

/// A shell session's first message: a PTY of 24 x 80, the login shell unless `command` is set.
fn shell_request(command: &str) -> Message {
    let first =
        json!({"command": command, "pty": {"term": "xterm-256color", "rows": 24, "cols": 80}});
    Message::Text(first.to_string().into())
}

/// A first message with a PTY opens a `Shell` stream (an empty command: the login shell); the
/// client's resizes reach the agent as `StreamResize`, coalesced so a flood of them is a few
/// frames ending with the last size; the record is of kind `shell`, its command "(login shell)"
/// (not a blank), and the trail says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_session_opens_a_pty_stream_and_passes_resizes_on() {
    let server = TestServer::start().await;
    let mut agent = ScriptedAgent::online(&server, "shell-node").await;
    let node = agent.node_id.to_string();
    let mut ws = dial(&server, &node, &server.token).await.expect("upgrade");
    ws.send(shell_request("")).await.expect("send");
    let (stream, kind, _) = expect_open(&mut agent).await;
    assert_eq!(
        kind,
        StreamKind::Shell {
            command: None,
            run_as: None,
            term: "xterm-256color".into(),
            rows: 24,
            cols: 80,
            env: vec![],
        }
    );
    agent
        .send(AgentFrame::StreamCredit {
            stream,
            bytes: 1 << 20,
        })
        .await;
    expect_event(&mut ws, "started").await;
    let store = server.store().await;
    let active = store
        .list_sessions(true, None, None, 10)
        .await
        .expect("list");
    assert_eq!(active.len(), 1, "{active:?}");
    assert_eq!(
        (active[0].kind.as_str(), active[0].command.as_str()),
        ("shell", "(login shell)")
    );

    for i in 1..=200u16 {
        let resize = json!({"type": "resize", "rows": i, "cols": 2 * i});
        ws.send(Message::Text(resize.to_string().into()))
            .await
            .expect("send");
    }
    let mut resizes = 0;
    loop {
        let (rows, cols) = agent
            .expect("StreamResize", |f| match f {
                ServerFrame::StreamResize {
                    stream: s,
                    rows,
                    cols,
                } if s == stream => Some((rows, cols)),
                _ => None,
            })
            .await;
        resizes += 1;
        if (rows, cols) == (200, 400) {
            break;
        }
    }
    assert!(resizes < 200, "{resizes} resizes for 200 sent at once");

    // Typed keys go to the agent as input, the terminal's output comes back as stdout.
    let mut keys = vec![TAG_STDIN];
    keys.extend_from_slice(b"exit 3\r");
    ws.send(Message::Binary(keys.into())).await.expect("send");
    let typed = agent
        .expect("StreamData", |f| match f {
            ServerFrame::StreamData { stream: s, bytes } if s == stream => Some(bytes),
            _ => None,
        })
        .await;
    assert_eq!(typed, b"exit 3\r");
    let (fd, bytes) = (StreamFd::Stdout, b"exit 3\r\nlogout\r\n".to_vec());
    agent
        .send(AgentFrame::StreamData { stream, fd, bytes })
        .await;
    agent.exit_stream(stream, 3).await;
    match hear(&mut ws).await {
        Heard::Bytes(TAG_STDOUT, b) => assert_eq!(b, b"exit 3\r\nlogout\r\n"),
        other => panic!("expected stdout, got {other:?}"),
    }
    assert_eq!(expect_event(&mut ws, "exit").await["code"], 3);
    let records = within("the end to be audited", async {
        loop {
            let r = audit_actions(&server, &node).await;
            if r.iter().any(|(a, _, _)| a == "exec.end") {
                return r;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let open = records
        .iter()
        .find(|(a, _, _)| a == "exec.open")
        .expect("open");
    assert_eq!(open.1["kind"], "shell", "{open:?}");
    assert_eq!(open.1["pty"]["term"], "xterm-256color", "{open:?}");
    let end = records
        .iter()
        .find(|(a, _, _)| a == "exec.end")
        .expect("end");
    assert_eq!(
        (end.1["kind"].as_str(), end.2.as_str()),
        (Some("shell"), "Exited 3")
    );

    // The recording has the PTY's size and TERM, its output, and the resize the PTY got last.
    let id = &active[0].session_id;
    let path = server.data.join(format!("objects/sessions/{id}.cast"));
    let cast = within("the recording", async {
        loop {
            if let Ok(c) = std::fs::read_to_string(&path) {
                return c;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let lines: Vec<Value> = cast
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(
        (lines[0]["width"].as_u64(), lines[0]["height"].as_u64()),
        (Some(80), Some(24))
    );
    assert!(
        lines[0].to_string().contains("xterm-256color"),
        "{}",
        lines[0]
    );
    let last_resize = lines[1..]
        .iter()
        .rev()
        .find(|l| l[1] == "r")
        .map(|l| l[2].clone());
    assert_eq!(last_resize, Some(Value::from("400x200")), "{cast}");
    assert!(
        lines[1..]
            .iter()
            .any(|l| l[1] == "o" && l[2] == "exit 3\r\nlogout\r\n"),
        "{cast}"
    );
}

/// Hostile shell clients: each bad first message or resize gets a clear error naming what is
/// wrong and a close, the agent's stream (if one was opened) is hung up, and the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_shell_clients_get_a_clear_close() {
    let server = TestServer::start().await;
    let mut agent = ScriptedAgent::online(&server, "hostile-shell").await;
    let node = agent.node_id.to_string();
    let pty = |term: &str, rows: u32, cols: u32| json!({"term": term, "rows": rows, "cols": cols});
    let firsts = [
        (json!({"command": ""}), "needs a PTY"),
        (
            json!({"command": "", "pty": pty("xterm", 24, 80), "working_dir": "/tmp"}),
            "working_dir is not supported with a PTY",
        ),
        (
            json!({"command": "", "pty": pty("xterm\u{1b}[2J", 24, 80)}),
            "bad TERM",
        ),
        (
            json!({"command": "", "pty": pty("xterm", 0, 80)}),
            "window of 0 rows",
        ),
        (
            json!({"command": "", "pty": pty("xterm", 24, 70_000)}),
            "bad first message",
        ),
        (
            json!({"command": "", "pty": {"term": "xterm", "rows": 1, "cols": 1, "x": 1}}),
            "unknown field",
        ),
    ];
    for (first, says) in firsts {
        let mut ws = dial(&server, &node, &server.token).await.expect("upgrade");
        ws.send(Message::Text(first.to_string().into()))
            .await
            .expect("send");
        let e = expect_event(&mut ws, "error").await;
        let m = e["message"].as_str().unwrap_or_default();
        assert!(m.contains(says), "{m:?} should say {says:?} for {first}");
        assert!(matches!(hear(&mut ws).await, Heard::Closed));
    }

    // Resizes that break the rules, after a good start: each ends its session.
    let resizes = [
        (
            json!({"type": "resize", "rows": 0, "cols": 80}),
            true,
            "bad resize",
        ),
        (
            json!({"type": "resize", "rows": 24, "cols": 5000}),
            true,
            "bad resize",
        ),
        (
            json!({"type": "resize", "rows": -1, "cols": 80}),
            true,
            "bad message",
        ),
        (json!({"type": "resize", "rows": 24}), true, "bad message"),
        (
            json!({"type": "resize", "rows": 24, "cols": 80}),
            false,
            "needs a PTY",
        ),
    ];
    for (resize, with_pty, says) in resizes {
        let mut ws = dial(&server, &node, &server.token).await.expect("upgrade");
        let first = if with_pty {
            shell_request("")
        } else {
            Message::Text(json!({"command": "cat"}).to_string().into())
        };
        ws.send(first).await.expect("send");
        let (stream, _, _) = expect_open(&mut agent).await;
        agent
            .send(AgentFrame::StreamCredit {
                stream,
                bytes: 1024,
            })
            .await;
        expect_event(&mut ws, "started").await;
        ws.send(Message::Text(resize.to_string().into()))
            .await
            .expect("send");
        let e = expect_event(&mut ws, "error").await;
        let m = e["message"].as_str().unwrap_or_default();
        assert!(m.contains(says), "{m:?} should say {says:?} for {resize}");
        expect_close(&mut agent, stream).await;
    }
    server.get("/v1/nodes").await;
}

/// A version 3 agent has session streams but no shells: the client is told to upgrade the
/// agent, and no stream is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_3_agent_is_not_sent_a_shell() {
    let server = TestServer::start().await;
    let mut agent = ScriptedAgent::register(&server, "v3-shell").await;
    agent
        .connect_as_version(&server, &[], fleetrun_proto::version::STREAMS_SINCE)
        .await;
    let node = agent.node_id.to_string();
    let mut ws = dial(&server, &node, &server.token).await.expect("upgrade");
    ws.send(shell_request("")).await.expect("send");
    let e = expect_event(&mut ws, "error").await;
    let m = e["message"].as_str().unwrap_or_default();
    assert!(
        m.contains("protocol version 3, without shell sessions") && m.contains("upgrade the agent"),
        "{m}"
    );
    assert!(matches!(hear(&mut ws).await, Heard::Closed));
    // Exec still works on it.
    let mut ws = dial(&server, &node, &server.token).await.expect("upgrade");
    ws.send(Message::Text(json!({"command": "true"}).to_string().into()))
        .await
        .expect("send");
    let (_, kind, _) = expect_open(&mut agent).await;
    assert!(matches!(kind, StreamKind::Exec { .. }), "{kind:?}");
}

/// A session that never started is a `Failed` record naming why, and `exec.refused` in the trail
/// names it: the node not connected, its agent too old, the agent refusing the stream. A bad
/// first message asks for no session: the trail has it, the listing does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_never_started_is_recorded_failed_with_why() {
    use fleetrun_proto::api::{RecordingStatus, SessionStatus};
    let server = TestServer::start().await;
    let store = server.store().await;
    let failed_on = |node: &fleetrun_proto::NodeId| {
        let node = node.clone();
        move |s: &fleetrun_proto::api::Session| {
            s.status == SessionStatus::Failed && s.node_id == node
        }
    };
    let refused_names = |records: Vec<(String, Value, String)>, id: &str| {
        records
            .iter()
            .any(|(a, p, _)| a == "exec.refused" && p["session_id"] == id)
    };

    // Registered, never connected: refused before the client says what to run.
    let offline = ScriptedAgent::register(&server, "offline-node").await;
    let node = offline.node_id.to_string();
    let Err((status, body)) = dial(&server, &node, &server.token).await else {
        panic!("an exec to an offline node was upgraded");
    };
    assert_eq!(status, 503, "{body}");
    let s = session_when(&store, failed_on(&offline.node_id)).await;
    assert_eq!(
        (s.kind.as_str(), s.command.as_str(), s.principal.as_str()),
        ("exec", "", "admin")
    );
    assert!(s.end_reason.contains("is not connected"), "{s:?}");
    assert!(s.ended_at.is_some(), "{s:?}");
    assert!(refused_names(
        audit_actions(&server, &node).await,
        &s.session_id
    ));

    // An agent without session streams.
    let mut old = ScriptedAgent::register(&server, "old-node").await;
    old.connect_as_version(&server, &[], PROTOCOL_VERSION_MIN)
        .await;
    let node = old.node_id.to_string();
    let Err((status, body)) = dial(&server, &node, &server.token).await else {
        panic!("an exec to a version 2 agent was upgraded");
    };
    assert_eq!(status, 503, "{body}");
    let s = session_when(&store, failed_on(&old.node_id)).await;
    assert!(s.end_reason.contains("protocol version 2"), "{s:?}");

    // The agent refuses the stream (a login shell: recorded, so its recording is dropped too).
    let mut agent = ScriptedAgent::online(&server, "refusing-node").await;
    let node = agent.node_id.to_string();
    let mut ws = dial(&server, &node, &server.token).await.expect("upgrade");
    ws.send(shell_request("")).await.expect("send");
    let (stream, _, _) = expect_open(&mut agent).await;
    let error = Some("no such user: nobody-here".to_owned());
    agent.send(AgentFrame::StreamClose { stream, error }).await;
    let e = expect_event(&mut ws, "error").await;
    assert!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no such user"),
        "{e}"
    );
    let s = session_when(&store, failed_on(&agent.node_id)).await;
    assert_eq!(
        (s.kind.as_str(), s.command.as_str(), s.recording),
        ("shell", "(login shell)", RecordingStatus::None)
    );
    assert_eq!(s.end_reason, "no such user: nobody-here");
    assert_eq!((s.exit_code, s.bytes_in, s.bytes_out), (None, 0, 0));
    // The end is audited after the client heard of it: waited for.
    let end = within("the end in the audit trail, naming the record", async {
        loop {
            let records = audit_actions(&server, &node).await;
            if let Some(end) = records
                .into_iter()
                .find(|(a, p, _)| a == "exec.end" && p["session_id"] == s.session_id.as_str())
            {
                return end;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(end.2, "Failed", "{end:?}");
    // Failed is not running: not listed as active, not terminable.
    assert!(
        store
            .list_sessions(true, None, None, 10)
            .await
            .expect("list")
            .is_empty()
    );
    let path = format!("/v1/sessions/{}/terminate", s.session_id);
    let (status, _, body) = server.call(reqwest::Method::POST, &path, None, &[]).await;
    assert_eq!(status, 409, "{body}");

    // Not a session: a first message that is not a request.
    let mut ws = dial(&server, &node, &server.token).await.expect("upgrade");
    ws.send(Message::Text("nope".into())).await.expect("send");
    expect_event(&mut ws, "error").await;
    let all = store
        .list_sessions(false, None, None, 10)
        .await
        .expect("list");
    assert_eq!(all.len(), 3, "{all:?}");
}
