//! The agent against a scripted stand-in for the server on a real WebSocket: registration,
//! Hello/Welcome, running, streaming, resending after reconnects, acks, cancels and refusals.

use fleetrun_agent::identity::{self, Identity};
use fleetrun_agent::{AgentConfig, run};
use fleetrun_proto::auth;
use fleetrun_proto::channel::{
    AgentFrame, ErrorCode, Outcome, Pipe, RunRequest, ServerFrame, StreamId,
};
use fleetrun_proto::limits::OUTPUT_WINDOW;
use fleetrun_proto::stream::{
    STREAM_FRAME_MAX, STREAM_WINDOW_BULK, STREAM_WINDOW_DEFAULT, StreamFd, StreamKind,
};
use fleetrun_proto::time::now_ms;
use fleetrun_proto::version::{PROTOCOL_VERSION, PROTOCOL_VERSION_HEADER};
use fleetrun_proto::{CommandId, NodeId};
use futures_util::{SinkExt, StreamExt};
use std::future::Future;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

const DEADLINE: Duration = Duration::from_secs(30);
/// The stand-in server's challenge.
const NONCE: [u8; 32] = [5; 32];

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

type Ws = WebSocketStream<TcpStream>;

struct Server {
    listener: TcpListener,
    state: tempfile::TempDir,
}

impl Server {
    async fn new() -> Self {
        Server {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            state: tempfile::tempdir().unwrap(),
        }
    }

    fn config(&self) -> AgentConfig {
        let addr = self.listener.local_addr().unwrap();
        // The fake server speaks plain WebSocket: these tests are about the channel, not TLS.
        let mut config = AgentConfig::new(format!("http://{addr}"), self.state.path());
        // Acknowledged run directories go a second later (the batched sweep's timer path; the
        // agent-process tests use 0s), so tests can watch them go.
        config.sweep_after = Duration::from_secs(1);
        config.insecure_http = true;
        config
    }

    fn start(&self, config: AgentConfig) -> JoinHandle<anyhow::Result<()>> {
        tokio::spawn(run(config))
    }

    async fn accept(&self) -> Ws {
        let (tcp, _) = within("a connection", self.listener.accept())
            .await
            .unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let nonce = NONCE.to_vec();
        send(&mut ws, ServerFrame::Challenge { nonce }).await;
        ws
    }

    /// Accepts a connection, expects `Hello`, answers `Welcome`; returns the `known` list.
    async fn welcome(&self, node_id: &NodeId) -> (Ws, Vec<CommandId>) {
        let mut ws = self.accept().await;
        match recv(&mut ws).await {
            AgentFrame::Hello {
                protocol_version,
                node_id: n,
                public_key,
                signature,
                known,
                info,
            } => {
                assert_eq!(protocol_version, PROTOCOL_VERSION);
                assert_eq!(&n, node_id);
                // Signed over this connection's challenge with the key on disk.
                let saved = identity::load(self.state.path()).unwrap().unwrap();
                assert_eq!(public_key, saved.key().public_key());
                let msg = auth::hello_message(node_id, &NONCE, &public_key);
                auth::verify(&public_key, &msg, &signature).expect("Hello signature");
                assert!(!info.hostname.is_empty());
                send(
                    &mut ws,
                    ServerFrame::Welcome {
                        protocol_version: PROTOCOL_VERSION,
                        heartbeat_secs: 15,
                    },
                )
                .await;
                (ws, known)
            }
            other => panic!("expected Hello, got {other:?}"),
        }
    }

    fn enrol(&self) -> NodeId {
        let node_id = NodeId::from_random(0xabc);
        identity::save(
            self.state.path(),
            // A fresh key: no rotation is due during the test.
            &Identity::new(node_id.clone(), identity::generate_key(), now_ms()),
        )
        .unwrap();
        node_id
    }
}

async fn recv(ws: &mut Ws) -> AgentFrame {
    loop {
        match within("a frame", ws.next()).await {
            Some(Ok(Message::Binary(b))) => return AgentFrame::decode(&b).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

async fn send(ws: &mut Ws, frame: ServerFrame) {
    ws.send(Message::Binary(frame.encode().into()))
        .await
        .unwrap();
}

fn run_req(id: &CommandId, script: &str) -> ServerFrame {
    ServerFrame::Run(RunRequest {
        command_id: id.clone(),
        script: script.into(),
        working_dir: String::new(),
        execution_timeout_secs: 60,
        run_as: None,
        memory_limit_bytes: None,
        cpu_limit_percent: None,
    })
}

/// What one connection carried for a command until its `Finished`.
#[derive(Debug, Default)]
struct Seen {
    started: usize,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    first_offsets: (Option<u64>, Option<u64>),
    result: Option<fleetrun_proto::channel::ExecResult>,
}

/// Reads frames until `id`'s `Finished`, checking order and contiguous offsets; with `ack`,
/// acknowledges every output frame.
async fn collect(ws: &mut Ws, id: &CommandId, ack: bool) -> Seen {
    let mut seen = Seen::default();
    loop {
        match recv(ws).await {
            AgentFrame::Started { command_id, .. } if &command_id == id => {
                assert!(
                    seen.stdout.is_empty() && seen.stderr.is_empty(),
                    "Started first"
                );
                seen.started += 1;
            }
            AgentFrame::Output {
                stream,
                offset,
                data,
            } => {
                let StreamId::Output { command_id, pipe } = &stream;
                if command_id != id {
                    continue;
                }
                let (buf, first) = match pipe {
                    Pipe::Stdout => (&mut seen.stdout, &mut seen.first_offsets.0),
                    Pipe::Stderr => (&mut seen.stderr, &mut seen.first_offsets.1),
                };
                let base = *first.get_or_insert(offset);
                assert_eq!(offset, base + buf.len() as u64, "contiguous offsets");
                buf.extend_from_slice(&data);
                if ack {
                    let end = offset + data.len() as u64;
                    send(
                        ws,
                        ServerFrame::Ack {
                            stream,
                            offset: end,
                        },
                    )
                    .await;
                }
            }
            AgentFrame::Finished { command_id, result } if &command_id == id => {
                seen.result = Some(result);
                return seen;
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn registers_runs_and_resends_after_reconnect() {
    let server = Server::new().await;
    let mut config = server.config();
    config.activation_code = Some("code-1".into());
    config.name = Some("node-one".into());
    config.tags.insert("env".into(), "test".into());
    let agent = server.start(config);

    // Registration on a first connection.
    let node_id = NodeId::from_random(0x1234);
    let mut ws = server.accept().await;
    match recv(&mut ws).await {
        AgentFrame::Register {
            activation_code,
            public_key,
            signature,
            info,
            tags,
            ..
        } => {
            let msg = auth::register_message(&NONCE, &public_key);
            auth::verify(&public_key, &msg, &signature).expect("Register signature");
            assert_eq!(activation_code, "code-1");
            assert_eq!(info.name, "node-one");
            assert_eq!(tags.get("env").map(String::as_str), Some("test"));
        }
        other => panic!("expected Register, got {other:?}"),
    }
    send(
        &mut ws,
        ServerFrame::Registered {
            node_id: node_id.clone(),
        },
    )
    .await;

    // Then Hello, a command, its output and result; nothing acknowledged.
    let (mut ws, known) = server.welcome(&node_id).await;
    let saved = identity::load(server.state.path()).unwrap().unwrap();
    assert_eq!(saved.node_id, node_id);
    assert!(known.is_empty());
    let id = CommandId::from_random(1);
    send(
        &mut ws,
        run_req(&id, r"printf 'a\377'; echo err >&2; exit 4"),
    )
    .await;
    send(&mut ws, run_req(&id, "echo twice")).await; // a duplicate: ignored
    let first = collect(&mut ws, &id, false).await;
    assert_eq!(first.started, 1);
    assert_eq!(first.stdout, [b'a', 0xff]);
    assert_eq!(first.stderr, b"err\n");
    let result = first.result.unwrap();
    assert_eq!(result.outcome, Outcome::Exited);
    assert_eq!(result.exit_code, 4);
    assert_eq!((result.stdout_bytes, result.stderr_bytes), (2, 4));
    drop(ws);

    // A new connection: the agent still holds the command and resends everything unacknowledged,
    // but no Started (the command has finished).
    let (mut ws, known) = server.welcome(&node_id).await;
    assert_eq!(known, std::slice::from_ref(&id));
    let again = collect(&mut ws, &id, true).await;
    assert_eq!(again.started, 0);
    assert_eq!(again.first_offsets, (Some(0), Some(0)));
    assert_eq!(again.stdout, first.stdout);
    assert_eq!(again.stderr, first.stderr);
    assert_eq!(again.result.unwrap(), result);
    send(
        &mut ws,
        ServerFrame::ResultAck {
            command_id: id.clone(),
        },
    )
    .await;
    // A frame that does not decode: the agent drops the connection and comes back.
    ws.send(Message::Binary(vec![0xff, 0xff, 0xff].into()))
        .await
        .unwrap();

    // Forgotten after ResultAck.
    let (mut ws, known) = server.welcome(&node_id).await;
    assert!(known.is_empty(), "{known:?}");
    // The node is unknown to the server: fatal.
    send(
        &mut ws,
        ServerFrame::Error {
            code: "UnknownNode".into(),
            message: "no such node".into(),
        },
    )
    .await;
    let err = within("the agent to stop", agent)
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("UnknownNode"), "{err}");
    // The run directory goes after ResultAck (removed in the background: bounded wait).
    let run_dir = server.state.path().join("runs").join(id.as_str());
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while run_dir.exists() {
        assert!(
            std::time::Instant::now() < until,
            "{} not removed",
            run_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn flow_control_and_resend_from_the_acknowledged_offset() {
    const TOTAL: u64 = OUTPUT_WINDOW + 300_000;
    let server = Server::new().await;
    let node_id = server.enrol();
    let agent = server.start(server.config());
    let (mut ws, _) = server.welcome(&node_id).await;
    let id = CommandId::from_random(2);
    send(
        &mut ws,
        run_req(&id, &format!("head -c {TOTAL} /dev/zero | tr '\\000' y")),
    )
    .await;
    // Without acks the agent sends exactly one window, no more.
    let mut next = 0u64;
    let mut first_frame_end = None;
    while next < OUTPUT_WINDOW {
        if let AgentFrame::Output { offset, data, .. } = recv(&mut ws).await {
            assert_eq!(offset, next);
            next += data.len() as u64;
            first_frame_end.get_or_insert(next);
        }
    }
    assert_eq!(next, OUTPUT_WINDOW, "never past the window");
    // Acknowledge the first frame only: exactly that much more comes, which also shows the ack
    // was applied.
    let acked = first_frame_end.unwrap();
    let stream = StreamId::Output {
        command_id: id.clone(),
        pipe: Pipe::Stdout,
    };
    send(
        &mut ws,
        ServerFrame::Ack {
            stream,
            offset: acked,
        },
    )
    .await;
    while next < OUTPUT_WINDOW + acked {
        if let AgentFrame::Output { offset, data, .. } = recv(&mut ws).await {
            assert_eq!(offset, next);
            next += data.len() as u64;
        }
    }
    assert_eq!(next, OUTPUT_WINDOW + acked);
    drop(ws);
    // After the reconnect, the resend starts at the acknowledged offset.
    let (mut ws, known) = server.welcome(&node_id).await;
    assert_eq!(known, std::slice::from_ref(&id));
    let seen = collect(&mut ws, &id, true).await;
    assert_eq!(seen.first_offsets.0, Some(acked));
    assert_eq!(acked + seen.stdout.len() as u64, TOTAL);
    assert!(seen.stdout.iter().all(|&b| b == b'y'));
    assert_eq!(seen.result.unwrap().stdout_bytes, TOTAL);
    agent.abort();
}

#[tokio::test]
async fn cancels_reach_queued_and_running_commands() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let mut config = server.config();
    config.max_concurrent_commands = 1;
    config.kill_grace = Duration::from_millis(200);
    let agent = server.start(config);
    let (mut ws, _) = server.welcome(&node_id).await;
    let (a, b) = (CommandId::from_random(3), CommandId::from_random(4));
    send(&mut ws, run_req(&a, "echo ready; sleep 1000")).await;
    send(&mut ws, run_req(&b, "echo never")).await;
    // Wait for A's output, so A holds the only slot and B is queued.
    loop {
        if let AgentFrame::Output { stream, .. } = recv(&mut ws).await {
            assert_eq!(
                stream,
                StreamId::Output {
                    command_id: a.clone(),
                    pipe: Pipe::Stdout
                }
            );
            break;
        }
    }
    send(
        &mut ws,
        ServerFrame::Cancel {
            command_id: CommandId::from_random(99),
        },
    )
    .await;
    send(
        &mut ws,
        ServerFrame::Cancel {
            command_id: b.clone(),
        },
    )
    .await;
    let seen_b = collect(&mut ws, &b, true).await;
    assert_eq!(seen_b.started, 0);
    let rb = seen_b.result.unwrap();
    assert_eq!((rb.outcome, rb.exit_code), (Outcome::Cancelled, -1));
    send(
        &mut ws,
        ServerFrame::Cancel {
            command_id: a.clone(),
        },
    )
    .await;
    let ra = collect(&mut ws, &a, true).await.result.unwrap();
    assert_eq!(ra.outcome, Outcome::Cancelled);
    assert_eq!(ra.signal, Some(15));
    agent.abort();
}

#[tokio::test]
async fn a_silent_server_is_dropped_and_redialed() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let mut config = server.config();
    config.heartbeat_secs = 1;
    let agent = server.start(config);
    let (mut ws, _) = server.welcome(&node_id).await;
    // The agent pings every heartbeat (its own 1 s, shorter than the server's 15 s).
    match within("a ping", ws.next()).await {
        Some(Ok(Message::Ping(_))) => {}
        other => panic!("expected a ping, got {other:?}"),
    }
    // From now on the server reads nothing (so sends no pong): after 3 silent heartbeats the
    // agent drops the connection and dials again.
    let silent_since = std::time::Instant::now();
    let (_ws, _) = server.welcome(&node_id).await;
    assert!(silent_since.elapsed() >= Duration::from_secs(2));
    drop(ws);
    agent.abort();
}

/// The real agent binary, SIGKILLed on drop.
struct AgentProcess(std::process::Child);

impl AgentProcess {
    fn start(server: &Server) -> Self {
        let addr = server.listener.local_addr().unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(server.state.path().join("agent.log"))
            .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_fleetrun-agent"))
            .args([
                "--server",
                &format!("http://{addr}"),
                "--insecure-http",
                "--no-imds",
                "--sweep-after",
                "0s",
                "--state-dir",
            ])
            .arg(server.state.path())
            .env("RUST_LOG", "fleetrun_agent=debug")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        AgentProcess(child)
    }

    /// kill -9, and reap it.
    fn kill9(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Live (non-zombie) processes in process group `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    processes_where(2, pgid)
}

/// Live processes whose /proc/PID/stat field `field` (counted after the command's parentheses:
/// 0 state, 2 process group, 3 session) is `id`.
fn processes_where(field: usize, id: i32) -> Vec<i32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > field && f[field] == id.to_string() && !matches!(f[0], "Z" | "X") {
            found.push(pid);
        }
    }
    found
}

/// Waits (bounded) for `cond`, checking every 20 ms: for effects in another process.
async fn eventually(what: &str, cond: impl FnMut() -> bool) {
    eventually_for(what, Duration::from_secs(10), cond).await
}

/// [`eventually`] with its own deadline.
async fn eventually_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + limit;
    while !cond() {
        assert!(
            std::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn read_started_pid(server: &Server, id: &CommandId) -> Option<i32> {
    let path = server
        .state
        .path()
        .join("runs")
        .join(id.as_str())
        .join("started.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    v.get("pid")?.as_i64().and_then(|p| i32::try_from(p).ok())
}

/// Regression test for "Nothing lost": kill -9 of the agent mid-command. After the restart what
/// is left of the command is killed, its unacknowledged output is resent byte-exact from the
/// acknowledged offset, and it ends AgentRestarted; a duplicate Run never runs it again.
#[tokio::test]
async fn nothing_lost_when_the_agent_is_killed_mid_command() {
    const BYTES: u64 = 200_000;
    const ACKED: u64 = 70_000;
    let server = Server::new().await;
    let node_id = server.enrol();
    let counter_dir = tempfile::tempdir().unwrap();
    let counter = counter_dir.path().join("runs");
    let agent = AgentProcess::start(&server);
    let (mut ws, _) = server.welcome(&node_id).await;
    let id = CommandId::from_random(11);
    let script = format!(
        "echo run >> {c}; head -c {BYTES} /dev/zero | tr '\\000' a; echo ready >&2; sleep 1000",
        c = counter.display()
    );
    send(&mut ws, run_req(&id, &script)).await;
    let mut stdout_len = 0u64;
    let mut stderr_seen = Vec::new();
    while stdout_len < BYTES || !stderr_seen.ends_with(b"ready\n") {
        if let AgentFrame::Output {
            stream: StreamId::Output { pipe, .. },
            offset,
            data,
        } = recv(&mut ws).await
        {
            match pipe {
                Pipe::Stdout => {
                    assert_eq!(offset, stdout_len);
                    stdout_len += data.len() as u64;
                }
                Pipe::Stderr => stderr_seen.extend_from_slice(&data),
            }
        }
    }
    let stdout_stream = StreamId::Output {
        command_id: id.clone(),
        pipe: Pipe::Stdout,
    };
    send(
        &mut ws,
        ServerFrame::Ack {
            stream: stdout_stream,
            offset: ACKED,
        },
    )
    .await;
    let run_dir = server.state.path().join("runs").join(id.as_str());
    eventually("the ack to be recorded", || {
        std::fs::read_to_string(run_dir.join("stdout.acked"))
            .is_ok_and(|s| s.trim().parse::<u64>().ok() == Some(ACKED))
    })
    .await;
    let pgid = read_started_pid(&server, &id).expect("started.json with the pid");
    agent.kill9();
    drop(ws);
    assert!(
        !group_members(pgid).is_empty(),
        "the command outlives a kill -9 of the agent"
    );

    let agent = AgentProcess::start(&server);
    let (mut ws, known) = server.welcome(&node_id).await;
    assert_eq!(known, std::slice::from_ref(&id));
    eventually("the leftover group to be killed", || {
        group_members(pgid).is_empty()
    })
    .await;
    let seen = collect(&mut ws, &id, true).await;
    assert_eq!(seen.started, 0);
    assert_eq!(seen.first_offsets, (Some(ACKED), Some(0)));
    assert_eq!(seen.stdout.len() as u64, BYTES - ACKED);
    assert!(seen.stdout.iter().all(|&b| b == b'a'));
    assert_eq!(seen.stderr, b"ready\n");
    let result = seen.result.unwrap();
    assert_eq!(result.outcome, Outcome::AgentRestarted);
    assert_eq!(result.exit_code, -1);
    assert_eq!(
        result.message,
        "the agent stopped while the command ran; its exit status is unknown"
    );
    assert_eq!((result.stdout_bytes, result.stderr_bytes), (BYTES, 6));

    // A duplicate Run while the result is held: not run, the result comes again.
    send(&mut ws, run_req(&id, &script)).await;
    let again = collect(&mut ws, &id, true).await;
    assert_eq!(again.result.unwrap().outcome, Outcome::AgentRestarted);
    send(
        &mut ws,
        ServerFrame::ResultAck {
            command_id: id.clone(),
        },
    )
    .await;
    eventually("the run directory to go", || !run_dir.exists()).await;
    // After ResultAck (completed.log), across another restart: still never again.
    agent.kill9();
    drop(ws);
    let _agent = AgentProcess::start(&server);
    let (mut ws, known) = server.welcome(&node_id).await;
    assert!(known.is_empty(), "{known:?}");
    send(&mut ws, run_req(&id, &script)).await;
    // A barrier: a later command that appends to the same counter.
    let b = CommandId::from_random(12);
    send(
        &mut ws,
        run_req(&b, &format!("echo run >> {}", counter.display())),
    )
    .await;
    let rb = collect(&mut ws, &b, true).await.result.unwrap();
    assert_eq!(rb.exit_code, 0);
    assert_eq!(std::fs::read_to_string(&counter).unwrap(), "run\nrun\n");
    assert!(!run_dir.exists());
}

/// Regression test for "Nothing lost": a result the server never acknowledged is resent, with
/// its output, after a kill -9 of the agent; the command does not run again.
#[tokio::test]
async fn an_unacknowledged_result_is_resent_after_a_restart() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let counter_dir = tempfile::tempdir().unwrap();
    let counter = counter_dir.path().join("runs");
    let agent = AgentProcess::start(&server);
    let (mut ws, _) = server.welcome(&node_id).await;
    let id = CommandId::from_random(13);
    let script = format!("echo run >> {}; echo out; exit 3", counter.display());
    send(&mut ws, run_req(&id, &script)).await;
    let first = collect(&mut ws, &id, false).await;
    let result = first.result.unwrap();
    assert_eq!((result.outcome, result.exit_code), (Outcome::Exited, 3));
    agent.kill9();
    drop(ws);

    let _agent = AgentProcess::start(&server);
    let (mut ws, known) = server.welcome(&node_id).await;
    assert_eq!(known, std::slice::from_ref(&id));
    let again = collect(&mut ws, &id, true).await;
    assert_eq!(again.first_offsets.0, Some(0));
    assert_eq!(again.stdout, b"out\n");
    assert_eq!(again.result.unwrap(), result);
    send(&mut ws, run_req(&id, &script)).await;
    let dup = collect(&mut ws, &id, true).await;
    assert_eq!(dup.result.unwrap(), result);
    assert_eq!(std::fs::read_to_string(&counter).unwrap(), "run\n");
}

/// Accepts a connection as a server of protocol `version` does: the version in the upgrade
/// response's header, then the challenge.
async fn accept_as_version(server: &Server, version: u32) -> Ws {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    let (tcp, _) = within("a connection", server.listener.accept())
        .await
        .unwrap();
    // The callback's type (and its large error) is tungstenite's.
    #[allow(clippy::result_large_err)]
    let named = |_: &Request, mut resp: Response| {
        let value = version.to_string().parse().expect("a header value");
        resp.headers_mut().insert(PROTOCOL_VERSION_HEADER, value);
        Ok(resp)
    };
    let mut ws = tokio_tungstenite::accept_hdr_async(tcp, named)
        .await
        .unwrap();
    let nonce = NONCE.to_vec();
    send(&mut ws, ServerFrame::Challenge { nonce }).await;
    ws
}

/// A refusal that a retry can fix (`HandshakeTimeout`) is retried; a server of another protocol
/// version refusing the `Hello` with `ProtocolVersion` stops the agent with an error naming both
/// versions.
#[tokio::test]
async fn stops_on_a_protocol_version_refusal_and_retries_the_others() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let agent = server.start(server.config());

    let mut ws = accept_as_version(&server, PROTOCOL_VERSION).await;
    assert!(matches!(recv(&mut ws).await, AgentFrame::Hello { .. }));
    let timeout = ServerFrame::error(ErrorCode::HandshakeTimeout, "too slow");
    send(&mut ws, timeout).await;
    drop(ws);

    // It comes back; now a newer server refuses its version.
    let newer = PROTOCOL_VERSION + 1;
    let mut ws = accept_as_version(&server, newer).await;
    match recv(&mut ws).await {
        AgentFrame::Hello {
            protocol_version,
            node_id: n,
            ..
        } => assert_eq!((protocol_version, &n), (PROTOCOL_VERSION, &node_id)),
        other => panic!("expected Hello, got {other:?}"),
    }
    let message =
        format!("agent speaks protocol version {PROTOCOL_VERSION}, this server speaks {newer}");
    send(
        &mut ws,
        ServerFrame::error(ErrorCode::ProtocolVersion, message),
    )
    .await;
    let err = within("the agent to stop", agent)
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    let both = format!(
        "this agent speaks channel protocol version {PROTOCOL_VERSION}, the server version {newer}"
    );
    assert!(err.contains(&both), "{err}");
}

/// A registration the server could not store (`InternalError`) is tried again; a refused
/// activation code stops the agent.
#[tokio::test]
async fn a_registration_is_retried_unless_refused() {
    let server = Server::new().await;
    let mut config = server.config();
    config.activation_code = Some("code-2".into());
    let agent = server.start(config);
    for (code, message) in [
        (
            ErrorCode::InternalError,
            "the server cannot write its database",
        ),
        (
            ErrorCode::InvalidActivation,
            "registration refused: expired",
        ),
    ] {
        let mut ws = server.accept().await;
        match recv(&mut ws).await {
            AgentFrame::Register {
                activation_code, ..
            } => assert_eq!(activation_code, "code-2"),
            other => panic!("expected Register, got {other:?}"),
        }
        send(&mut ws, ServerFrame::error(code, message)).await;
    }
    let err = within("the agent to stop", agent)
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("registration refused by the server (InvalidActivation)"),
        "{err}"
    );
    assert!(identity::load(server.state.path()).unwrap().is_none());
}

// Session streams (protocol version 3): the agent runs `Exec` streams a scripted server opens.

/// An `Exec` stream without a PTY.
fn exec_open(stream: u32, command: &str, window: u64) -> ServerFrame {
    ServerFrame::StreamOpen {
        stream,
        kind: StreamKind::Exec {
            command: command.into(),
            run_as: None,
            env: vec![("GREETING".into(), "hi".into())],
            working_dir: String::new(),
            pty: false,
        },
        window,
    }
}

/// What one stream carried until the agent's `StreamClose`.
#[derive(Debug, Default)]
struct StreamSeen {
    /// Credit the agent granted for input (the first grant says it started).
    input_credit: Vec<u64>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<(i32, Option<i32>)>,
    /// `Some(error)` once closed.
    closed: Option<Option<String>>,
}

/// Reads frames until `stream`'s `StreamClose`, granting back each output frame's bytes when
/// `regrant`; asserts the agent never has more output in flight than `window` plus the grants.
async fn stream_until_close(ws: &mut Ws, stream: u32, window: u64, regrant: bool) -> StreamSeen {
    let mut seen = StreamSeen::default();
    let mut credit = window;
    loop {
        match recv(ws).await {
            AgentFrame::StreamCredit { stream: s, bytes } if s == stream => {
                seen.input_credit.push(bytes);
            }
            AgentFrame::StreamData {
                stream: s,
                fd,
                bytes,
            } if s == stream => {
                assert!(seen.exit.is_none(), "data after the exit");
                let n = bytes.len() as u64;
                assert!(n <= credit, "{n} bytes sent with {credit} of credit");
                credit -= n;
                match fd {
                    StreamFd::Stdout => seen.stdout.extend_from_slice(&bytes),
                    StreamFd::Stderr => seen.stderr.extend_from_slice(&bytes),
                }
                if regrant && n > 0 {
                    credit += n;
                    send(ws, ServerFrame::StreamCredit { stream, bytes: n }).await;
                }
            }
            AgentFrame::StreamExit {
                stream: s,
                code,
                signal,
            } if s == stream => seen.exit = Some((code, signal)),
            AgentFrame::StreamClose { stream: s, error } if s == stream => {
                seen.closed = Some(error);
                return seen;
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn an_exec_stream_carries_stdout_stderr_and_the_exit_code() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let _agent = server.start(server.config());
    let (mut ws, _) = server.welcome(&node_id).await;
    send(
        &mut ws,
        exec_open(1, "echo $GREETING; echo err >&2; exit 3", 65_536),
    )
    .await;
    let seen = stream_until_close(&mut ws, 1, 65_536, false).await;
    assert_eq!(seen.input_credit, [STREAM_WINDOW_BULK]);
    assert_eq!(seen.stdout, b"hi\n");
    assert_eq!(seen.stderr, b"err\n");
    assert_eq!(seen.exit, Some((3, None)));
    assert_eq!(seen.closed, Some(None));
    // The stream is forgotten (servers never reuse a number on a connection; the agent does not
    // rely on it).
    send(&mut ws, exec_open(1, "exit 0", 16)).await;
    let again = stream_until_close(&mut ws, 1, 16, false).await;
    assert_eq!(again.exit, Some((0, None)));
    // Opened twice: the open one ends, with one close that says why; the second never runs.
    send(&mut ws, exec_open(9, "cat", 16)).await;
    send(&mut ws, exec_open(9, "echo second", 16)).await;
    let twice = stream_until_close(&mut ws, 9, 16, false).await;
    assert_eq!(
        twice.closed,
        Some(Some("stream 9 was opened again while open".into()))
    );
    assert!(twice.stdout.is_empty());
    send(&mut ws, exec_open(10, "echo after", 16)).await;
    let after = stream_until_close(&mut ws, 10, 16, false).await;
    assert_eq!(after.stdout, b"after\n");
}

/// An exec stream's pipes are widened to 1 MiB (64 KiB by default), so stdin and output move in
/// fewer wake-ups. Read with F_GETPIPE_SZ (1032) from the child, through python3.
#[tokio::test]
async fn an_exec_streams_pipes_are_widened() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let _agent = server.start(server.config());
    let (mut ws, _) = server.welcome(&node_id).await;
    let probe = "python3 -c 'import fcntl; print(*(fcntl.fcntl(fd, 1032) for fd in (0, 1, 2)))'";
    send(&mut ws, exec_open(1, probe, 65_536)).await;
    let seen = stream_until_close(&mut ws, 1, 65_536, false).await;
    assert_eq!(
        String::from_utf8_lossy(&seen.stdout),
        "1048576 1048576 1048576\n",
        "stderr: {}",
        String::from_utf8_lossy(&seen.stderr)
    );
    assert_eq!(seen.exit, Some((0, None)));
}

#[tokio::test]
async fn stdin_is_piped_byte_exact_within_small_windows() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let _agent = server.start(server.config());
    let (ws, _) = server.welcome(&node_id).await;
    let (mut sink, mut source) = ws.split();
    // A small output window: cat blocks on stdout, so stdin backs up and the agent's input credit
    // is what paces the sender.
    const WINDOW: u64 = 8 * 1024;
    let input: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<ServerFrame>();
    let writer = tokio::spawn(async move {
        while let Some(f) = out_rx.recv().await {
            sink.send(Message::Binary(f.encode().into())).await.unwrap();
        }
    });
    out_tx.send(exec_open(7, "cat", WINDOW)).unwrap();
    // The feeder sends input within the agent's input credit, then EOF.
    let (credit_tx, mut credit_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let feed_out = out_tx.clone();
    let data = input.clone();
    let feeder = tokio::spawn(async move {
        let mut credit = 0u64;
        let mut sent = 0usize;
        while sent < data.len() {
            while credit == 0 {
                credit += credit_rx.recv().await.expect("input credit");
            }
            while let Ok(more) = credit_rx.try_recv() {
                credit += more;
            }
            let n = (data.len() - sent).min(40_000).min(credit as usize);
            let bytes = data[sent..sent + n].to_vec();
            feed_out
                .send(ServerFrame::StreamData { stream: 7, bytes })
                .unwrap();
            sent += n;
            credit -= n as u64;
        }
        feed_out.send(ServerFrame::StreamEof { stream: 7 }).unwrap();
    });
    let mut output = Vec::new();
    let mut credit = WINDOW;
    let mut exit = None;
    loop {
        let msg = within("a frame", source.next()).await;
        let frame = match msg {
            Some(Ok(Message::Binary(b))) => AgentFrame::decode(&b).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a frame, got {other:?}"),
        };
        match frame {
            AgentFrame::StreamCredit { stream: 7, bytes } => {
                // The feeder is gone once it has sent everything.
                let _ = credit_tx.send(bytes);
            }
            AgentFrame::StreamData {
                stream: 7,
                fd: StreamFd::Stdout,
                bytes,
            } => {
                let n = bytes.len() as u64;
                // Never more in flight than granted.
                assert!(n > 0 && n <= credit, "{n} bytes with {credit} of credit");
                credit -= n;
                output.extend_from_slice(&bytes);
                // Grant back in small steps, as a slow reader would.
                credit += n;
                out_tx
                    .send(ServerFrame::StreamCredit {
                        stream: 7,
                        bytes: n,
                    })
                    .unwrap();
            }
            AgentFrame::StreamExit {
                stream: 7, code, ..
            } => exit = Some(code),
            AgentFrame::StreamClose { stream: 7, error } => {
                assert_eq!(error, None);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    within("the feeder", feeder).await.unwrap();
    assert_eq!(exit, Some(0));
    assert_eq!(output.len(), input.len());
    assert!(output == input, "the output differs from the input");
    drop(out_tx);
    writer.abort();
}

/// The process group id a stream's shell printed first (`echo $$`).
fn printed_pgid(stdout: &[u8]) -> i32 {
    let text = String::from_utf8_lossy(stdout);
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {text:?}"))
}

/// Reads `stream`'s output until it holds a line.
async fn first_line(ws: &mut Ws, stream: u32) -> Vec<u8> {
    let mut out = Vec::new();
    while !out.contains(&b'\n') {
        match recv(ws).await {
            AgentFrame::StreamData {
                stream: s, bytes, ..
            } if s == stream => out.extend_from_slice(&bytes),
            AgentFrame::StreamClose { stream: s, error } if s == stream => {
                panic!("stream {s} closed early: {error:?}")
            }
            _ => {}
        }
    }
    out
}

#[tokio::test]
async fn a_hang_up_a_lost_connection_or_a_stopped_agent_kills_the_process_group() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let mut config = server.config();
    config.kill_grace = Duration::from_millis(500);
    let agent = server.start(config);
    let (mut ws, _) = server.welcome(&node_id).await;
    // A child that ignores stdin EOF and outlives nothing on its own.
    let script = "sleep 100 & echo $$; wait";
    send(&mut ws, exec_open(1, script, 65_536)).await;
    let pgid = printed_pgid(&first_line(&mut ws, 1).await);
    assert!(
        group_members(pgid).len() >= 2,
        "sh and sleep run in group {pgid}"
    );
    send(
        &mut ws,
        ServerFrame::StreamClose {
            stream: 1,
            reason: "client gone".into(),
        },
    )
    .await;
    let seen = stream_until_close(&mut ws, 1, 65_536, false).await;
    assert_eq!(seen.closed, Some(None));
    assert_eq!(seen.exit.map(|e| e.1), Some(Some(15)), "{seen:?}");
    eventually("the group to be gone", || group_members(pgid).is_empty()).await;

    // The connection drops with a stream open: its group goes too.
    send(&mut ws, exec_open(2, script, 65_536)).await;
    let pgid = printed_pgid(&first_line(&mut ws, 2).await);
    assert!(!group_members(pgid).is_empty());
    drop(ws);
    eventually("the second group to be gone", || {
        group_members(pgid).is_empty()
    })
    .await;
    // The agent comes back and serves streams again.
    let (mut ws, _) = server.welcome(&node_id).await;
    send(&mut ws, exec_open(2, "echo back", 65_536)).await;
    let seen = stream_until_close(&mut ws, 2, 65_536, false).await;
    assert_eq!(seen.stdout, b"back\n");

    // The agent stops (its future dropped, as `fleetrun dev` does): no stream outlives it.
    send(&mut ws, exec_open(3, script, 65_536)).await;
    let pgid = printed_pgid(&first_line(&mut ws, 3).await);
    assert!(!group_members(pgid).is_empty());
    agent.abort();
    eventually("the third group to be gone", || {
        group_members(pgid).is_empty()
    })
    .await;
}

/// `--max-streams` counts the streams of a lost connection until they have stopped: one whose
/// process ignores SIGTERM holds its place through the kill grace, then frees it.
#[tokio::test]
async fn streams_of_a_lost_connection_count_until_they_stop() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let mut config = server.config();
    config.max_streams = 1;
    config.kill_grace = Duration::from_secs(3);
    let _agent = server.start(config);
    let (mut ws, _) = server.welcome(&node_id).await;
    let script = "trap '' TERM HUP; echo $$; sleep 100";
    send(&mut ws, exec_open(1, script, 65_536)).await;
    let pgid = printed_pgid(&first_line(&mut ws, 1).await);
    drop(ws);
    let (mut ws, _) = server.welcome(&node_id).await;
    // The old stream's process is still in its kill grace: no room yet.
    assert!(!group_members(pgid).is_empty());
    send(&mut ws, exec_open(1, "echo early", 65_536)).await;
    let capped = stream_until_close(&mut ws, 1, 65_536, false).await;
    let error = capped.closed.flatten().unwrap_or_default();
    assert!(error.contains("too many session streams"), "{error}");
    eventually("the lost stream's group to be killed", || {
        group_members(pgid).is_empty()
    })
    .await;
    // Killed, its task ends at once after: then the place is free.
    let mut seen = None;
    for attempt in 2..50 {
        send(&mut ws, exec_open(attempt, "echo back", 65_536)).await;
        let s = stream_until_close(&mut ws, attempt, 65_536, false).await;
        if s.stdout == b"back\n" {
            seen = Some(s);
            break;
        }
        let error = s.closed.flatten().unwrap_or_default();
        assert!(error.contains("too many session streams"), "{error}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen.is_some(), "the place was never freed");
}

#[tokio::test]
async fn bad_stream_frames_are_refused_without_a_crash() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let mut config = server.config();
    config.max_streams = 2;
    config.kill_grace = Duration::from_millis(200);
    let _agent = server.start(config);
    let (mut ws, _) = server.welcome(&node_id).await;
    send(&mut ws, exec_open(1, "cat", 65_536)).await;
    // Reads no input: the agent's input credit is not given back.
    send(&mut ws, exec_open(2, "sleep 100", 65_536)).await;
    send(&mut ws, exec_open(3, "echo never", 65_536)).await;
    let refused = stream_until_close(&mut ws, 3, 65_536, false).await;
    let error = refused.closed.flatten().unwrap_or_default();
    assert!(
        error.contains("too many session streams: this agent runs at most 2"),
        "{error}"
    );
    assert!(refused.exit.is_none() && refused.stdout.is_empty());

    // Data for a stream that does not exist.
    send(
        &mut ws,
        ServerFrame::StreamData {
            stream: 99,
            bytes: b"x".to_vec(),
        },
    )
    .await;
    let unknown = stream_until_close(&mut ws, 99, 0, false).await;
    let error = unknown.closed.flatten().unwrap_or_default();
    assert!(error.contains("unknown session stream 99"), "{error}");

    // A PTY is a Shell stream, never an Exec.
    let pty = ServerFrame::StreamOpen {
        stream: 4,
        kind: StreamKind::Exec {
            command: "true".into(),
            run_as: None,
            env: vec![],
            working_dir: String::new(),
            pty: true,
        },
        window: 1,
    };
    send(&mut ws, pty).await;
    let refused = stream_until_close(&mut ws, 4, 0, false).await;
    let error = refused.closed.flatten().unwrap_or_default();
    assert!(
        error.contains("PTY streams are not supported as Exec"),
        "{error}"
    );

    // Past the input credit: stream 2's stdin is never read, so its whole window is used up
    // by full frames (no credit comes back) and the next byte overruns it.
    let full = vec![0u8; STREAM_FRAME_MAX];
    let frames = STREAM_WINDOW_BULK as usize / STREAM_FRAME_MAX;
    for _ in 0..frames {
        let bytes = full.clone();
        send(&mut ws, ServerFrame::StreamData { stream: 2, bytes }).await;
    }
    let bytes = vec![1];
    send(&mut ws, ServerFrame::StreamData { stream: 2, bytes }).await;
    let overrun = stream_until_close(&mut ws, 2, 65_536, false).await;
    let error = overrun.closed.flatten().unwrap_or_default();
    assert!(error.contains("only 0 bytes of credit"), "{error}");

    // Stream 1 is untouched and the agent still serves it.
    let bytes = b"still here\n".to_vec();
    send(&mut ws, ServerFrame::StreamData { stream: 1, bytes }).await;
    send(&mut ws, ServerFrame::StreamEof { stream: 1 }).await;
    let cat = stream_until_close(&mut ws, 1, 65_536, false).await;
    assert_eq!(cat.stdout, b"still here\n");
    assert_eq!(cat.exit, Some((0, None)));

    // A working directory that is not one (a slot is free again now).
    let nowhere = ServerFrame::StreamOpen {
        stream: 5,
        kind: StreamKind::Exec {
            command: "true".into(),
            run_as: None,
            env: vec![],
            working_dir: "/no/such/dir".into(),
            pty: false,
        },
        window: 1,
    };
    send(&mut ws, nowhere).await;
    let refused = stream_until_close(&mut ws, 5, 0, false).await;
    let error = refused.closed.flatten().unwrap_or_default();
    assert!(error.contains("working directory /no/such/dir"), "{error}");
    assert!(refused.exit.is_none());
}

#[tokio::test]
async fn a_stream_out_of_credit_holds_up_nothing_else() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let _agent = server.start(server.config());
    let (mut ws, _) = server.welcome(&node_id).await;
    // `yes` writes without end; the server grants 4 KiB and never more.
    const WINDOW: u64 = 4096;
    send(&mut ws, exec_open(1, "yes", WINDOW)).await;
    let id = CommandId::from_random(77);
    send(&mut ws, run_req(&id, "echo out; echo err >&2")).await;
    let mut streamed = 0u64;
    let mut stdout = Vec::new();
    let result = loop {
        match recv(&mut ws).await {
            AgentFrame::StreamData {
                stream: 1, bytes, ..
            } => {
                streamed += bytes.len() as u64;
                assert!(
                    streamed <= WINDOW,
                    "{streamed} bytes past a {WINDOW} window"
                );
            }
            AgentFrame::Output {
                stream: StreamId::Output { command_id, pipe },
                data,
                ..
            } if command_id == id && pipe == Pipe::Stdout => stdout.extend_from_slice(&data),
            AgentFrame::Finished { command_id, result } if command_id == id => break result,
            _ => {}
        }
    };
    // The command ran and reported while the stream waited for credit.
    assert_eq!(result.exit_code, 0);
    assert_eq!(stdout, b"out\n");
    // More credit: the stream moves again, exactly as far as granted.
    send(
        &mut ws,
        ServerFrame::StreamCredit {
            stream: 1,
            bytes: WINDOW,
        },
    )
    .await;
    while streamed < 2 * WINDOW {
        if let AgentFrame::StreamData {
            stream: 1, bytes, ..
        } = recv(&mut ws).await
        {
            streamed += bytes.len() as u64;
        }
    }
    assert_eq!(streamed, 2 * WINDOW);
    send(
        &mut ws,
        ServerFrame::StreamClose {
            stream: 1,
            reason: "done".into(),
        },
    )
    .await;
    let seen = stream_until_close(&mut ws, 1, 0, false).await;
    assert!(
        seen.stdout.is_empty(),
        "no data past the credit after the hang-up"
    );
    assert_eq!(seen.closed, Some(None));
}

/// An `Exec` stream as `run_as` (the tests run as root, as the exec tests do).
fn exec_as(stream: u32, command: &str, user: &str) -> ServerFrame {
    ServerFrame::StreamOpen {
        stream,
        kind: StreamKind::Exec {
            command: command.into(),
            run_as: Some(user.into()),
            env: vec![],
            working_dir: String::new(),
            pty: false,
        },
        window: 65_536,
    }
}

#[tokio::test]
async fn an_exec_stream_runs_as_another_user() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let _agent = server.start(server.config());
    let (mut ws, _) = server.welcome(&node_id).await;
    let script = "id -u; echo \"$USER $LOGNAME $HOME\"; pwd";
    send(&mut ws, exec_as(1, script, "nobody")).await;
    let seen = stream_until_close(&mut ws, 1, 65_536, false).await;
    let out = String::from_utf8(seen.stdout).unwrap();
    // nobody's home does not exist: the stream starts in /.
    assert_eq!(out, "65534\nnobody nobody /nonexistent\n/\n");
    assert_eq!(seen.exit, Some((0, None)));
    send(&mut ws, exec_as(2, "echo never", "fleetrun-no-such-user")).await;
    let refused = stream_until_close(&mut ws, 2, 65_536, false).await;
    assert_eq!(
        refused.closed,
        Some(Some("no such user fleetrun-no-such-user".into()))
    );
    assert!(refused.exit.is_none() && refused.input_credit.is_empty());
}

// PTY shells (protocol version 4): `Shell` streams on a real PTY.

/// A `Shell` stream of `rows` x `cols`: the login shell, or `command` by its `-c`.
fn shell_open(stream: u32, command: Option<&str>, rows: u16, cols: u16) -> ServerFrame {
    ServerFrame::StreamOpen {
        stream,
        kind: StreamKind::Shell {
            command: command.map(str::to_owned),
            run_as: None,
            term: "xterm-256color".into(),
            rows,
            cols,
            env: vec![("GREETING".into(), "hi".into())],
        },
        window: 65_536,
    }
}

/// Reads `stream`'s output (granting each frame back) until it holds `needle`; all of it so far.
async fn output_until(ws: &mut Ws, stream: u32, needle: &str) -> String {
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains(needle) {
        match recv(ws).await {
            AgentFrame::StreamData {
                stream: s,
                fd,
                bytes,
            } if s == stream => {
                assert_eq!(fd, StreamFd::Stdout, "a PTY has one output");
                let n = bytes.len() as u64;
                out.extend_from_slice(&bytes);
                send(ws, ServerFrame::StreamCredit { stream, bytes: n }).await;
            }
            AgentFrame::StreamClose { stream: s, error } if s == stream => panic!(
                "stream {s} closed before {needle:?} ({error:?}): {}",
                String::from_utf8_lossy(&out)
            ),
            _ => {}
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Types `keys` into a stream's terminal.
async fn type_keys(ws: &mut Ws, stream: u32, keys: &str) {
    let bytes = keys.as_bytes().to_vec();
    send(ws, ServerFrame::StreamData { stream, bytes }).await;
}

/// The pid a shell printed as `pid=N.` (the last one in `out`).
fn printed_pid(out: &str) -> i32 {
    out.rsplit_once("pid=")
        .and_then(|(_, rest)| rest.split_once('.'))
        .and_then(|(pid, _)| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {out:?}"))
}

/// Live processes of session `sid`.
fn session_members(sid: i32) -> Vec<i32> {
    processes_where(3, sid)
}

/// `SHELL -c` on a PTY of the size asked for, with TERM and the extra variables; the exit status
/// is the command's.
#[tokio::test]
async fn a_shell_command_runs_on_a_pty_of_the_size_asked_for() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let _agent = server.start(server.config());
    let (mut ws, _) = server.welcome(&node_id).await;
    let script =
        "tty; stty size; echo \"$TERM $GREETING\"; [ -t 0 ] && echo stdin-is-a-tty; exit 3";
    send(&mut ws, shell_open(1, Some(script), 30, 100)).await;
    let seen = stream_until_close(&mut ws, 1, 65_536, true).await;
    let out = String::from_utf8_lossy(&seen.stdout);
    assert!(out.contains("/dev/pts/"), "{out}");
    // A terminal's output: lines end in CR LF.
    assert!(out.contains("30 100\r\n"), "{out}");
    assert!(out.contains("xterm-256color hi"), "{out}");
    assert!(out.contains("stdin-is-a-tty"), "{out}");
    assert!(seen.stderr.is_empty(), "a PTY has no separate stderr");
    assert_eq!(seen.input_credit.first(), Some(&STREAM_WINDOW_BULK));
    assert_eq!(seen.exit, Some((3, None)));
    assert_eq!(seen.closed, Some(None));
}

/// The interactive login shell: lines typed run in one shell (state persists), a resize is seen
/// by `stty size`, Ctrl-C stops the foreground job and not the shell, and `exit N` ends the
/// stream with N.
#[tokio::test]
async fn an_interactive_shell_keeps_state_takes_resizes_and_ctrl_c() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let _agent = server.start(server.config());
    let (mut ws, _) = server.welcome(&node_id).await;
    send(&mut ws, shell_open(1, None, 24, 80)).await;
    // A login shell: argv[0] begins with '-'.
    type_keys(&mut ws, 1, "echo \"arg0=$0\"; cd /tmp; X=$((6*7))\n").await;
    let out = output_until(&mut ws, 1, "arg0=-").await;
    assert!(!out.contains("arg0=-c"), "{out}");
    type_keys(&mut ws, 1, "echo \"at $(pwd) x=$X\"\n").await;
    output_until(&mut ws, 1, "at /tmp x=42").await;
    send(
        &mut ws,
        ServerFrame::StreamResize {
            stream: 1,
            rows: 40,
            cols: 132,
        },
    )
    .await;
    type_keys(&mut ws, 1, "stty size\n").await;
    output_until(&mut ws, 1, "40 132").await;
    // Ctrl-C reaches the foreground job through the terminal (once it runs: a Ctrl-C typed
    // ahead flushes what was typed before it, as on any terminal).
    type_keys(
        &mut ws,
        1,
        "echo \"pid=$$.\"; sleep 100; echo not-interrupted\n",
    )
    .await;
    let out = output_until(&mut ws, 1, ".\r\n").await;
    let sid = printed_pid(&out);
    eventually("the sleep to run", || {
        session_members(sid).iter().any(|p| {
            std::fs::read(format!("/proc/{p}/cmdline")).ok() == Some(b"sleep\x00100\x00".to_vec())
        })
    })
    .await;
    type_keys(&mut ws, 1, "\x03").await;
    // The prompt after the ^C: the shell reads again.
    let out = output_until(&mut ws, 1, "^C").await;
    let prompt = out
        .rsplit_once("^C")
        .map(|(_, r)| r.to_owned())
        .unwrap_or_default();
    if !prompt.contains("# ") {
        output_until(&mut ws, 1, "# ").await;
    }
    type_keys(&mut ws, 1, "echo still-$((1+1))\n").await;
    let out = output_until(&mut ws, 1, "still-2").await;
    assert!(!out.contains("not-interrupted\r\n"), "{out}");
    type_keys(&mut ws, 1, "exit 7\n").await;
    let seen = stream_until_close(&mut ws, 1, 65_536, true).await;
    assert_eq!(seen.exit, Some((7, None)), "{seen:?}");
    assert_eq!(seen.closed, Some(None));
}

/// A hang-up (the server's close, a lost connection) leaves nothing of the shell's session but
/// what was detached on purpose (nohup); a background job holding the terminal after `exit` does
/// not keep the stream open.
#[tokio::test]
async fn a_hang_up_ends_the_shell_and_its_jobs_but_not_nohup() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let mut config = server.config();
    config.kill_grace = Duration::from_millis(500);
    let _agent = server.start(config);
    let (mut ws, _) = server.welcome(&node_id).await;
    send(&mut ws, shell_open(1, None, 24, 80)).await;
    let keys = "nohup sleep 103 >/dev/null 2>&1 & sleep 101 & echo \"pid=$$.\"; sleep 102\n";
    type_keys(&mut ws, 1, keys).await;
    let out = output_until(&mut ws, 1, ".\r\n").await;
    let sid = printed_pid(&out);
    // The shell, the nohup'd sleep, the background sleep and the foreground one; the nohup'd one
    // must have exec'd sleep (nohup ignores SIGHUP just before: a hang-up sooner, under load, once
    // killed it with the rest).
    let cmdline = |p: &i32| std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
    eventually("the jobs to run", || {
        let members = session_members(sid);
        members.len() >= 4 && members.iter().any(|p| cmdline(p) == b"sleep\x00103\x00")
    })
    .await;
    send(
        &mut ws,
        ServerFrame::StreamClose {
            stream: 1,
            reason: "client gone".into(),
        },
    )
    .await;
    let seen = stream_until_close(&mut ws, 1, 65_536, true).await;
    assert_eq!(seen.closed, Some(None));
    assert!(seen.exit.is_some(), "{seen:?}");
    // Long: a login shell's rc files may start helpers in the session that wait on a lock
    // another test's shell holds (pyenv's rehash lock waits up to 60 s).
    let left_over = || {
        session_members(sid)
            .iter()
            .map(|p| {
                String::from_utf8_lossy(
                    &std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default(),
                )
                .replace('\0', " ")
            })
            .collect::<Vec<_>>()
    };
    eventually_for(
        "only the nohup'd job to be left",
        Duration::from_secs(75),
        || {
            let left = session_members(sid).len() == 1;
            if !left {
                eprintln!("still in the session: {:?}", left_over());
            }
            left
        },
    )
    .await;
    let left = session_members(sid);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", left[0])).unwrap_or_default();
    assert_eq!(cmdline, b"sleep\x00103\x00");
    // SAFETY: kill(2) on a pid this test started (through the agent).
    unsafe { libc::kill(left[0], libc::SIGKILL) };

    // `exit` with a background job that still holds the terminal: the stream ends anyway.
    send(&mut ws, shell_open(2, None, 24, 80)).await;
    type_keys(&mut ws, 2, "sleep 104 & echo \"bg=$!.\"; exit 5\n").await;
    let seen = within(
        "the stream to end despite the job",
        stream_until_close(&mut ws, 2, 65_536, true),
    )
    .await;
    assert_eq!(seen.exit, Some((5, None)), "{seen:?}");
    let out = String::from_utf8_lossy(&seen.stdout);
    if let Some(bg) = out
        .rsplit_once("bg=")
        .and_then(|(_, r)| r.split_once('.'))
        .and_then(|(p, _)| p.parse::<i32>().ok())
    {
        // SAFETY: as above.
        unsafe { libc::kill(bg, libc::SIGKILL) };
    }

    // The connection drops with a shell open: its session goes.
    send(&mut ws, shell_open(3, None, 24, 80)).await;
    type_keys(&mut ws, 3, "echo \"pid=$$.\"; sleep 105\n").await;
    let out = output_until(&mut ws, 3, ".\r\n").await;
    let sid = printed_pid(&out);
    eventually("the sleep to run", || session_members(sid).len() >= 2).await;
    drop(ws);
    eventually("the session to be gone", || session_members(sid).is_empty()).await;
}

/// Bad resizes break only their stream, a resize of an `Exec` is ignored, shells count toward
/// `--max-streams`, and a run-as user gets the login shell of passwd on a terminal it owns.
#[tokio::test]
async fn shell_streams_refuse_bad_frames_and_count_toward_the_cap() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let mut config = server.config();
    config.max_streams = 2;
    config.kill_grace = Duration::from_millis(200);
    let _agent = server.start(config);
    let (mut ws, _) = server.welcome(&node_id).await;
    // Commands, not login shells: a login shell hung up while its profile runs can leave the
    // profile's own lock files behind (pyenv's rehash lock, on this machine kind).
    send(&mut ws, shell_open(1, Some("sleep 100"), 24, 80)).await;
    send(&mut ws, exec_open(2, "cat", 65_536)).await;
    send(&mut ws, shell_open(3, Some("sleep 100"), 24, 80)).await;
    let refused = stream_until_close(&mut ws, 3, 65_536, false).await;
    let error = refused.closed.flatten().unwrap_or_default();
    assert!(error.contains("too many session streams"), "{error}");

    // A resize of an Exec is ignored; of an unknown stream too.
    for stream in [2, 77] {
        let resize = ServerFrame::StreamResize {
            stream,
            rows: 10,
            cols: 10,
        };
        send(&mut ws, resize).await;
    }
    let bytes = b"cat is fine\n".to_vec();
    send(&mut ws, ServerFrame::StreamData { stream: 2, bytes }).await;
    send(&mut ws, ServerFrame::StreamEof { stream: 2 }).await;
    let cat = stream_until_close(&mut ws, 2, 65_536, true).await;
    assert_eq!(cat.stdout, b"cat is fine\n");

    // A size out of bounds breaks the shell's stream, with why.
    let bad = ServerFrame::StreamResize {
        stream: 1,
        rows: 0,
        cols: 80,
    };
    send(&mut ws, bad).await;
    let broken = stream_until_close(&mut ws, 1, 65_536, true).await;
    let error = broken.closed.flatten().unwrap_or_default();
    assert!(
        error.starts_with("bad resize: a window of 0 rows"),
        "{error}"
    );

    // A bad TERM or window at the open is refused before anything runs.
    let mut open = shell_open(4, Some("true"), 24, 80);
    if let ServerFrame::StreamOpen {
        kind: StreamKind::Shell { term, .. },
        ..
    } = &mut open
    {
        *term = "xterm; rm -rf /".into();
    }
    send(&mut ws, open).await;
    let refused = stream_until_close(&mut ws, 4, 0, false).await;
    let error = refused.closed.flatten().unwrap_or_default();
    assert!(error.starts_with("bad stream: bad TERM"), "{error}");

    // nobody's login shell is nologin (from passwd): it refuses, as on a real login.
    let open = ServerFrame::StreamOpen {
        stream: 5,
        kind: StreamKind::Shell {
            command: Some("id -u".into()),
            run_as: Some("nobody".into()),
            term: "xterm".into(),
            rows: 24,
            cols: 80,
            env: vec![],
        },
        window: 65_536,
    };
    send(&mut ws, open).await;
    let seen = stream_until_close(&mut ws, 5, 65_536, true).await;
    let out = String::from_utf8_lossy(&seen.stdout);
    assert!(out.contains("not available"), "{out}");
    assert_eq!(seen.exit, Some((1, None)), "{seen:?}");
}

// Tcp streams (protocol version 4): the agent connects from the node and relays both ways.

fn tcp_open(stream: u32, host: &str, port: u16, window: u64) -> ServerFrame {
    ServerFrame::StreamOpen {
        stream,
        kind: StreamKind::Tcp {
            host: host.into(),
            port,
        },
        window,
    }
}

/// A port on loopback that nothing listens on (bound, then closed).
async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// Bytes that no line handling would leave alone.
fn noise(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// The peer reads until our half-close, answers with what it got reversed and closes: input is
/// written byte-exact within the agent's credit, `StreamEof` half-closes and the agent keeps
/// reading, the peer's close ends the stream after its last bytes with no exit status.
#[tokio::test]
async fn a_tcp_stream_relays_both_ways_and_half_closes() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let _agent = server.start(server.config());
    let (ws, _) = server.welcome(&node_id).await;
    let peer = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = peer.local_addr().unwrap().port();
    let peer_task = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut s, _) = peer.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got.reverse();
        s.write_all(&got).await.unwrap();
        got.len()
    });
    let (mut sink, mut source) = ws.split();
    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<ServerFrame>();
    let writer = tokio::spawn(async move {
        while let Some(f) = out_rx.recv().await {
            sink.send(Message::Binary(f.encode().into())).await.unwrap();
        }
    });
    const WINDOW: u64 = 64 * 1024;
    out_tx.send(tcp_open(3, "localhost", port, WINDOW)).unwrap();
    let input = noise(3 * 1024 * 1024 + 17, 1);
    let (credit_tx, mut credit_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let feed_out = out_tx.clone();
    let data = input.clone();
    let feeder = tokio::spawn(async move {
        let (mut credit, mut sent) = (0u64, 0usize);
        while sent < data.len() {
            while credit == 0 {
                credit += credit_rx.recv().await.expect("input credit");
            }
            let n = (data.len() - sent)
                .min(STREAM_FRAME_MAX)
                .min(credit as usize);
            let bytes = data[sent..sent + n].to_vec();
            feed_out
                .send(ServerFrame::StreamData { stream: 3, bytes })
                .unwrap();
            sent += n;
            credit -= n as u64;
        }
        feed_out.send(ServerFrame::StreamEof { stream: 3 }).unwrap();
    });
    let mut output = Vec::new();
    // Each frame's bytes are granted back at once: never more than the window in flight.
    let credit = WINDOW;
    loop {
        let frame = match within("a frame", source.next()).await {
            Some(Ok(Message::Binary(b))) => AgentFrame::decode(&b).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a frame, got {other:?}"),
        };
        match frame {
            AgentFrame::StreamCredit { stream: 3, bytes } => {
                let _ = credit_tx.send(bytes);
            }
            AgentFrame::StreamData {
                stream: 3,
                fd: StreamFd::Stdout,
                bytes,
            } => {
                let n = bytes.len() as u64;
                assert!(n > 0 && n <= credit, "{n} bytes with {credit} of credit");
                output.extend_from_slice(&bytes);
                out_tx
                    .send(ServerFrame::StreamCredit {
                        stream: 3,
                        bytes: n,
                    })
                    .unwrap();
            }
            AgentFrame::StreamClose { stream: 3, error } => {
                assert_eq!(error, None);
                break;
            }
            other => panic!("unexpected {other:?} (a Tcp stream has no exit status)"),
        }
    }
    within("the feeder", feeder).await.unwrap();
    assert_eq!(within("the peer", peer_task).await.unwrap(), input.len());
    let mut expected = input;
    expected.reverse();
    assert_eq!(output.len(), expected.len());
    assert!(output == expected, "the bytes differ");
    drop(out_tx);
    writer.abort();
}

/// A refused connection and an unknown host end the stream with an error naming host, port and
/// why; a server's hang-up closes the socket (the peer reads its end); Tcp streams count toward
/// `--max-streams`.
#[tokio::test]
async fn tcp_streams_that_fail_or_are_hung_up_say_why_and_close_the_socket() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let mut config = server.config();
    config.max_streams = 1;
    let _agent = server.start(config);
    let (mut ws, _) = server.welcome(&node_id).await;
    let port = closed_port().await;
    send(&mut ws, tcp_open(1, "127.0.0.1", port, 1024)).await;
    let refused = stream_until_close(&mut ws, 1, 1024, false).await;
    let error = refused.closed.flatten().unwrap_or_default();
    assert!(
        error.starts_with(&format!("cannot connect to 127.0.0.1:{port}: ")),
        "{error}"
    );
    assert!(error.to_lowercase().contains("refused"), "{error}");
    assert!(refused.input_credit.is_empty() && refused.exit.is_none());

    send(&mut ws, tcp_open(2, "no-such-host.invalid", 80, 1024)).await;
    let unknown = stream_until_close(&mut ws, 2, 1024, false).await;
    let error = unknown.closed.flatten().unwrap_or_default();
    assert!(
        error.starts_with("cannot connect to no-such-host.invalid:80: "),
        "{error}"
    );

    let peer = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = peer.local_addr().unwrap().port();
    send(&mut ws, tcp_open(3, "127.0.0.1", port, 1024)).await;
    let (mut conn, _) = within("the agent's connection", peer.accept())
        .await
        .unwrap();
    // Connected: the first grant. A second stream is past the cap of one.
    match recv(&mut ws).await {
        AgentFrame::StreamCredit { stream: 3, bytes } => assert_eq!(bytes, STREAM_WINDOW_DEFAULT),
        other => panic!("expected the first credit, got {other:?}"),
    }
    send(&mut ws, tcp_open(4, "127.0.0.1", port, 1024)).await;
    let capped = stream_until_close(&mut ws, 4, 1024, false).await;
    let error = capped.closed.flatten().unwrap_or_default();
    assert!(error.contains("too many session streams"), "{error}");
    send(
        &mut ws,
        ServerFrame::StreamClose {
            stream: 3,
            reason: "client gone".into(),
        },
    )
    .await;
    let seen = stream_until_close(&mut ws, 3, 1024, false).await;
    assert_eq!(seen.closed, Some(None));
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    let n = within("the socket's close", conn.read_to_end(&mut rest))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "the peer read {rest:?} and then the close");
}

// File transfers (protocol version 5): `FilePut` and `FileGet` streams.

fn sha_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

fn put_open(
    stream: u32,
    path: &std::path::Path,
    data: &[u8],
    mode: Option<u32>,
    resume: bool,
) -> ServerFrame {
    ServerFrame::StreamOpen {
        stream,
        kind: StreamKind::FilePut {
            path: path.to_str().unwrap().into(),
            mode,
            owner: None,
            group: None,
            size: data.len() as u64,
            sha256: sha_hex(data),
            resume,
            parents: false,
        },
        window: 65_536,
    }
}

/// What a file stream carried until its `StreamClose`.
#[derive(Debug, Default)]
struct FileSeen {
    /// `StreamFileInfo`'s offset, size and mode.
    info: Option<(u64, u64, u32)>,
    data: Vec<u8>,
    done: Option<String>,
    closed: Option<Option<String>>,
}

/// Drives a put: waits for the agent's offset, sends `data` from it within the credit (only the
/// first `cut_at` bytes of the file, then a hang-up, when given; `extra` bytes past the end when
/// given), then the end of input; reads until the agent's `StreamClose`.
async fn drive_put(
    ws: &mut Ws,
    stream: u32,
    data: &[u8],
    cut_at: Option<usize>,
    extra: usize,
) -> FileSeen {
    let mut seen = FileSeen::default();
    let mut credit = 0u64;
    let mut sent: Option<usize> = None;
    let mut body = data.to_vec();
    body.extend(std::iter::repeat_n(7u8, extra));
    let end = cut_at.unwrap_or(body.len());
    let mut finished = false;
    loop {
        if let Some(pos) = sent.as_mut() {
            while credit > 0 && *pos < end {
                let n = (end - *pos).min(STREAM_FRAME_MAX).min(credit as usize);
                let bytes = body[*pos..*pos + n].to_vec();
                send(ws, ServerFrame::StreamData { stream, bytes }).await;
                *pos += n;
                credit -= n as u64;
            }
            if *pos == end && !finished {
                finished = true;
                if cut_at.is_some() {
                    let reason = "the client left".into();
                    send(ws, ServerFrame::StreamClose { stream, reason }).await;
                } else {
                    send(ws, ServerFrame::StreamEof { stream }).await;
                }
            }
        }
        match recv(ws).await {
            AgentFrame::StreamFileInfo {
                stream: s,
                offset,
                size,
                mode,
            } if s == stream => {
                seen.info = Some((offset, size, mode));
                sent = Some(usize::try_from(offset).unwrap());
            }
            AgentFrame::StreamCredit { stream: s, bytes } if s == stream => credit += bytes,
            AgentFrame::StreamFileDone { stream: s, sha256 } if s == stream => {
                seen.done = Some(sha256)
            }
            AgentFrame::StreamClose { stream: s, error } if s == stream => {
                seen.closed = Some(error);
                return seen;
            }
            _ => {}
        }
    }
}

/// Reads a get's frames until its close, granting back each frame's bytes.
async fn drive_get(
    ws: &mut Ws,
    stream: u32,
    path: &std::path::Path,
    offset: u64,
    window: u64,
) -> FileSeen {
    let kind = StreamKind::FileGet {
        path: path.to_str().unwrap().into(),
        offset,
    };
    send(
        ws,
        ServerFrame::StreamOpen {
            stream,
            kind,
            window,
        },
    )
    .await;
    let mut seen = FileSeen::default();
    let mut credit = window;
    loop {
        match recv(ws).await {
            AgentFrame::StreamFileInfo {
                stream: s,
                offset,
                size,
                mode,
            } if s == stream => {
                assert!(seen.data.is_empty(), "the info comes first");
                seen.info = Some((offset, size, mode));
            }
            AgentFrame::StreamData {
                stream: s, bytes, ..
            } if s == stream => {
                let n = bytes.len() as u64;
                assert!(n <= credit, "{n} bytes with {credit} of credit");
                credit -= n;
                seen.data.extend_from_slice(&bytes);
                credit += n;
                send(ws, ServerFrame::StreamCredit { stream, bytes: n }).await;
            }
            AgentFrame::StreamFileDone { stream: s, sha256 } if s == stream => {
                seen.done = Some(sha256)
            }
            AgentFrame::StreamClose { stream: s, error } if s == stream => {
                seen.closed = Some(error);
                return seen;
            }
            _ => {}
        }
    }
}

fn leftovers(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// A put lands byte-exact with its mode, through a temp file that is gone after the rename; a
/// put hung up midway keeps its temp file and no target, and a retried put with `resume` starts
/// from the temp file's length; a get from an offset sends the rest and the whole file's hash.
#[tokio::test]
async fn files_are_put_resumed_and_got_byte_exact() {
    use std::os::unix::fs::PermissionsExt;
    let server = Server::new().await;
    let node_id = server.enrol();
    let _agent = server.start(server.config());
    let (mut ws, _) = server.welcome(&node_id).await;
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("tool.bin");
    let data = noise(3 * 1024 * 1024 + 5, 9);

    send(&mut ws, put_open(1, &target, &data, Some(0o750), false)).await;
    let seen = drive_put(&mut ws, 1, &data, None, 0).await;
    assert_eq!(seen.closed, Some(None), "{seen:?}");
    assert_eq!(seen.info, Some((0, data.len() as u64, 0)));
    assert_eq!(seen.done.as_deref(), Some(sha_hex(&data).as_str()));
    assert!(std::fs::read(&target).unwrap() == data, "the file differs");
    let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o750);
    assert_eq!(leftovers(dir.path()), ["tool.bin"]);

    // Cut after 1.5 MiB: no target, the partial kept.
    let second = dir.path().join("second");
    let other = noise(2 * 1024 * 1024, 3);
    send(&mut ws, put_open(2, &second, &other, None, false)).await;
    let cut = drive_put(&mut ws, 2, &other, Some(1536 * 1024), 0).await;
    assert_eq!(cut.closed, Some(None));
    assert!(cut.done.is_none());
    assert!(!second.exists(), "a half file under the final name");
    let partial = dir.path().join(fleetrun_proto::stream::partial_name(
        "second",
        &sha_hex(&other),
    ));
    let kept = std::fs::metadata(&partial)
        .expect("the partial is kept")
        .len();
    assert!(kept > 0 && kept <= 1536 * 1024, "{kept}");
    assert_eq!(
        std::fs::metadata(&partial).unwrap().permissions().mode() & 0o777,
        0o600
    );
    send(&mut ws, put_open(3, &second, &other, None, true)).await;
    let resumed = drive_put(&mut ws, 3, &other, None, 0).await;
    assert_eq!(resumed.closed, Some(None), "{resumed:?}");
    assert_eq!(
        resumed.info.map(|i| i.0),
        Some(kept),
        "resumes at the partial's length"
    );
    assert!(std::fs::read(&second).unwrap() == other);
    let mode = std::fs::metadata(&second).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o644, "the default mode");
    assert_eq!(leftovers(dir.path()), ["second", "tool.bin"]);

    // Get the whole file, then from an offset.
    let got = drive_get(&mut ws, 4, &target, 0, 100_000).await;
    assert_eq!(got.closed, Some(None));
    assert_eq!(got.info, Some((0, data.len() as u64, 0o750)));
    assert!(got.data == data);
    assert_eq!(got.done.as_deref(), Some(sha_hex(&data).as_str()));
    let rest = drive_get(&mut ws, 5, &target, 1000, 65_536).await;
    assert!(rest.data == data[1000..]);
    assert_eq!(
        rest.done.as_deref(),
        Some(sha_hex(&data).as_str()),
        "the whole file's hash"
    );
    // A zero-length file.
    let empty = dir.path().join("empty");
    send(&mut ws, put_open(6, &empty, b"", None, false)).await;
    let e = drive_put(&mut ws, 6, b"", None, 0).await;
    assert_eq!(e.closed, Some(None), "{e:?}");
    assert_eq!(std::fs::read(&empty).unwrap(), b"");
    // Two puts of one file to one target at once: the second is refused while the first holds
    // the temp file, which it keeps when hung up.
    let third = dir.path().join("third");
    send(&mut ws, put_open(20, &third, &data, None, true)).await;
    loop {
        if let AgentFrame::StreamFileInfo { stream: 20, .. } = recv(&mut ws).await {
            break;
        }
    }
    send(&mut ws, put_open(21, &third, &data, None, true)).await;
    let busy = drive_put(&mut ws, 21, &data, None, 0).await;
    let why = busy.closed.flatten().unwrap_or_default();
    assert!(why.contains("is in progress"), "{why}");
    send(&mut ws, put_open(22, &third, &data, None, false)).await;
    let busy = drive_put(&mut ws, 22, &data, None, 0).await;
    let why = busy.closed.flatten().unwrap_or_default();
    assert!(why.contains("is in progress"), "{why}");
    let reason = "bye".into();
    send(&mut ws, ServerFrame::StreamClose { stream: 20, reason }).await;
    loop {
        if let AgentFrame::StreamClose { stream: 20, .. } = recv(&mut ws).await {
            break;
        }
    }
    send(&mut ws, put_open(23, &third, &data, None, true)).await;
    let after = drive_put(&mut ws, 23, &data, None, 0).await;
    assert_eq!(after.closed, Some(None), "{after:?}");
    assert!(std::fs::read(&third).unwrap() == data);
    // With `parents`, missing directories are made (0755).
    let deep = dir.path().join("a/b/c");
    let kind = StreamKind::FilePut {
        path: deep.to_str().unwrap().into(),
        mode: None,
        owner: None,
        group: None,
        size: 2,
        sha256: sha_hex(b"hi"),
        resume: false,
        parents: true,
    };
    send(
        &mut ws,
        ServerFrame::StreamOpen {
            stream: 7,
            kind,
            window: 1024,
        },
    )
    .await;
    let p = drive_put(&mut ws, 7, b"hi", None, 0).await;
    assert_eq!(p.closed, Some(None), "{p:?}");
    assert_eq!(std::fs::read(&deep).unwrap(), b"hi");
    let made = std::fs::metadata(dir.path().join("a/b")).unwrap();
    assert_eq!(made.permissions().mode() & 0o777, 0o755);
}

/// Bad paths, a bad hash, a short or long put, a get of what is not a file or past its end each
/// end the stream with an error naming what is wrong; the target is never written, a rejected
/// put leaves no temp file, and the agent goes on serving.
#[tokio::test]
async fn bad_file_streams_say_why_and_leave_no_file() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let _agent = server.start(server.config());
    let (mut ws, _) = server.welcome(&node_id).await;
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("f");
    let data = noise(300_000, 4);
    let closed = |seen: &FileSeen| seen.closed.clone().flatten().unwrap_or_default();

    // Relative path, refused before anything.
    let bad = ServerFrame::StreamOpen {
        stream: 1,
        kind: StreamKind::FilePut {
            path: "relative/f".into(),
            mode: None,
            owner: None,
            group: None,
            size: 1,
            sha256: sha_hex(b"x"),
            resume: false,
            parents: false,
        },
        window: 1024,
    };
    send(&mut ws, bad).await;
    let seen = drive_put(&mut ws, 1, b"x", None, 0).await;
    assert!(closed(&seen).contains("bad stream: bad path"), "{seen:?}");
    // A missing directory.
    send(
        &mut ws,
        put_open(2, &dir.path().join("no/such/f"), &data, None, false),
    )
    .await;
    let seen = drive_put(&mut ws, 2, &data, None, 0).await;
    assert!(closed(&seen).contains("no directory"), "{seen:?}");
    // A directory as the target.
    send(&mut ws, put_open(3, dir.path(), &data, None, false)).await;
    let seen = drive_put(&mut ws, 3, &data, None, 0).await;
    assert!(closed(&seen).contains("is a directory"), "{seen:?}");
    // Data past the size.
    send(&mut ws, put_open(4, &target, &data, None, false)).await;
    let seen = drive_put(&mut ws, 4, &data, None, 10).await;
    assert!(
        closed(&seen).contains("more bytes than the file's size"),
        "{seen:?}"
    );
    assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    // Too few bytes.
    send(&mut ws, put_open(5, &target, &data, None, false)).await;
    let seen = drive_put(&mut ws, 5, &data[..1000], None, 0).await;
    assert!(
        closed(&seen).contains("got 1000 bytes of 300000"),
        "{seen:?}"
    );
    assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    // The right size, the wrong bytes.
    let mut wrong = data.clone();
    wrong[12345] ^= 1;
    send(&mut ws, put_open(6, &target, &data, None, false)).await;
    let seen = drive_put(&mut ws, 6, &wrong, None, 0).await;
    assert!(closed(&seen).starts_with("sha256 mismatch"), "{seen:?}");
    assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    // An owner needs root (or, as root, an unknown user is refused).
    let owned = ServerFrame::StreamOpen {
        stream: 7,
        kind: StreamKind::FilePut {
            path: target.to_str().unwrap().into(),
            mode: None,
            owner: Some("no-such-user-here".into()),
            group: None,
            size: 1,
            sha256: sha_hex(b"x"),
            resume: false,
            parents: false,
        },
        window: 1024,
    };
    send(&mut ws, owned).await;
    let seen = drive_put(&mut ws, 7, b"x", None, 0).await;
    let why = closed(&seen);
    assert!(
        why.contains("no such user") || why.contains("needs the agent to run as root"),
        "{why}"
    );
    // Gets: missing, a directory, past the end.
    let seen = drive_get(&mut ws, 8, &dir.path().join("missing"), 0, 1024).await;
    assert!(closed(&seen).contains("no such file"), "{seen:?}");
    let seen = drive_get(&mut ws, 9, dir.path(), 0, 1024).await;
    assert!(closed(&seen).contains("is a directory"), "{seen:?}");
    std::fs::write(&target, b"abc").unwrap();
    let seen = drive_get(&mut ws, 10, &target, 4, 1024).await;
    assert!(
        closed(&seen).contains("offset 4 is past the end"),
        "{seen:?}"
    );
    // Input to a get breaks it.
    let kind = StreamKind::FileGet {
        path: target.to_str().unwrap().into(),
        offset: 0,
    };
    // (No output credit: the get waits for it, and hears the input.)
    send(
        &mut ws,
        ServerFrame::StreamOpen {
            stream: 11,
            kind,
            window: 0,
        },
    )
    .await;
    send(
        &mut ws,
        ServerFrame::StreamData {
            stream: 11,
            bytes: b"x".to_vec(),
        },
    )
    .await;
    let why = loop {
        if let AgentFrame::StreamClose { stream: 11, error } = recv(&mut ws).await {
            break error.unwrap_or_default();
        }
    };
    assert!(why.contains("a file get takes no input"), "{why}");
    // Data for a stream that is not open.
    send(
        &mut ws,
        ServerFrame::StreamData {
            stream: 99,
            bytes: b"x".to_vec(),
        },
    )
    .await;
    let seen = drive_put(&mut ws, 99, b"", Some(0), 0).await;
    assert!(
        closed(&seen).contains("data for unknown session stream 99"),
        "{seen:?}"
    );
    // Still serving, and the earlier target untouched.
    assert_eq!(std::fs::read(&target).unwrap(), b"abc");
    let small = dir.path().join("small");
    send(&mut ws, put_open(12, &small, b"hello", None, false)).await;
    let seen = drive_put(&mut ws, 12, b"hello", None, 0).await;
    assert_eq!(seen.closed, Some(None), "{seen:?}");
    assert_eq!(std::fs::read(&small).unwrap(), b"hello");
}

fn keyed_open(stream: u32, path: &std::path::Path, size: usize, resume: bool) -> ServerFrame {
    ServerFrame::StreamOpen {
        stream,
        kind: StreamKind::FilePut {
            path: path.to_str().unwrap().into(),
            mode: None,
            owner: None,
            group: None,
            size: size as u64,
            sha256: "00112233aabbccdd".into(),
            resume,
            parents: false,
        },
        window: 65_536,
    }
}

/// `data` and then `trailer` as a keyed put's input.
fn with_trailer(data: &[u8], trailer: &[u8]) -> Vec<u8> {
    let mut body = data.to_vec();
    body.extend_from_slice(trailer);
    body
}

/// A put with a resume key (protocol version 6) takes the whole file's SHA-256 after its bytes:
/// a good trailer lands the file (its temp file named after the key, so a cut put resumes from
/// it); a wrong hash, a missing or short trailer and bytes after it each end the put with a clear
/// error and leave neither the target nor a temp file.
#[tokio::test]
async fn keyed_puts_check_their_trailer_and_resume_by_key() {
    use sha2::Digest;
    let server = Server::new().await;
    let node_id = server.enrol();
    let _agent = server.start(server.config());
    let (mut ws, _) = server.welcome(&node_id).await;
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("f");
    let data = noise(300_000, 9);
    let hash = sha2::Sha256::digest(&data).to_vec();
    let closed = |seen: &FileSeen| seen.closed.clone().flatten().unwrap_or_default();

    // Cut midway: the temp file, named after the key, stays; no target.
    send(&mut ws, keyed_open(1, &target, data.len(), true)).await;
    let body = with_trailer(&data, &hash);
    let seen = drive_put(&mut ws, 1, &body, Some(100_000), 0).await;
    assert_eq!(seen.info, Some((0, 300_000, 0)), "{seen:?}");
    assert_eq!(leftovers(dir.path()), [".f.fleetrun-00112233aabbccdd.part"]);
    // Resumed from it, then the trailer: the whole file, checked.
    send(&mut ws, keyed_open(2, &target, data.len(), true)).await;
    let seen = drive_put(&mut ws, 2, &body, None, 0).await;
    assert_eq!(seen.closed, Some(None), "{seen:?}");
    assert_eq!(seen.info, Some((100_000, 300_000, 0)), "{seen:?}");
    assert_eq!(seen.done, Some(sha_hex(&data)));
    assert_eq!(std::fs::read(&target).unwrap(), data);
    assert_eq!(leftovers(dir.path()), ["f"]);
    std::fs::remove_file(&target).unwrap();

    let mut wrong = hash.clone();
    wrong[3] ^= 1;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (with_trailer(&data, &wrong), "sha256 mismatch"),
        (data.clone(), "without its trailer"),
        (with_trailer(&data, &hash[..16]), "without its trailer"),
        (
            with_trailer(&with_trailer(&data, &hash), b"x"),
            "bytes after the trailer",
        ),
    ];
    for (i, (body, says)) in cases.into_iter().enumerate() {
        let stream = 3 + i as u32;
        send(&mut ws, keyed_open(stream, &target, data.len(), false)).await;
        let seen = drive_put(&mut ws, stream, &body, None, 0).await;
        assert!(closed(&seen).contains(says), "{says}: {seen:?}");
        assert_eq!(seen.done, None, "{says}");
        assert_eq!(leftovers(dir.path()), Vec::<String>::new(), "{says}");
    }
}

/// What a list's stream said: its records, whether it started, its exit status and close.
#[derive(Debug, Default)]
struct ListSeen {
    records: Vec<u8>,
    started: bool,
    exit: Option<i32>,
    closed: Option<Option<String>>,
    most_in_flight: u64,
}

/// Opens a `FileList` of `path` with `window` bytes of credit, granting each frame back only
/// after the next one arrived, until the stream's close.
async fn drive_list(ws: &mut Ws, stream: u32, path: &str, window: u64) -> ListSeen {
    let kind = StreamKind::FileList { path: path.into() };
    send(
        ws,
        ServerFrame::StreamOpen {
            stream,
            kind,
            window,
        },
    )
    .await;
    let mut seen = ListSeen::default();
    let mut in_flight = 0u64;
    loop {
        match recv(ws).await {
            AgentFrame::StreamCredit { stream: s, .. } if s == stream => seen.started = true,
            AgentFrame::StreamData {
                stream: s, bytes, ..
            } if s == stream => {
                let n = bytes.len() as u64;
                in_flight += n;
                assert!(
                    in_flight <= window,
                    "{in_flight} bytes with {window} of credit"
                );
                seen.most_in_flight = seen.most_in_flight.max(in_flight);
                seen.records.extend_from_slice(&bytes);
                in_flight -= n;
                send(ws, ServerFrame::StreamCredit { stream, bytes: n }).await;
            }
            AgentFrame::StreamExit {
                stream: s, code, ..
            } if s == stream => seen.exit = Some(code),
            AgentFrame::StreamClose { stream: s, error } if s == stream => {
                seen.closed = Some(error);
                return seen;
            }
            _ => {}
        }
    }
}

/// A `FileList` sends the tree as `find -printf '%y%P\0'` would, within a credit smaller than
/// the listing, symlinks named and not followed, then exit 0; a missing path, a file, a relative
/// path or `..` and input to the list each end it with an error naming why.
#[tokio::test]
async fn a_directory_is_listed_within_the_credit_and_bad_lists_say_why() {
    let server = Server::new().await;
    let node_id = server.enrol();
    let _agent = server.start(server.config());
    let (mut ws, _) = server.welcome(&node_id).await;
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"s").unwrap();
    let root = dir.path().join("tree");
    std::fs::create_dir_all(root.join("sub/empty")).unwrap();
    let mut want = vec!["dsub".to_owned()];
    // Enough names that the listing is many times the credit.
    for i in 0..400 {
        let name = format!("sub/file-with-a-longish-name-{i:04}");
        std::fs::write(root.join(&name), b"x").unwrap();
        want.push(format!("f{name}"));
    }
    std::os::unix::fs::symlink(outside.path(), root.join("out")).unwrap();
    want.push("lout".into());
    want.sort();
    let root_s = root.to_str().unwrap().to_owned();

    let seen = drive_list(&mut ws, 1, &root_s, 4096).await;
    assert_eq!(seen.closed, Some(None), "{seen:?}");
    assert_eq!(seen.exit, Some(0));
    assert!(seen.started);
    assert!(seen.records.len() > 3 * 4096, "{}", seen.records.len());
    let mut got: Vec<String> = seen
        .records
        .split(|b| *b == 0)
        .filter(|r| !r.is_empty())
        .map(|r| String::from_utf8(r.to_vec()).unwrap())
        .collect();
    got.sort();
    assert_eq!(
        got, want,
        "empty directories and what symlinks point at are not listed"
    );

    let closed = |seen: &ListSeen| seen.closed.clone().flatten().unwrap_or_default();
    let missing = format!("{root_s}/nope");
    let seen = drive_list(&mut ws, 2, &missing, 4096).await;
    assert_eq!(closed(&seen), format!("no directory {missing} on the node"));
    assert_eq!(seen.exit, None);
    let file = format!("{root_s}/sub/file-with-a-longish-name-0001");
    let seen = drive_list(&mut ws, 3, &file, 4096).await;
    assert_eq!(closed(&seen), format!("{file} is not a directory"));
    for (n, bad) in [
        (4, "relative/dir".to_owned()),
        (5, format!("{root_s}/../tree")),
    ] {
        let seen = drive_list(&mut ws, n, &bad, 4096).await;
        assert!(
            closed(&seen).contains("bad stream: bad path"),
            "{bad}: {seen:?}"
        );
    }

    // Input to a list ends it (the credit is small, so the list is still running).
    let kind = StreamKind::FileList { path: root_s };
    send(
        &mut ws,
        ServerFrame::StreamOpen {
            stream: 6,
            kind,
            window: 16,
        },
    )
    .await;
    send(
        &mut ws,
        ServerFrame::StreamData {
            stream: 6,
            bytes: vec![1],
        },
    )
    .await;
    let error = within("the list's close", async {
        loop {
            if let AgentFrame::StreamClose { stream: 6, error } = recv(&mut ws).await {
                return error;
            }
        }
    })
    .await;
    assert_eq!(
        error.as_deref(),
        Some("bad input: a file list takes no input")
    );
}
