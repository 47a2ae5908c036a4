//! Shared parts of the in-process server tests: a real server (`fleetrun_server::start` on
//! 127.0.0.1:0, plain HTTP, a temp data dir) in a runtime of its own, so a test can kill it as a
//! crash would; a scripted agent speaking the channel protocol on a real WebSocket; an API client.

#![allow(dead_code)]

use fleetrun_proto::auth::{self, NodeKey};
use fleetrun_proto::channel::{
    AgentFrame, ExecResult, NodeInfo, Outcome, Pipe, ServerFrame, StreamId,
};
use fleetrun_proto::version::PROTOCOL_VERSION;
use fleetrun_proto::{CommandId, NodeId};
use fleetrun_server::net::tls::TlsMode;
use fleetrun_server::{RunningServer, ServerConfig};
use fleetrun_store::Store;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Longest wait for anything a test expects.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The servers' grace for a result in flight past a command's expiry (the default is 30 s).
pub const RESULT_GRACE: Duration = Duration::from_secs(2);

/// Waits for `f`, failing the test past `limit`.
pub async fn within_for<T>(what: &str, limit: Duration, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Waits for `f`, failing the test past [`DEADLINE`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    within_for(what, DEADLINE, f).await
}

/// A client's WebSocket (exec, shells, port forwards).
pub type ClientWs = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The server's next message that is not a ping or pong; `None` when the socket ended or broke.
pub async fn next_message(ws: &mut ClientWs) -> Option<Message> {
    within("a message from the server", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => return Some(m),
                None | Some(Err(_)) => return None,
            }
        }
    })
    .await
}

/// A server of this test, in a runtime of its own.
pub struct TestServer {
    pub data: PathBuf,
    pub addr: SocketAddr,
    pub token: String,
    /// Its database when not the default (SQLite in the data dir).
    database: Option<fleetrun_store::Database>,
    http: reqwest::Client,
    rt: Option<tokio::runtime::Runtime>,
    _running: Option<RunningServer>,
    _dir: Option<tempfile::TempDir>,
}

impl TestServer {
    /// A user's token: the user is made with `role` (and `policy`, when given) first.
    pub async fn token_for(&self, name: &str, role: &str, policy: Option<&str>) -> String {
        let mut user = json!({"name": name, "role": role});
        if let Some(policy) = policy {
            user["policy"] = json!(policy);
        }
        let (status, _, body) = self
            .call(reqwest::Method::POST, "/v1/users", Some(&user), &[])
            .await;
        assert_eq!(status, 201, "{body}");
        let user = json!({"user": name});
        let (status, _, body) = self
            .call(reqwest::Method::POST, "/v1/tokens", Some(&user), &[])
            .await;
        assert_eq!(status, 201, "{body}");
        body["token"].as_str().expect("token").to_owned()
    }

    /// Opens a client WebSocket on `path` with `token`: the socket, or the refusal's status and
    /// body.
    pub async fn dial_ws(&self, path: &str, token: &str) -> Result<ClientWs, (u16, Vec<u8>)> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("ws://{}{path}", self.addr);
        let mut req = url.into_client_request().expect("request");
        let bearer = format!("Bearer {token}").parse().expect("header");
        req.headers_mut().insert("authorization", bearer);
        match within("the upgrade", tokio_tungstenite::connect_async(req)).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body = resp.body().clone().unwrap_or_default();
                Err((resp.status().as_u16(), body))
            }
            Err(e) => panic!("upgrade of {path}: {e}"),
        }
    }

    /// A server on a fresh data dir.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A server on a fresh data dir, with settings changed by `configure` (a restart keeps the
    /// defaults).
    pub async fn start_with(configure: impl FnOnce(&mut ServerConfig)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = Self::start_in(dir.path().to_path_buf(), None, configure).await;
        s._dir = Some(dir);
        s
    }

    /// A server on `data`, with the admin token given when it was made by an earlier start.
    async fn start_in(
        data: PathBuf,
        token: Option<String>,
        configure: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("server runtime");
        let mut config = ServerConfig::new(data.clone(), "127.0.0.1:0".parse().expect("addr"));
        config.tls = TlsMode::Insecure;
        // Short, so an expiry test waits seconds, not the default half minute.
        config.result_grace = RESULT_GRACE;
        configure(&mut config);
        let database = config.database.clone();
        let running = rt
            .spawn(fleetrun_server::start(config))
            .await
            .expect("start task")
            .expect("server starts");
        let token = running.admin_token.clone().or(token).expect("admin token");
        TestServer {
            data,
            addr: running.local_addr,
            token,
            database,
            http: reqwest::Client::new(),
            rt: Some(rt),
            _running: Some(running),
            _dir: None,
        }
    }

    /// Another replica of this server's database, on a fresh data dir, with settings changed by
    /// `configure` (give it the same database, and the NATS server they share). Its objects are
    /// this server's (a link to its objects dir), as replicas share one object store.
    pub async fn replica(&self, configure: impl FnOnce(&mut ServerConfig)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::os::unix::fs::symlink(self.data.join("objects"), dir.path().join("objects"))
            .expect("link the objects dir");
        let mut s = Self::start_in(
            dir.path().to_path_buf(),
            Some(self.token.clone()),
            configure,
        )
        .await;
        s._dir = Some(dir);
        s
    }

    /// Kills the server as a crash would (every task dropped where it stands, nothing flushed
    /// beyond what was committed), then starts a new one on the same data dir.
    pub async fn restart(&mut self) {
        self.kill();
        let mut next = Self::start_in(self.data.clone(), Some(self.token.clone()), |_| {}).await;
        self.addr = next.addr;
        self.rt = next.rt.take();
        self._running = next._running.take();
    }

    /// Drops every task of the server at once.
    pub fn kill(&mut self) {
        self._running = None;
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }

    /// A second handle on the server's database: what it reads is what was committed.
    pub async fn store(&self) -> Store {
        match &self.database {
            Some(database) => Store::open(database).await,
            None => Store::open_sqlite(&self.data.join("fleetrun.db")).await,
        }
        .expect("open the database")
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A native API call: (status, headers, JSON body or Null).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        self.call_as(&self.token, method, path, body, headers).await
    }

    /// A native API call with another token: (status, headers, JSON body or Null).
    pub async fn call_as(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(token);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = within(path, req.send()).await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = within(path, resp.text()).await.expect("body");
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        (status, headers, json)
    }

    /// GET, expecting 200.
    pub async fn get(&self, path: &str) -> Value {
        let (status, _, body) = self.call(reqwest::Method::GET, path, None, &[]).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// A new activation code (for one node).
    pub async fn activation(&self) -> String {
        let (status, _, body) = self
            .call(
                reqwest::Method::POST,
                "/v1/activations",
                Some(&json!({})),
                &[],
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["code"].as_str().expect("code").to_owned()
    }

    /// Sends a command (201 expected) and returns its id.
    pub async fn send(&self, body: Value) -> CommandId {
        let (status, _, answer) = self
            .call(reqwest::Method::POST, "/v1/commands", Some(&body), &[])
            .await;
        assert_eq!(status, 201, "{answer}");
        answer["command_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("command id")
    }

    /// The command, once its status is terminal: follows its watch stream (pushed on every change).
    pub async fn wait_terminal(&self, id: &CommandId, limit: Duration) -> Value {
        within_for("a terminal command", limit, async {
            let resp = self
                .http
                .get(self.url(&format!("/v1/commands/{id}/watch")))
                .bearer_auth(&self.token)
                .send()
                .await
                .expect("watch");
            assert_eq!(resp.status().as_u16(), 200);
            let mut stream = resp.bytes_stream();
            let mut buf = Vec::new();
            let mut last = Value::Null;
            while let Some(chunk) = stream.next().await {
                buf.extend_from_slice(&chunk.expect("watch body"));
                while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    last = serde_json::from_slice(&line).expect("watch line");
                    let status = last["status"].as_str().unwrap_or_default();
                    if ["Success", "Failed", "TimedOut", "Cancelled"].contains(&status) {
                        return last;
                    }
                }
            }
            panic!("watch ended before the command did: {last}");
        })
        .await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Seeds of the scripted agents' keys (distinct per agent of a test binary).
static NEXT_SEED: AtomicU8 = AtomicU8::new(1);

/// A scripted agent: a node's key and id, and its connection when it has one.
pub struct ScriptedAgent {
    pub node_id: NodeId,
    pub name: String,
    key: NodeKey,
    ws: Option<Ws>,
}

impl ScriptedAgent {
    /// Registers a new node with a fresh activation (the server's `Register` handshake).
    pub async fn register(server: &TestServer, name: &str) -> Self {
        let code = server.activation().await;
        let key = NodeKey::from_seed([NEXT_SEED.fetch_add(1, Ordering::Relaxed); 32]);
        let (mut ws, nonce) = dial(server.addr).await;
        let public_key = key.public_key().to_vec();
        let signature = key.sign(&auth::register_message(&nonce, &public_key));
        send_frame(
            &mut ws,
            AgentFrame::Register {
                protocol_version: PROTOCOL_VERSION,
                activation_code: code,
                public_key,
                signature,
                info: info(name),
                tags: Default::default(),
            },
        )
        .await;
        let node_id = match recv_frame(&mut ws).await {
            ServerFrame::Registered { node_id } => node_id,
            other => panic!("expected Registered, got {other:?}"),
        };
        ScriptedAgent {
            node_id,
            name: name.to_owned(),
            key,
            ws: None,
        }
    }

    /// Registers and connects a node, and waits until the server lists it online.
    pub async fn online(server: &TestServer, name: &str) -> Self {
        let mut a = Self::register(server, name).await;
        a.connect(server, &[]).await;
        a
    }

    /// Connects (`Hello` holding `known`), expects `Welcome`, and waits until the node is listed
    /// online (its deliveries reconciled).
    pub async fn connect(&mut self, server: &TestServer, known: &[CommandId]) {
        self.connect_as_version(server, known, PROTOCOL_VERSION)
            .await;
    }

    /// [`Self::connect`] as an agent of protocol version `version`.
    pub async fn connect_as_version(
        &mut self,
        server: &TestServer,
        known: &[CommandId],
        version: u32,
    ) {
        let (mut ws, nonce) = dial(server.addr).await;
        let public_key = self.key.public_key().to_vec();
        let signature = self
            .key
            .sign(&auth::hello_message(&self.node_id, &nonce, &public_key));
        send_frame(
            &mut ws,
            AgentFrame::Hello {
                protocol_version: version,
                node_id: self.node_id.clone(),
                public_key,
                signature,
                info: info(&self.name),
                known: known.to_vec(),
            },
        )
        .await;
        match recv_frame(&mut ws).await {
            // The server names its own version, whichever of its versions the agent speaks.
            ServerFrame::Welcome {
                protocol_version, ..
            } => assert_eq!(protocol_version, PROTOCOL_VERSION),
            other => panic!("expected Welcome, got {other:?}"),
        }
        self.ws = Some(ws);
        let node = self.node_id.to_string();
        // Online in the listing only once the hub holds the connection, after reconciliation.
        within("the node to be online", async {
            loop {
                let nodes = server.get("/v1/nodes").await;
                let online = nodes
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|n| n["node_id"] == node.as_str() && n["ping_status"] == "Online");
                if online {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    /// Drops the connection (as a network cut would).
    pub fn disconnect(&mut self) {
        self.ws = None;
    }

    fn ws(&mut self) -> &mut Ws {
        self.ws.as_mut().expect("the agent is connected")
    }

    /// Sends a frame.
    pub async fn send(&mut self, frame: AgentFrame) {
        send_frame(self.ws(), frame).await
    }

    /// Ends a stream as the agent does when its command exits with `code`: `StreamExit`, then
    /// `StreamClose` without an error.
    pub async fn exit_stream(&mut self, stream: u32, code: i32) {
        self.send(AgentFrame::StreamExit {
            stream,
            code,
            signal: None,
        })
        .await;
        self.send(AgentFrame::StreamClose {
            stream,
            error: None,
        })
        .await;
    }

    /// The next frame from the server.
    pub async fn recv(&mut self) -> ServerFrame {
        recv_frame(self.ws()).await
    }

    /// The next frame `pick` accepts, skipping others (acks of earlier frames, say).
    pub async fn expect<T>(&mut self, what: &str, pick: impl Fn(ServerFrame) -> Option<T>) -> T {
        let ws = self.ws();
        within(what, async {
            loop {
                if let Some(v) = pick(recv_frame(ws).await) {
                    return v;
                }
            }
        })
        .await
    }

    /// The next `Run`.
    pub async fn expect_run(&mut self) -> fleetrun_proto::channel::RunRequest {
        self.expect("Run", |f| match f {
            ServerFrame::Run(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Sends output of stdout at `offset`.
    pub async fn output(&mut self, cmd: &CommandId, offset: u64, data: &[u8]) {
        let stream = StreamId::Output {
            command_id: cmd.clone(),
            pipe: Pipe::Stdout,
        };
        self.send(AgentFrame::Output {
            stream,
            offset,
            data: data.to_vec(),
        })
        .await
    }

    /// The next `Ack` of a command's stdout: the offset acknowledged.
    pub async fn expect_ack(&mut self, cmd: &CommandId) -> u64 {
        let cmd = cmd.clone();
        self.expect("Ack", move |f| match f {
            ServerFrame::Ack {
                stream: StreamId::Output { command_id, pipe },
                offset,
            } if command_id == cmd && pipe == Pipe::Stdout => Some(offset),
            _ => None,
        })
        .await
    }

    /// Sends `Started`.
    pub async fn started(&mut self, cmd: &CommandId) {
        self.send(AgentFrame::Started {
            command_id: cmd.clone(),
            started_at_ms: fleetrun_proto::time::now_ms(),
        })
        .await
    }

    /// Sends `Finished` with an exit code.
    pub async fn finished(&mut self, cmd: &CommandId, exit_code: i32, stdout_bytes: u64) {
        self.send(AgentFrame::Finished {
            command_id: cmd.clone(),
            result: result(exit_code, stdout_bytes),
        })
        .await
    }

    /// Waits for the `ResultAck` of a command.
    pub async fn expect_result_ack(&mut self, cmd: &CommandId) {
        let cmd = cmd.clone();
        self.expect("ResultAck", move |f| match f {
            ServerFrame::ResultAck { command_id } if command_id == cmd => Some(()),
            _ => None,
        })
        .await
    }
}

/// A result of a run that exited with `exit_code`.
pub fn result(exit_code: i32, stdout_bytes: u64) -> ExecResult {
    let now = fleetrun_proto::time::now_ms();
    ExecResult {
        outcome: Outcome::Exited,
        exit_code,
        signal: None,
        started_at_ms: now,
        finished_at_ms: now,
        cpu_user_ms: 1,
        cpu_system_ms: 1,
        max_rss_kb: 1024,
        stdout_bytes,
        stderr_bytes: 0,
        message: String::new(),
        limits_applied: String::new(),
    }
}

fn info(name: &str) -> NodeInfo {
    NodeInfo {
        name: name.to_owned(),
        hostname: format!("{name}.test"),
        os: "linux".into(),
        arch: "x86_64".into(),
        ips: vec!["127.0.0.1".into()],
        agent_version: "test".into(),
    }
}

/// Opens the agent channel and reads the server's challenge.
async fn dial(addr: SocketAddr) -> (Ws, Vec<u8>) {
    let url = format!("ws://{addr}/v1/agent/connect");
    let (mut ws, _) = within("the channel", tokio_tungstenite::connect_async(url))
        .await
        .expect("channel upgrade");
    match recv_frame(&mut ws).await {
        ServerFrame::Challenge { nonce } => (ws, nonce),
        other => panic!("expected Challenge, got {other:?}"),
    }
}

async fn send_frame(ws: &mut Ws, frame: AgentFrame) {
    ws.send(Message::Binary(frame.encode().into()))
        .await
        .expect("send a frame");
}

async fn recv_frame(ws: &mut Ws) -> ServerFrame {
    within("a frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => {
                    return ServerFrame::decode(&b).expect("a server frame");
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("channel ended: {other:?}"),
            }
        }
    })
    .await
}
