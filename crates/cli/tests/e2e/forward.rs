//! Issue 11, `fleetrun port-forward` and `fleetrun proxy`: TCP connections made from the node
//! through the real server and agent, to real TCP servers the tests start on the node's side
//! (here, loopback): byte-exact both ways (1 GiB, and 50 connections at once), half-closes, OpenSSH
//! through `ProxyCommand`, failures on the node, the `port-forward` and `port-forward-remote`
//! actions, terminate, and no socket left open on the node.

use crate::support::{Agent, AgentOpts, Server, noise, run, run_input, signal, wait_until};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

/// An echo server on loopback (the node's side): each connection's bytes come back as they
/// arrive; its half-close is answered with ours once everything is echoed.
struct Echo {
    port: u16,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
}

fn echo_server() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = conn.shutdown(Shutdown::Write);
            });
        }
    });
    Echo { port, accepted }
}

/// A running `fleetrun port-forward -o json`: where it listens, its session, its stderr.
struct Forwarding {
    child: Child,
    bound: SocketAddr,
    session_id: String,
    stderr: Arc<Mutex<String>>,
}

impl Forwarding {
    fn start(server: &Server, node: &str, spec: &str) -> Forwarding {
        Self::start_as(server.cli_cmd(&["port-forward", node, spec, "-o", "json"]))
    }

    fn start_as(mut cmd: Command) -> Forwarding {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn port-forward");
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().expect("stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { return };
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            let mut first = String::new();
            let _ = BufReader::new(out).read_line(&mut first);
            let _ = tx.send(first);
        });
        let line = rx.recv_timeout(LIMIT).unwrap_or_default();
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(100));
            panic!(
                "port-forward printed {line:?}; stderr: {}",
                stderr.lock().map(|s| s.clone()).unwrap_or_default()
            );
        };
        Forwarding {
            child,
            bound: v["bound"]
                .as_str()
                .and_then(|b| b.parse().ok())
                .expect("bound address"),
            session_id: v["session_id"].as_str().expect("session id").to_owned(),
            stderr,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits for the CLI's exit.
    fn wait(&mut self) -> std::process::ExitStatus {
        wait_until("port-forward to exit", LIMIT, || {
            self.child.try_wait().ok().flatten()
        })
    }

    /// Ctrl-C, then its exit.
    fn interrupt(&mut self) -> std::process::ExitStatus {
        signal(self.child.id(), libc::SIGINT);
        self.wait()
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// sha256sum of a stream, fed as it goes (a real process, nothing held in memory).
struct Sha {
    child: Child,
}

impl Sha {
    fn new() -> Sha {
        let child = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sha256sum");
        Sha { child }
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.child
            .stdin
            .as_mut()
            .expect("stdin")
            .write_all(bytes)
            .expect("sha256sum takes input");
    }

    fn finish(mut self) -> String {
        drop(self.child.stdin.take());
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("sha256sum output");
        let _ = self.child.wait();
        out.split_whitespace().next().unwrap_or_default().to_owned()
    }
}

/// Sends `total` bytes through `addr` (an echo behind a forward) while reading what comes back,
/// then half-closes: (sha256 sent, sha256 received, bytes received). Each 1 MiB block carries its
/// number, so a lost, doubled or reordered block changes the hash.
fn echo_through(addr: SocketAddr, total: u64) -> (String, String, u64) {
    let conn = TcpStream::connect(addr).expect("connect to the forward");
    let mut reader = conn.try_clone().expect("clone");
    let receiver = std::thread::spawn(move || {
        let mut sha = Sha::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    sha.feed(&buf[..n]);
                    got += n as u64;
                }
            }
        }
        (sha.finish(), got)
    });
    let mut writer = conn;
    let mut sha = Sha::new();
    let mut block = noise(1 << 20, total);
    let mut sent = 0u64;
    let mut i = 0u64;
    while sent < total {
        block[..8].copy_from_slice(&i.to_le_bytes());
        let n = (total - sent).min(block.len() as u64) as usize;
        writer.write_all(&block[..n]).expect("write to the forward");
        sha.feed(&block[..n]);
        sent += n as u64;
        i += 1;
    }
    writer.shutdown(Shutdown::Write).expect("half-close");
    let (received, got) = receiver.join().expect("receiver");
    (sha.finish(), received, got)
}

/// Established (or half-closed) TCP sockets with `port` at either end, from /proc/net/tcp{,6}.
fn open_sockets(port: u16) -> Vec<String> {
    let mut found = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(table) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in table.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(state)) = (f.get(1), f.get(2), f.get(3)) else {
                continue;
            };
            let port_of = |a: &str| {
                a.rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            };
            // 0A is LISTEN, 06 TIME_WAIT (no process holds it), 07 CLOSE.
            let held = !matches!(*state, "0A" | "06" | "07");
            if held && (port_of(local) == Some(port) || port_of(remote) == Some(port)) {
                found.push(format!("{file}: {line}"));
            }
        }
    }
    found
}

/// The size of the big transfer: 1 GiB, or FLEETRUN_E2E_FORWARD_BYTES.
fn big_size() -> u64 {
    std::env::var("FLEETRUN_E2E_FORWARD_BYTES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1 << 30)
}

#[test]
fn port_forward_carries_a_gigabyte_byte_exact_both_ways() {
    let server = Server::start();
    let _agent = Agent::start(&server, "fwd-big", &[]);
    let echo = echo_server();
    let mut fwd = Forwarding::start(&server, "fwd-big", &format!("0:{}", echo.port));
    assert_eq!(fwd.bound.ip().to_string(), "127.0.0.1");
    assert_ne!(fwd.bound.port(), 0);
    let total = big_size();
    let started = Instant::now();
    let (sent, received, got) = echo_through(fwd.bound, total);
    let took = started.elapsed();
    eprintln!(
        "{total} bytes each way in {took:?} ({:.0} MB/s each way, debug build)",
        total as f64 / 1e6 / took.as_secs_f64()
    );
    assert_eq!(got, total);
    assert_eq!(sent, received, "the bytes that came back differ");
    // Ctrl-C ends the session; nothing stays open on the node.
    assert!(fwd.interrupt().success(), "{}", fwd.stderr());
    wait_until("the node's sockets to close", LIMIT, || {
        open_sockets(echo.port).is_empty().then_some(())
    });
    let s = server.get_json(&format!("/v1/sessions/{}", fwd.session_id));
    assert_eq!(s["status"], "Ended", "{s}");
    assert_eq!(s["kind"], "port-forward", "{s}");
    assert_eq!(s["command"], format!("localhost:{}", echo.port), "{s}");
    assert_eq!(s["bytes_in"].as_u64(), Some(total), "{s}");
    assert_eq!(s["bytes_out"].as_u64(), Some(total), "{s}");
}

#[test]
fn port_forward_carries_fifty_connections_at_once() {
    let server = Server::start();
    // 50 streams at once: past the agent's default cap of 32 (--max-streams).
    let _agent = Agent::start_opts(
        &server,
        "fwd-many",
        AgentOpts::args(&["--max-streams", "64"]),
    );
    let echo = echo_server();
    let mut fwd = Forwarding::start(&server, "fwd-many", &format!("0:127.0.0.1:{}", echo.port));
    let addr = fwd.bound;
    // Every connection is open before any sends: 50 streams at the same time.
    let all_open = Arc::new(std::sync::Barrier::new(50));
    let threads: Vec<_> = (0..50u64)
        .map(|i| {
            let all_open = all_open.clone();
            std::thread::spawn(move || {
                let input = noise(256 * 1024 + i as usize * 4099, i + 7);
                let mut conn = TcpStream::connect(addr).expect("connect");
                all_open.wait();
                let mut reader = conn.try_clone().expect("clone");
                let reading = std::thread::spawn(move || {
                    let mut out = Vec::new();
                    reader.read_to_end(&mut out).map(|_| out)
                });
                conn.write_all(&input).expect("write");
                conn.shutdown(Shutdown::Write).expect("half-close");
                let out = reading.join().expect("reader").expect("read");
                (input == out, input.len(), out.len())
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let (same, sent, got) = t.join().expect("connection thread");
        assert!(
            same,
            "connection {i}: sent {sent} bytes, got {got} back, not the same; {}",
            fwd.stderr()
        );
    }
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 50);
    assert!(fwd.interrupt().success(), "{}", fwd.stderr());
    let ends = wait_until("the end to be audited", LIMIT, || {
        let e = server.get_json("/v1/audit?action=port-forward.end");
        let e = e.as_array().cloned().unwrap_or_default();
        (!e.is_empty()).then_some(e)
    });
    assert_eq!(ends[0]["params"]["connections"], 50, "{:?}", ends[0]);
    wait_until("the node's sockets to close", LIMIT, || {
        open_sockets(echo.port).is_empty().then_some(())
    });
}

#[test]
fn proxy_joins_stdin_and_stdout_to_one_connection() {
    let server = Server::start();
    let _agent = Agent::start(&server, "fwd-proxy", &[]);
    let echo = echo_server();
    let input = noise(3 * 1024 * 1024 + 5, 99);
    // Stdin's end half-closes; the echo then closes, and the proxy exits.
    let out = run_input(
        server.cli_cmd(&["proxy", "fwd-proxy", &echo.port.to_string()]),
        Some(&input),
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input, "the bytes differ");
    // A closed port: a clear error naming host, port and the reason.
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let out = run(
        server.cli_cmd(&["proxy", "fwd-proxy", &format!("127.0.0.1:{port}")]),
        LIMIT,
    );
    let line = out.one_line_error();
    assert!(
        line.contains(&format!(
            "cannot connect to 127.0.0.1:{port}: Connection refused"
        )),
        "{line}"
    );
    // Bad targets are refused before anything opens.
    for (target, says) in [
        ("0", "port 0"),
        ("a:b:c", "[HOST:]PORT"),
        ("99999", "not a port"),
    ] {
        let out = run(server.cli_cmd(&["proxy", "fwd-proxy", target]), LIMIT);
        let line = out.one_line_error();
        assert!(line.contains(says), "{target}: {line}");
    }
}

/// sshd, installed by the harness when missing (as root, with apt-get), or a failure naming it.
fn sshd() -> std::path::PathBuf {
    let path = std::path::PathBuf::from("/usr/sbin/sshd");
    if !path.exists() && unsafe { libc::geteuid() } == 0 {
        let installed = Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "openssh-server",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        eprintln!("apt-get install openssh-server: {installed:?}");
    }
    assert!(
        path.exists(),
        "this test needs OpenSSH's sshd at /usr/sbin/sshd (Debian package openssh-server; \
         the test installs it itself only when run as root)"
    );
    path
}

#[test]
fn openssh_works_through_proxy_command() {
    let sshd = sshd();
    let server = Server::start();
    let _agent = Agent::start(&server, "fwd-ssh", &[]);
    let dir = server.scratch("ssh");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::create_dir_all("/run/sshd").expect("privilege separation dir");
    for key in ["host", "client"] {
        let out = run(
            {
                let mut c = Command::new("ssh-keygen");
                c.args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(dir.join(key));
                c
            },
            LIMIT,
        );
        assert_eq!(out.code(), Some(0), "ssh-keygen: {}", out.stderr);
    }
    std::fs::copy(dir.join("client.pub"), dir.join("authorized_keys")).expect("authorized_keys");
    // Below the ephemeral range: no outgoing connection of another test takes it meanwhile.
    let port = crate::support::free_port("127.0.0.1");
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nAuthorizedKeysFile {keys}\n\
         PidFile {pid}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nAllowUsers {user}\n",
        host = dir.join("host").display(),
        keys = dir.join("authorized_keys").display(),
        pid = dir.join("sshd.pid").display(),
    );
    std::fs::write(dir.join("sshd_config"), config).expect("sshd_config");
    let mut daemon = Command::new(&sshd)
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(dir.join("sshd_config"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("sshd.log")).expect("sshd.log"))
        .spawn()
        .expect("start sshd");
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let daemon = Kill(&mut daemon);
    wait_until("sshd to listen", LIMIT, || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let proxy = format!(
        "{} proxy %h {port}",
        crate::support::fleetrun_bin().display()
    );
    let mut ssh = server.cli_cmd(&[]);
    let ssh = {
        let envs: Vec<(String, String)> = ssh
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_str()?.to_owned(), v?.to_str()?.to_owned())))
            .collect();
        ssh = Command::new("ssh");
        ssh.envs(envs)
            .args([
                "-F",
                "/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
            ])
            .args([
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "-i",
            ])
            .arg(dir.join("client"))
            .arg("-o")
            .arg(format!("ProxyCommand={proxy}"))
            .arg(format!("{user}@fwd-ssh"))
            .arg("echo through-ssh; head -c 1000000 /dev/zero | sha256sum");
        ssh
    };
    let (out, err) = (dir.join("ssh.out"), dir.join("ssh.err"));
    let mut ssh = ssh;
    let mut child = ssh
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("ssh.out"))
        .stderr(std::fs::File::create(&err).expect("ssh.err"))
        .spawn()
        .expect("ssh");
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.success()),
        "ssh ended {status:?}\nssh stderr: {}\nsshd: {}",
        read(&err),
        read(&dir.join("sshd.log"))
    );
    let expected = run(
        {
            let mut c = Command::new("sh");
            c.args(["-c", "head -c 1000000 /dev/zero | sha256sum"]);
            c
        },
        LIMIT,
    );
    assert_eq!(
        read(&out),
        format!("through-ssh\n{}", expected.stdout_str())
    );
    drop(daemon);
}

#[test]
fn a_connection_that_fails_on_the_node_is_closed_and_logged_and_the_forward_goes_on() {
    let server = Server::start();
    let _agent = Agent::start(&server, "fwd-refused", &[]);
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let mut fwd = Forwarding::start(&server, "fwd-refused", &format!("0:{port}"));
    for _ in 0..2 {
        let mut conn = TcpStream::connect(fwd.bound).expect("connect");
        conn.set_read_timeout(Some(LIMIT)).expect("timeout");
        let mut rest = Vec::new();
        // Closed from our side of the forward: an end (or a reset), not a hang.
        let _ = conn.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }
    let err = wait_until("the failure on stderr", LIMIT, || {
        let e = fwd.stderr();
        (e.matches("Connection refused").count() >= 2).then_some(e)
    });
    assert!(
        err.contains(&format!(
            "cannot connect to localhost:{port}: Connection refused"
        )),
        "{err}"
    );
    assert!(
        fwd.child.try_wait().expect("try_wait").is_none(),
        "the forward went on"
    );
    assert!(fwd.interrupt().success());
}

/// A user's token, the user made with `policy` (role none).
fn user_token(server: &Server, name: &str, policy: &str) -> String {
    let policy_file = server.scratch("policies").join(format!("{name}.cedar"));
    std::fs::write(&policy_file, policy).expect("policy");
    let p = policy_file.display().to_string();
    server
        .cli(&["users", "create", name, "--role", "none", "--policy", &p])
        .ok();
    let out = server
        .cli(&["tokens", "create", "--user", name, "-o", "json"])
        .ok();
    out.json()["token"].as_str().expect("token").to_owned()
}

#[test]
fn forwards_need_port_forward_and_remote_hosts_port_forward_remote() {
    let server = Server::start();
    let _agent = Agent::start(&server, "fwd-authz", &[]);
    let shell = user_token(
        &server,
        "shell-only",
        r#"permit (principal, action in [Action::"list", Action::"shell"], resource is Node);"#,
    );
    let local = user_token(
        &server,
        "local-only",
        r#"permit (principal, action in [Action::"list", Action::"port-forward"], resource is Node);"#,
    );
    let as_user = |token: &str, spec: &str| {
        let mut c = server.cli_cmd(&["port-forward", "fwd-authz", spec, "-o", "json"]);
        c.env("FLEETRUN_TOKEN", token);
        c
    };
    let out = run(as_user(&shell, "0:22"), LIMIT);
    let line = out.one_line_error();
    assert!(line.contains("port-forward"), "{line}");
    let out = run(as_user(&local, "0:10.1.2.3:22"), LIMIT);
    let line = out.one_line_error();
    assert!(line.contains("port-forward-remote"), "{line}");
    // Its own ports are fine for local-only, and a remote host for the admin.
    let mut fwd = Forwarding::start_as(as_user(&local, "0:127.0.0.1:22"));
    assert!(fwd.interrupt().success());
    let mut fwd = Forwarding::start(&server, "fwd-authz", "0:10.1.2.3:22");
    assert!(fwd.interrupt().success());
    let refused: Vec<serde_json::Value> = server
        .get_json("/v1/audit?action=nodes.port-forward")
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r["result"].as_str().unwrap_or_default().contains("403"))
        .collect();
    let who: Vec<&str> = refused
        .iter()
        .filter_map(|r| r["principal"].as_str())
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        who.contains(&"shell-only") && who.contains(&"local-only"),
        "{who:?}"
    );
}

#[test]
fn terminate_ends_the_forward_and_closes_its_connections() {
    let server = Server::start();
    let _agent = Agent::start(&server, "fwd-term", &[]);
    let echo = echo_server();
    let mut fwd = Forwarding::start(&server, "fwd-term", &format!("0:{}", echo.port));
    let mut conns: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(fwd.bound).expect("connect"))
        .collect();
    for c in &mut conns {
        c.write_all(b"ping").expect("write");
        let mut back = [0u8; 4];
        c.set_read_timeout(Some(LIMIT)).expect("timeout");
        c.read_exact(&mut back).expect("echo");
        assert_eq!(&back, b"ping");
    }
    assert_eq!(
        open_sockets(echo.port).len(),
        6,
        "agent and echo ends of 3 connections"
    );
    server.cli(&["sessions", "terminate", &fwd.session_id]).ok();
    let status = fwd.wait();
    assert_eq!(status.code(), Some(1));
    assert!(
        fwd.stderr().contains("terminated by admin"),
        "{}",
        fwd.stderr()
    );
    for c in &mut conns {
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }
    wait_until("the node's sockets to close", LIMIT, || {
        open_sockets(echo.port).is_empty().then_some(())
    });
    let s = server.get_json(&format!("/v1/sessions/{}", fwd.session_id));
    assert_eq!(s["status"], "Terminated", "{s}");
}
