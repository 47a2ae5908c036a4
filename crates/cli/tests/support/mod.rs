//! Test harness: the real `fleetrun` server and `fleetrun-agent` binaries in a fresh temp dir, on a free
//! port, logging to files, stopped on drop. Waits are bounded polls of the API, never blind sleeps.
//!
//! Servers serve TLS with their own CA, as by default (`--insecure-http` among a server's flags
//! makes it plain HTTP): the harness's requests and CLI runs trust `DATA_DIR/ca.pem`, and agents pin
//! the CA by the fingerprint the activation answer carries, as an operator would.
#![allow(dead_code)]

use serde_json::Value;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `fleetrun` binary under test.
pub fn fleetrun_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fleetrun"))
}

/// The agent binary, built next to `fleetrun`.
pub fn agent_bin() -> PathBuf {
    let p = fleetrun_bin().with_file_name("fleetrun-agent");
    assert!(
        p.exists(),
        "{} is missing; build it: cargo build -p fleetrun-agent",
        p.display()
    );
    p
}

/// Polls `f` until it returns Some, or panics after `timeout` naming `what`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

/// A free port below the kernel's ephemeral range, so that while a restarted server is down no outgoing
/// connection of another test can take its port as a local port.
pub fn free_port(ip: &str) -> u16 {
    let (lo, _) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let lo = lo.clamp(12_000, 32_768);
    let span = u32::from(lo) - 10_000;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ (std::process::id() << 8);
    for _ in 0..200 {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let port = 10_000 + ((seed >> 8) % span) as u16;
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    // Give up on the quiet range: any free port.
    let l = TcpListener::bind((ip, 0)).expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

/// Sends a signal to a process.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let r = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(
        r,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// A `VmHWM`/`VmRSS`-style field of `/proc/PID/status`, in KiB.
pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Peak and current resident memory of a process, in KiB.
#[derive(Clone, Copy, Debug)]
pub struct Rss {
    pub hwm_kb: u64,
    pub rss_kb: u64,
}

/// Reads [`Rss`] of a live process.
pub fn rss(pid: u32) -> Rss {
    Rss {
        hwm_kb: proc_status_kb(pid, "VmHWM").unwrap_or_else(|| panic!("no VmHWM for {pid}")),
        rss_kb: proc_status_kb(pid, "VmRSS").unwrap_or_else(|| panic!("no VmRSS for {pid}")),
    }
}

fn log_file(path: &Path) -> std::fs::File {
    std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()))
}

fn tail(path: &Path, max: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    String::from_utf8_lossy(&text[start..]).into_owned()
}

/// An HTTP answer: status and body bytes.
pub struct Http {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Http {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// One HTTP request with reqwest (a real client), run on a throwaway runtime so tests stay
/// synchronous; `https://` trusts the CA certificate in the PEM file `ca` (else the system roots).
pub fn http(
    ca: Option<&Path>,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
) -> Result<Http, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = client_builder(ca)
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| e.to_string())?;
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let mut req = client.request(method, url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some((ctype, bytes)) = body {
            req = req.header("content-type", ctype).body(bytes);
        }
        let resp = req.send().await.map_err(|e| format!("{e:?}"))?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| e.to_string())?.to_vec();
        Ok(Http { status, body })
    })
}

/// A reqwest client builder without proxies that trusts the CA in the PEM file `ca`, if given.
pub fn client_builder(ca: Option<&Path>) -> reqwest::ClientBuilder {
    let b = reqwest::Client::builder().no_proxy();
    match ca {
        Some(path) => {
            let pem =
                std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            b.tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).expect("CA PEM"))
        }
        None => b,
    }
}

/// One HTTP answer as bytes, for tests that look at what the server sends on the wire.
pub struct RawAnswer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl RawAnswer {
    /// A header's value as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON; panics naming the status, content type and body when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} ({}) body is not JSON ({e}): {}",
                self.status,
                self.header("content-type").unwrap_or(""),
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// A request for [`raw_request`]: method, path, headers and body, the client's timeout and, when
/// set, the local address it binds (another loopback address is another source to the server).
pub struct RawRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: Vec<(&'a str, String)>,
    pub body: Vec<u8>,
    pub timeout: Duration,
    pub local: Option<std::net::IpAddr>,
}

impl<'a> RawRequest<'a> {
    /// A request with no headers or body and a 30 s timeout.
    pub fn new(method: &'a str, path: &'a str) -> Self {
        RawRequest {
            method,
            path,
            headers: Vec::new(),
            body: Vec::new(),
            timeout: Duration::from_secs(30),
            local: None,
        }
    }
}

/// Sends one request to the real server through reqwest on a throwaway runtime, trusting its CA:
/// `Err` when no answer came (refused, closed, timed out).
pub fn raw_request(server: &Server, req: RawRequest<'_>) -> Result<RawAnswer, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = client_builder(server.ca.as_deref())
            .local_address(req.local)
            .timeout(req.timeout)
            .build()
            .map_err(|e| e.to_string())?;
        let method =
            reqwest::Method::from_bytes(req.method.as_bytes()).map_err(|e| e.to_string())?;
        let mut r = client.request(method, format!("{}{}", server.url, req.path));
        for (n, v) in req.headers {
            r = r.header(n, v);
        }
        let resp = r
            .body(req.body)
            .send()
            .await
            .map_err(|e| format!("{e:?}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(|e| e.to_string())?.to_vec();
        Ok(RawAnswer {
            status,
            headers,
            body,
        })
    })
}

/// Which database the servers of this run keep: `FLEETRUN_TEST_DATABASE` unset or `sqlite`, SQLite
/// in the data dir (the default); `postgres`, a fresh database of this test binary's own
/// PostgreSQL cluster (`fleetrun_testkit`), so the whole suite also runs on PostgreSQL.
fn test_database() -> Option<String> {
    match std::env::var("FLEETRUN_TEST_DATABASE").as_deref() {
        Err(_) | Ok("" | "sqlite") => None,
        Ok("postgres") => Some(fleetrun_testkit::shared_postgres().create_database()),
        Ok(other) => panic!("FLEETRUN_TEST_DATABASE={other}: use sqlite or postgres"),
    }
}

/// A server's flags with the run's database added, unless they name one already (a test about
/// the SQLite file itself names `--database sqlite:PATH`).
fn with_test_database(args: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    if !args.contains(&"--database")
        && let Some(url) = test_database()
    {
        all.extend(["--database".to_owned(), url]);
    }
    all
}

/// A running `fleetrun server`. It can be killed and started again on the same data dir and the same
/// address, so agents re-dial the URL they know.
pub struct Server {
    pub url: String,
    /// The CA certificate clients trust: the server's own (`DATA_DIR/ca.pem`), or the operator's
    /// `--tls-cert` chain; None for a plain-HTTP server.
    pub ca: Option<PathBuf>,
    /// Whether the server is its own CA (agents pin it by fingerprint).
    pub own_ca: bool,
    pub token: String,
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    listen: String,
    args: Vec<String>,
    child: Option<Child>,
    starts: u32,
}

impl Server {
    /// A server on loopback with the harness's defaults (1 s heartbeats).
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// A server on loopback with extra flags.
    pub fn start_with(args: &[&str]) -> Server {
        Server::start_on("127.0.0.1", args)
    }

    /// A server listening on `ip` (a veth address in a network test), with extra flags.
    pub fn start_on(ip: &str, args: &[&str]) -> Server {
        Server::start_full(ip, with_test_database(args))
    }

    /// A server on SQLite in its data dir whatever the run's database, for a test about the
    /// SQLite file itself.
    pub fn start_sqlite() -> Server {
        Server::start_full("127.0.0.1", Vec::new())
    }

    /// Another replica of this server's database: its own data dir, address and CA, this
    /// server's admin token (tokens live in the database; only the first start makes one).
    /// `args` name the shared database and NATS server.
    pub fn replica(&self, args: &[&str]) -> Server {
        Server::start_full_as(
            "127.0.0.1",
            args.iter().map(|a| (*a).to_owned()).collect(),
            Some(self.token.clone()),
        )
    }

    fn start_full(ip: &str, args: Vec<String>) -> Server {
        Server::start_full_as(ip, args, None)
    }

    fn start_full_as(ip: &str, args: Vec<String>, token: Option<String>) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let port = free_port(ip);
        let insecure = args.iter().any(|a| a == "--insecure-http");
        let scheme = if insecure { "http" } else { "https" };
        let operator_cert = args
            .iter()
            .position(|a| a == "--tls-cert")
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from);
        let own_ca = !insecure && operator_cert.is_none();
        let mut server = Server {
            url: format!("{scheme}://{ip}:{port}"),
            ca: if own_ca {
                Some(data_dir.join("ca.pem"))
            } else {
                operator_cert
            },
            own_ca,
            token: String::new(),
            dir,
            data_dir,
            listen: format!("{ip}:{port}"),
            args,
            child: None,
            starts: 0,
        };
        server.spawn_ready();
        if let Some(token) = token {
            server.token = token;
            return server;
        }
        let token_path = server.data_dir.join("admin.token");
        server.token = std::fs::read_to_string(&token_path)
            .unwrap_or_else(|e| panic!("read {}: {e}", token_path.display()))
            .trim()
            .to_owned();
        assert!(!server.token.is_empty(), "empty admin token");
        server
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.dir.path().join(if n <= 1 {
            "server.log".to_owned()
        } else {
            format!("server.{n}.log")
        })
    }

    /// Starts the process and waits until it answers /v1/health. The address was free a moment ago;
    /// when another process grabbed it meanwhile (or the old socket lingers), it tries again.
    fn spawn_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.starts += 1;
            let log = self.log_path(self.starts);
            let child = Command::new(fleetrun_bin())
                .args(["server", "--data-dir"])
                .arg(&self.data_dir)
                .args(["--listen", &self.listen, "--heartbeat-secs", "1"])
                .args(&self.args)
                .env("RUST_LOG", "info")
                .env_remove("FLEETRUN_SERVER_CONFIG")
                .env_remove("FLEETRUN_RETENTION")
                .env_remove("FLEETRUN_PURGE_INTERVAL")
                .env_remove("FLEETRUN_MAX_HANDSHAKES")
                .env_remove("FLEETRUN_TLS_CERT")
                .env_remove("FLEETRUN_TLS_KEY")
                .stdin(Stdio::null())
                .stdout(log_file(&log.with_extension("out")))
                .stderr(log_file(&log))
                .spawn()
                .expect("spawn fleetrun server");
            self.child = Some(child);
            let health = format!("{}/v1/health", self.url);
            let up = wait_until(
                "the server to answer /v1/health",
                Duration::from_secs(10),
                || {
                    let child = self.child.as_mut().expect("child");
                    if let Ok(Some(st)) = child.try_wait() {
                        return Some(Err(st));
                    }
                    // The CA file appears during the start, before the server listens.
                    let ca = self.ca.as_deref().filter(|p| p.exists());
                    if self.ca.is_some() && ca.is_none() {
                        return None;
                    }
                    http(ca, "GET", &health, None, None)
                        .ok()
                        .filter(|r| r.status == 200)
                        .map(Ok)
                },
            );
            match up {
                Ok(_) => return,
                Err(st) => {
                    let log_text = tail(&log, 2_000);
                    self.child = None;
                    if log_text.contains("cannot listen") && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    panic!("server exited with {st}:\n{}", self.logs());
                }
            }
        }
    }

    /// Runs `sql` on the server's database from outside the server, as someone with access to
    /// the database would (sqlite3 on the file, or psql); panics when it fails.
    pub fn sql(&self, sql: &str) -> String {
        let database = self
            .args
            .iter()
            .position(|a| a == "--database")
            .and_then(|i| self.args.get(i + 1));
        if let Some(url) = database {
            let name = url.rsplit('/').next().expect("a database name");
            return fleetrun_testkit::shared_postgres().psql(name, sql);
        }
        let out = Command::new("sqlite3")
            .arg("-cmd")
            .arg(".timeout 10000")
            .arg(self.data_dir.join("fleetrun.db"))
            .arg(sql)
            .output()
            .expect("sqlite3 (install the sqlite3 CLI)");
        assert!(
            out.status.success(),
            "sqlite3 {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server not running").id()
    }

    /// Whether the server process is still running (it may be stopped).
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits, at most `within`, for the process to exit: its exit status and how
    /// long it took (panics if it is still running then).
    pub fn terminate(&mut self, within: Duration) -> (ExitStatus, Duration) {
        signal(self.pid(), libc::SIGTERM);
        self.terminate_wait(within)
    }

    /// Waits, at most `within`, for the process to exit after a signal sent already: its exit
    /// status and how long it took.
    pub fn terminate_wait(&mut self, within: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        let child = self.child.as_mut().expect("server not running");
        let status = wait_until("the server to exit after SIGTERM", within, || {
            child.try_wait().expect("wait for the server")
        });
        self.child = None;
        (status, start.elapsed())
    }

    /// Starts the server again on the same data dir and address (after [`Server::terminate`]).
    pub fn start_again(&mut self) {
        self.spawn_ready();
    }

    /// Kills the server (if running) and starts it again on the same data dir and address.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn_ready();
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn stop(&self) {
        signal(self.pid(), libc::SIGSTOP);
    }

    /// Thaws a frozen server (SIGCONT).
    pub fn cont(&self) {
        signal(self.pid(), libc::SIGCONT);
    }

    /// Every log line the server wrote, over all its starts.
    pub fn all_logs(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                String::from_utf8_lossy(&std::fs::read(self.log_path(n)).unwrap_or_default())
                    .into_owned()
            })
            .collect()
    }

    pub fn logs(&self) -> String {
        let log = self.log_path(self.starts);
        format!(
            "--- server stdout\n{}\n--- server stderr (tail, start {})\n{}",
            tail(&log.with_extension("out"), 2_000),
            self.starts,
            tail(&log, 8_000)
        )
    }

    /// A scratch directory for scripts to write into.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join("scratch").join(name);
        std::fs::create_dir_all(&p).expect("mkdir scratch");
        p
    }

    /// A request to `path` on this server, trusting its CA.
    pub fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Http, String> {
        http(
            self.ca.as_deref(),
            method,
            &format!("{}{path}", self.url),
            token,
            body,
        )
    }

    /// The SHA-256 fingerprint of the server's own CA (None unless it is its own CA).
    pub fn ca_fingerprint(&self) -> Option<String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let path = self.ca.as_ref().filter(|_| self.own_ca)?;
        let der = CertificateDer::from_pem_file(path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        Some(fleetrun_proto::tls::fingerprint(&der))
    }

    /// The flags an agent needs to trust this server on first contact: the CA fingerprint to pin
    /// (as `activation create` prints it), the operator's certificate file, or `--insecure-http`
    /// for a plain-HTTP server.
    pub fn agent_trust_args(&self) -> Vec<String> {
        match (self.ca_fingerprint(), &self.ca) {
            (Some(f), _) => vec!["--ca-fingerprint".into(), f],
            (None, Some(ca)) => vec!["--ca-cert".into(), ca.display().to_string()],
            (None, None) => vec!["--insecure-http".into()],
        }
    }

    pub fn get(&self, path: &str) -> Http {
        http(
            self.ca.as_deref(),
            "GET",
            &format!("{}{path}", self.url),
            Some(&self.token),
            None,
        )
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub fn get_json(&self, path: &str) -> Value {
        let r = self.get(path);
        assert_eq!(
            r.status,
            200,
            "GET {path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        r.json()
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Http {
        http(
            self.ca.as_deref(),
            "POST",
            &format!("{}{path}", self.url),
            Some(&self.token),
            Some(("application/json", body.to_string().into_bytes())),
        )
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// Creates an activation and returns its code.
    pub fn activation_code(&self, tags: &[(&str, &str)], limit: u64) -> String {
        self.activation(tags, limit)["code"]
            .as_str()
            .expect("activation code")
            .to_owned()
    }

    /// Creates an activation and returns the whole answer (code, CA fingerprint, ...).
    pub fn activation(&self, tags: &[(&str, &str)], limit: u64) -> Value {
        let tags: serde_json::Map<String, Value> = tags
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
            .collect();
        let r = self.post_json(
            "/v1/activations",
            &serde_json::json!({"tags": tags, "limit": limit}),
        );
        assert!(
            r.status == 200 || r.status == 201,
            "create activation: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        r.json()
    }

    pub fn nodes(&self) -> Vec<Value> {
        match self.get_json("/v1/nodes") {
            Value::Array(a) => a,
            other => panic!("/v1/nodes is not an array: {other}"),
        }
    }

    /// The node with this name, once it is Online.
    pub fn wait_online(&self, name: &str) -> Value {
        self.wait_ping(name, "Online", Duration::from_secs(15))
    }

    /// The node with this name, once its ping status is `status`.
    pub fn wait_ping(&self, name: &str, status: &str, timeout: Duration) -> Value {
        wait_until(&format!("node {name} to be {status}"), timeout, || {
            self.nodes()
                .into_iter()
                .find(|n| n["name"] == name && n["ping_status"] == status)
        })
    }

    /// The id of the node with this name.
    pub fn node_id(&self, name: &str) -> String {
        self.nodes()
            .into_iter()
            .find(|n| n["name"] == name)
            .and_then(|n| n["node_id"].as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("no node named {name}"))
    }

    pub fn command(&self, id: &str) -> Value {
        self.get_json(&format!("/v1/commands/{id}"))
    }

    /// The command (with invocations) once it is terminal.
    pub fn wait_terminal(&self, id: &str, timeout: Duration) -> Value {
        wait_until(&format!("command {id} to end"), timeout, || {
            let c = self.command(id);
            let st = c["status"].as_str().unwrap_or("").to_owned();
            ["Success", "Failed", "TimedOut", "Cancelled"]
                .contains(&st.as_str())
                .then_some(c)
        })
    }

    /// Sends a script with `fleetrun send` (extra flags before `--`); returns the command id.
    pub fn send(&self, flags: &[&str], script: &str) -> String {
        let mut args = vec!["send"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--", script]);
        self.cli(&args).ok().stdout_str().trim().to_owned()
    }

    /// The whole stdout of an invocation, byte for byte, through `fleetrun output`.
    pub fn output(&self, id: &str, node: &str) -> Vec<u8> {
        self.cli(&["output", id, node]).ok().stdout
    }

    /// Runs the CLI against this server.
    pub fn cli(&self, args: &[&str]) -> CliOut {
        run(self.cli_cmd(args), Duration::from_secs(90))
    }

    /// The CLI command with this server's URL and token in env and a private config path, so the
    /// user's own config never leaks in.
    pub fn cli_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(fleetrun_bin());
        c.args(args)
            .env("FLEETRUN_SERVER", &self.url)
            .env("FLEETRUN_TOKEN", &self.token)
            .env("FLEETRUN_CONFIG", self.dir.path().join("cli-config.toml"))
            .env_remove("FLEETRUN_CA_CERT")
            .env_remove("RUST_LOG");
        if let Some(ca) = &self.ca {
            c.env("FLEETRUN_CA_CERT", ca);
        }
        c
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A frozen process dies of SIGKILL too, but let it see the signal at once.
            let _ = signal_quiet(c.id(), libc::SIGCONT);
        }
        self.kill9();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

fn signal_quiet(pid: u32, sig: i32) -> bool {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, sig) == 0 }
}

/// How to start an agent beyond its name: tags, extra flags, a network namespace to run in.
#[derive(Clone, Debug, Default)]
pub struct AgentOpts {
    pub tags: Vec<(String, String)>,
    pub args: Vec<String>,
    /// Run inside this network namespace (`ip netns exec NS ...`).
    pub netns: Option<String>,
    /// The state dir's name when not the node name (two nodes of one name).
    pub state_name: Option<String>,
    /// `--server` when not the server's URL (several replicas' URLs, comma-separated).
    pub server: Option<String>,
}

impl AgentOpts {
    /// Options with these extra flags.
    pub fn args(args: &[&str]) -> AgentOpts {
        AgentOpts {
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            ..AgentOpts::default()
        }
    }
}

/// A running `fleetrun-agent`.
pub struct Agent {
    pub name: String,
    pub state_dir: PathBuf,
    url: String,
    /// Flags for the first start: how to trust the server (see [`Server::agent_trust_args`]).
    trust: Vec<String>,
    logs_dir: PathBuf,
    opts: AgentOpts,
    child: Option<Child>,
    starts: u32,
}

impl Agent {
    /// Enrols a new agent: creates an activation for it, starts it and waits until it is Online.
    pub fn start(server: &Server, name: &str, tags: &[(&str, &str)]) -> Agent {
        let opts = AgentOpts {
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..AgentOpts::default()
        };
        Agent::start_opts(server, name, opts)
    }

    /// [`Agent::start`] with extra flags or a namespace.
    pub fn start_opts(server: &Server, name: &str, opts: AgentOpts) -> Agent {
        let activation = server.activation(&[], 1);
        // The agent pins the CA by the fingerprint the activation answer carries.
        assert_eq!(
            activation["ca_fingerprint"].as_str().map(str::to_owned),
            server.ca_fingerprint(),
            "activation answer's CA fingerprint"
        );
        let code = activation["code"].as_str().expect("activation code");
        let agent = Agent::spawn_with_code(server, name, opts, code);
        server.wait_online(name);
        agent
    }

    /// Starts an agent with a given code, without waiting.
    pub fn start_with_code(
        server: &Server,
        name: &str,
        tags: &[(&str, &str)],
        code: &str,
    ) -> Agent {
        let opts = AgentOpts {
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..AgentOpts::default()
        };
        Agent::spawn_with_code(server, name, opts, code)
    }

    /// Starts an agent with a given code and options, without waiting.
    pub fn spawn_with_code(server: &Server, name: &str, opts: AgentOpts, code: &str) -> Agent {
        let mut agent = Agent {
            name: name.to_owned(),
            state_dir: server
                .dir
                .path()
                .join("agents")
                .join(opts.state_name.as_deref().unwrap_or(name)),
            url: opts.server.clone().unwrap_or_else(|| server.url.clone()),
            // A test that says how to trust the server itself gets nothing added.
            trust: if opts
                .args
                .iter()
                .any(|a| a.starts_with("--ca-") || a == "--insecure-http")
            {
                Vec::new()
            } else {
                server.agent_trust_args()
            },
            logs_dir: server.dir.path().join("agents"),
            opts,
            child: None,
            starts: 0,
        };
        agent.spawn(Some(code));
        agent
    }

    fn spawn(&mut self, code: Option<&str>) {
        std::fs::create_dir_all(&self.state_dir).expect("mkdir state dir");
        self.starts += 1;
        let mut c = match &self.opts.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(agent_bin());
                c
            }
            None => Command::new(agent_bin()),
        };
        c.arg("--server")
            .arg(&self.url)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--name", &self.name, "--heartbeat-secs", "1"]);
        if let Some(code) = code {
            c.args(["--activation-code", code]);
        }
        // Trust on first contact; later starts use the CA saved in the state dir (a CA file or
        // plain HTTP are given every time).
        if code.is_some() || self.trust.first().is_some_and(|a| a != "--ca-fingerprint") {
            c.args(&self.trust);
        }
        for (k, v) in &self.opts.tags {
            c.arg("--tag").arg(format!("{k}={v}"));
        }
        // This machine answers connects to IMDS's address: no test agent asks it, unless the test
        // gives its own IMDS.
        if !self.opts.args.iter().any(|a| a == "--imds-endpoint") {
            c.arg("--no-imds");
        }
        c.args(&self.opts.args);
        let child = c
            .env("RUST_LOG", "info")
            .env_remove("FLEETRUN_INSTANCE_ID")
            .env_remove("FLEETRUN_NO_IMDS")
            .env_remove("FLEETRUN_IMDS_ENDPOINT")
            .env_remove("FLEETRUN_SERVER")
            .env_remove("FLEETRUN_STATE_DIR")
            .env_remove("FLEETRUN_ACTIVATION_CODE")
            .env_remove("FLEETRUN_SPOOL_MAX_BYTES")
            .env_remove("FLEETRUN_KEY_ROTATION")
            .env_remove("FLEETRUN_SWEEP_AFTER")
            .env_remove("FLEETRUN_CA_CERT")
            .env_remove("FLEETRUN_CA_FINGERPRINT")
            .stdin(Stdio::null())
            .stdout(log_file(&self.log_path(self.starts).with_extension("out")))
            .stderr(log_file(&self.log_path(self.starts)))
            .spawn()
            .expect("spawn fleetrun-agent");
        self.child = Some(child);
    }

    /// The agent's pid (`ip netns exec` execs the agent, so it is the agent's too).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent not running").id()
    }

    /// Kills the agent (SIGKILL, as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = signal_quiet(c.id(), libc::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the agent (SIGSTOP).
    pub fn stop(&self) {
        signal(self.pid(), libc::SIGSTOP);
    }

    /// Thaws a frozen agent (SIGCONT).
    pub fn cont(&self) {
        signal(self.pid(), libc::SIGCONT);
    }

    /// Starts the agent again with its state dir; it needs no activation code.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn(None);
    }

    /// Waits for the agent process to exit by itself; its status and stderr.
    pub fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, String) {
        let child = self.child.as_mut().expect("agent not running");
        let st = wait_until("the agent to exit", timeout, || {
            child.try_wait().ok().flatten()
        });
        self.child = None;
        (st, tail(&self.log_path(self.starts), 4_000))
    }

    /// The stderr log of the agent's `n`th start.
    fn log_path(&self, n: u32) -> PathBuf {
        self.logs_dir.join(format!("{}.{n}.log", self.name))
    }

    /// The directory the agent keeps an invocation's journal and output spool in.
    pub fn run_dir(&self, command_id: &str) -> PathBuf {
        self.state_dir.join("runs").join(command_id)
    }

    /// Everything this agent logged, over all its starts.
    pub fn all_logs(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                String::from_utf8_lossy(&std::fs::read(self.log_path(n)).unwrap_or_default())
                    .into_owned()
            })
            .collect()
    }

    pub fn logs(&self) -> String {
        format!(
            "--- agent {} stderr (tail, start {})\n{}",
            self.name,
            self.starts,
            tail(&self.log_path(self.starts), 6_000)
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// What a CLI run gave.
pub struct CliOut {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl CliOut {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}\nstderr: {}",
                self.stdout_str(),
                self.stderr
            )
        })
    }
    /// Asserts exit 0 and returns self.
    pub fn ok(self) -> Self {
        assert!(
            self.status.success(),
            "expected success, got {}\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout_str(),
            self.stderr
        );
        self
    }
    /// Asserts a one-line `error: ...` on stderr and exit 1; returns the line.
    pub fn one_line_error(&self) -> String {
        assert_eq!(
            self.code(),
            Some(1),
            "expected exit 1\nstdout: {}\nstderr: {}",
            self.stdout_str(),
            self.stderr
        );
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "expected one error line, got: {:?}",
            self.stderr
        );
        assert!(lines[0].starts_with("error: "), "{:?}", self.stderr);
        lines[0].to_owned()
    }
}

/// Runs a command to its end with a deadline, reading its pipes concurrently (outputs can be large).
pub fn run(cmd: Command, timeout: Duration) -> CliOut {
    run_input(cmd, None, timeout)
}

/// [`run`], feeding `input` to stdin.
pub fn run_input(cmd: Command, input: Option<&[u8]>, timeout: Duration) -> CliOut {
    let stdin = if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    run_with(cmd, stdin, input, timeout)
}

/// [`run`], with stdin read from `file`.
pub fn run_from_file(cmd: Command, file: &Path, timeout: Duration) -> CliOut {
    let file = std::fs::File::open(file).expect("open stdin file");
    run_with(cmd, file.into(), None, timeout)
}

fn run_with(mut cmd: Command, stdin: Stdio, input: Option<&[u8]>, timeout: Duration) -> CliOut {
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        use std::io::Write;
        let input = input.to_vec();
        // From a thread, so a child that does not read stdin cannot block the test.
        std::thread::spawn(move || stdin.write_all(&input));
    }
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = t_err.join().unwrap_or_default();
            panic!(
                "{cmd:?} did not finish in {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    CliOut {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned(),
    }
}

/// Whether a process is alive (exists and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses, which may itself contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Pids of live processes whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline"))
            && String::from_utf8_lossy(&cmdline).contains(marker)
            && alive(pid)
        {
            found.push(pid);
        }
    }
    found
}

/// A unique marker for one test's processes.
pub fn marker(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("FLEETRUN_MARKER_{tag}_{}_{nanos}", std::process::id())
}

/// Reads a pid written by a script.
pub fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The invocations of a command JSON.
pub fn invocations(cmd: &Value) -> Vec<Value> {
    cmd["invocations"].as_array().cloned().unwrap_or_default()
}

/// A shell snippet that waits (boundedly, 30 s) until `path` exists.
pub fn wait_for_file(path: &Path) -> String {
    format!(
        "n=0; while [ ! -e '{p}' ] && [ $n -lt 600 ]; do sleep 0.05; n=$((n+1)); done",
        p = path.display()
    )
}

/// Lines in a counter file that a script appends to once per run.
pub fn runs(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// PyPI packages of the harness's venv, versions checked to work together (awscli pins its
/// botocore; moto's server is the S3-compatible store of the object-store tests).
const PIP_PACKAGES: [&str; 3] = ["awscli==1.46.3", "boto3==1.44.5", "moto[server]==5.2.5"];

/// A venv with the AWS CLI, boto3 and moto's server: `FLEETRUN_AWS_VENV`, else a cache dir shared
/// between runs, made on first use under a file lock (tests of one binary run in parallel). It
/// fails, never skips, when python3 or the PyPI registry is missing.
pub fn python_venv() -> PathBuf {
    let dir = std::env::var_os("FLEETRUN_AWS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir);
            home.join(".cache").join("fleetrun-py-venv")
        });
    let bin = dir.join("bin");
    let ready = || {
        Command::new(bin.join("python"))
            .args(["-c", "import boto3, awscli, moto"])
            .output()
            .is_ok_and(|o| o.status.success())
            && bin.join("aws").exists()
            && bin.join("moto_server").exists()
    };
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).expect("venv parent dir");
    }
    let lock_path = dir.with_extension("lock");
    let lock = std::fs::File::create(&lock_path)
        .unwrap_or_else(|e| panic!("create {}: {e}", lock_path.display()));
    lock.lock()
        .unwrap_or_else(|e| panic!("lock {}: {e}", lock_path.display()));
    if ready() {
        return dir;
    }
    let st = Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&dir)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "the tests need python3 (with venv) to make a venv for awscli, boto3 and moto: {e}"
            )
        });
    assert!(st.success(), "python3 -m venv {} failed", dir.display());
    let st = Command::new(bin.join("pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(PIP_PACKAGES)
        .status()
        .unwrap_or_else(|e| panic!("pip in {}: {e}", dir.display()));
    assert!(
        st.success(),
        "pip install {PIP_PACKAGES:?} failed (is the PyPI registry reachable?)"
    );
    assert!(
        ready(),
        "awscli, boto3 and moto did not install into {}",
        dir.display()
    );
    dir
}

/// AWS CLI v2 (Debian's `awscli` package: PyPI's `awscli` is v1): `/usr/bin/aws` when it reports
/// `aws-cli/2`; else, as root, installed once with apt-get under a file lock (test binaries run in
/// parallel); else the test fails naming what is missing and how to install it (never skips).
pub fn aws_cli_v2() -> PathBuf {
    let aws = PathBuf::from("/usr/bin/aws");
    let version = || {
        Command::new(&aws).arg("--version").output().ok().map(|o| {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        })
    };
    let is_v2 = || version().is_some_and(|v| v.starts_with("aws-cli/2"));
    if is_v2() {
        return aws;
    }
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "the SSM tests need AWS CLI v2 at /usr/bin/aws (found: {:?}); install it: sudo apt-get install -y awscli (Debian's package is v2)",
        version()
    );
    let lock_path = std::env::temp_dir().join("fleetrun-awscli-v2.lock");
    let lock = std::fs::File::create(&lock_path)
        .unwrap_or_else(|e| panic!("create {}: {e}", lock_path.display()));
    lock.lock()
        .unwrap_or_else(|e| panic!("lock {}: {e}", lock_path.display()));
    if is_v2() {
        return aws;
    }
    for args in [
        &["update"][..],
        &["install", "-y", "--no-install-recommends", "awscli"],
    ] {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .unwrap_or_else(|e| panic!("apt-get {args:?} (to install AWS CLI v2): {e}"));
        assert!(
            out.status.success(),
            "apt-get {args:?} failed (AWS CLI v2 is Debian's awscli package):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        is_v2(),
        "apt-get installed awscli, but /usr/bin/aws reports {:?}, not aws-cli/2",
        version()
    );
    aws
}

/// A real S3-compatible server (moto's, from the harness's venv) on a free loopback port, killed
/// when dropped. It checks no signatures; any access key works.
pub struct S3Server {
    pub url: String,
    venv: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl S3Server {
    pub fn start() -> S3Server {
        let venv = python_venv();
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port("127.0.0.1");
        let log = dir.path().join("moto.log");
        let child = Command::new(venv.join("bin").join("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log_file(&log))
            .stderr(log_file(&log))
            .spawn()
            .expect("spawn moto_server");
        let mut s3 = S3Server {
            url: format!("http://127.0.0.1:{port}"),
            venv,
            child,
            _dir: dir,
        };
        let url = s3.url.clone();
        wait_until("moto_server to answer", Duration::from_secs(60), || {
            if let Ok(Some(st)) = s3.child.try_wait() {
                panic!("moto_server exited with {st}:\n{}", tail(&log, 4_000));
            }
            http(None, "GET", &format!("{url}/moto-api/"), None, None)
                .ok()
                .filter(|r| r.status < 500)
        });
        s3
    }

    /// Makes a bucket.
    pub fn create_bucket(&self, bucket: &str) {
        let r = http(None, "PUT", &format!("{}/{bucket}", self.url), None, None)
            .unwrap_or_else(|e| panic!("create bucket {bucket}: {e}"));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }

    /// The keys under `prefix` in `bucket`, with their sizes (one listing page: up to 1,000).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<(String, u64)> {
        let url = format!("{}/{bucket}?list-type=2&prefix={prefix}", self.url);
        let r = http(None, "GET", &url, None, None).unwrap_or_else(|e| panic!("list: {e}"));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let xml = String::from_utf8_lossy(&r.body).into_owned();
        let field = |item: &str, tag: &str| -> Option<String> {
            let open = format!("<{tag}>");
            let start = item.find(&open)? + open.len();
            let len = item[start..].find(&format!("</{tag}>"))?;
            Some(item[start..start + len].to_owned())
        };
        xml.split("<Contents>")
            .skip(1)
            .filter_map(|item| {
                let key = field(item, "Key")?;
                let size = field(item, "Size")?.parse().ok()?;
                Some((key, size))
            })
            .collect()
    }

    /// An object's bytes, read with boto3 (moto refuses unsigned reads of objects).
    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        let script = "import boto3, sys\n\
            s3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='test',\n\
                aws_secret_access_key='test', region_name='us-east-1')\n\
            sys.stdout.buffer.write(s3.get_object(Bucket=sys.argv[2], Key=sys.argv[3])['Body'].read())\n";
        let out = Command::new(self.venv.join("bin").join("python"))
            .args(["-c", script, &self.url, bucket, key])
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "get {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Stops the store (to test a server whose store went away).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `len` bytes of a xorshift stream, the same for the same seed: nothing a compressor or line
/// handling would leave alone.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
