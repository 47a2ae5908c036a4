//! Issue 13: EC2 instance ids. An agent registers under an `i-` id given by `--instance-id` or by
//! IMDSv2 (a fake one here, a real HTTP peer on a loopback port), is sent commands by it, and keeps
//! it across restarts; an IMDS that never answers does not keep a node from registering (under a
//! new `mi-` id); a malformed id and one already taken are refused with clear, fatal errors.

use crate::node_identity::{dial_channel, next_frame};
use crate::support::{Agent, AgentOpts, Server, wait_until};
use fleetrun_proto::channel::{AgentFrame, NodeInfo, ServerFrame};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ID: &str = "i-0123456789abcdef0";

/// How the fake IMDS answers.
#[derive(Clone, Copy)]
enum Imds {
    /// As EC2's IMDSv2: a token for a PUT with a TTL, the id for a GET with that token, else 401.
    Serves(&'static str),
    /// Accepts connections and never answers.
    Hangs,
}

/// A fake instance metadata service on a loopback port; `seen` lists each request's method, path
/// and token header. Its thread serves until the test process ends.
struct FakeImds {
    endpoint: String,
    seen: Arc<Mutex<Vec<String>>>,
}

const TOKEN: &str = "AQAEAFakeImdsToken==";

impl FakeImds {
    fn start(mode: Imds) -> FakeImds {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake IMDS");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                match mode {
                    Imds::Hangs => {
                        log.lock().expect("lock").push("connected".to_owned());
                        held.push(conn);
                    }
                    Imds::Serves(id) => answer(conn, id, &log),
                }
            }
        });
        FakeImds { endpoint, seen }
    }
}

fn answer(mut conn: TcpStream, id: &str, log: &Mutex<Vec<String>>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or_default().to_owned();
    let header = |name: &str| {
        head.split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
    };
    let token = header("x-aws-ec2-metadata-token");
    log.lock().expect("lock").push(format!(
        "{request} token={}",
        token.as_deref().unwrap_or("-")
    ));
    let (status, body) = if request.starts_with("PUT /latest/api/token ")
        && header("x-aws-ec2-metadata-token-ttl-seconds").is_some()
    {
        ("200 OK", TOKEN)
    } else if request.starts_with("GET /latest/meta-data/instance-id ")
        && token.as_deref() == Some(TOKEN)
    {
        ("200 OK", id)
    } else {
        ("401 Unauthorized", "")
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
        body.len()
    );
}

fn node(server: &Server, name: &str) -> Value {
    server
        .nodes()
        .into_iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no node named {name}"))
}

#[test]
fn an_agent_given_an_instance_id_registers_under_it_and_is_sent_commands_by_it() {
    let server = Server::start();
    let mut agent = Agent::start_opts(&server, "ec2-a", AgentOpts::args(&["--instance-id", ID]));
    assert_eq!(server.node_id("ec2-a"), ID);
    let id = server.send(&["--node", ID], "echo on $FLEETRUN_NODE_ID");
    let c = server.wait_terminal(&id, Duration::from_secs(30));
    assert_eq!(c["status"], "Success", "{c}");
    assert_eq!(server.output(&id, ID), format!("on {ID}\n").into_bytes());
    // A restart says Hello under the same id (and asks no IMDS: it is registered).
    agent.restart();
    let id = server.send(&["--node", ID], "echo again");
    let c = server.wait_terminal(&id, Duration::from_secs(30));
    assert_eq!(c["status"], "Success", "{c}");
    // The node's own id in the targets: by tag selection and the listing alike.
    let listed: Vec<Value> = server.nodes();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["node_id"], ID);
}

#[test]
fn an_instance_id_already_taken_is_refused_with_node_id_taken() {
    let server = Server::start();
    let _first = Agent::start_opts(&server, "ec2-a", AgentOpts::args(&["--instance-id", ID]));
    let code = server.activation_code(&[], 1);
    let mut second = Agent::spawn_with_code(
        &server,
        "ec2-b",
        AgentOpts::args(&["--instance-id", ID]),
        &code,
    );
    let (status, log) = second.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "{status}\n{log}");
    assert!(
        log.contains("NodeIdTaken") && log.contains(ID) && log.contains("already another node's"),
        "{log}"
    );
    // The first node is untouched, the second never registered, and the refusal is audited.
    let nodes = server.nodes();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0]["name"], "ec2-a");
    let audit = server.get_json("/v1/audit?action=agent.register&limit=100");
    let results: Vec<&str> = audit
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|r| r["result"].as_str())
        .collect();
    assert!(results.contains(&"NodeIdTaken"), "{results:?}");
}

#[test]
fn an_agent_on_ec2_takes_its_instance_id_from_imdsv2() {
    let imds = FakeImds::start(Imds::Serves(ID));
    let server = Server::start();
    let _agent = Agent::start_opts(
        &server,
        "from-imds",
        AgentOpts::args(&["--imds-endpoint", &imds.endpoint]),
    );
    assert_eq!(server.node_id("from-imds"), ID);
    // IMDSv2: the token first (a PUT with a TTL), then the id asked with that token.
    let seen = imds.seen.lock().expect("lock").clone();
    assert_eq!(
        seen,
        [
            "PUT /latest/api/token HTTP/1.1 token=-".to_owned(),
            format!("GET /latest/meta-data/instance-id HTTP/1.1 token={TOKEN}"),
        ]
    );
    let id = server.send(&["--node", ID], "true");
    let c = server.wait_terminal(&id, Duration::from_secs(30));
    assert_eq!(c["status"], "Success", "{c}");
}

#[test]
fn an_imds_that_never_answers_or_answers_nonsense_leaves_a_managed_node() {
    let server = Server::start();
    // Hangs: the agent gives up within its budget and registers with a server-made id.
    let hangs = FakeImds::start(Imds::Hangs);
    let agent = Agent::start_opts(
        &server,
        "not-ec2",
        AgentOpts::args(&["--imds-endpoint", &hangs.endpoint]),
    );
    let id = server.node_id("not-ec2");
    assert!(id.starts_with("mi-"), "{id}");
    assert_eq!(
        hangs.seen.lock().expect("lock").clone(),
        ["connected"],
        "it did ask"
    );
    let logs = agent.all_logs();
    assert!(
        logs.contains("no EC2 instance id from IMDS") && logs.contains("no answer within 1s"),
        "{logs}"
    );
    // An id that is not an instance id is not taken either.
    let nonsense = FakeImds::start(Imds::Serves("mi-0123456789abcdef0"));
    let agent = Agent::start_opts(
        &server,
        "odd-imds",
        AgentOpts::args(&["--imds-endpoint", &nonsense.endpoint]),
    );
    let id = server.node_id("odd-imds");
    assert!(
        id.starts_with("mi-") && id != "mi-0123456789abcdef0",
        "{id}"
    );
    assert!(
        agent.all_logs().contains("invalid EC2 instance id"),
        "{}",
        agent.all_logs()
    );
    assert_eq!(node(&server, "odd-imds")["ping_status"], "Online");
}

#[test]
fn a_malformed_instance_id_is_refused_by_the_agent_and_by_the_server() {
    let server = Server::start();
    // The agent's own check, before it dials.
    let code = server.activation_code(&[], 3);
    let mut agent = Agent::spawn_with_code(
        &server,
        "bad-id",
        AgentOpts::args(&["--instance-id", "i-NOTHEX"]),
        &code,
    );
    let (status, log) = agent.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "{status}");
    assert!(
        log.contains("--instance-id") && log.contains("\"i-NOTHEX\"") && log.contains("`i-`"),
        "{log}"
    );
    // A hand-made RegisterInstance: the server's check, BadNodeInfo naming the id (cut short).
    let long = format!("i-{}", "a".repeat(5000));
    for bad in ["i-NOTHEX", "mi-0123456789abcdef0", "", long.as_str()] {
        let answer = raw_register_instance(&server, &code, bad);
        assert_eq!(answer["error"], "BadNodeInfo", "{bad:.40}: {answer}");
        let m = answer["message"].as_str().expect("message");
        assert!(
            m.contains("is not an EC2 instance id") && m.len() < 300,
            "{m}"
        );
        assert!(m.contains(&bad[..bad.len().min(20)]), "{m}");
    }
    assert!(server.nodes().is_empty(), "{:?}", server.nodes());
    // A good one registers, and the same id again is NodeIdTaken.
    let answer = raw_register_instance(&server, &code, ID);
    assert_eq!(answer, json!({"registered": ID}));
    let answer = raw_register_instance(&server, &code, ID);
    assert_eq!(answer["error"], "NodeIdTaken", "{answer}");
    wait_until("the node listed", Duration::from_secs(10), || {
        (server.nodes().len() == 1).then_some(())
    });
}

/// Registers by hand over the agent channel with a `RegisterInstance` for `instance_id`.
fn raw_register_instance(server: &Server, code: &str, instance_id: &str) -> Value {
    use fleetrun_proto::auth::{self, NodeKey};
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut ws = dial_channel(server).await.expect("dial the agent channel");
        let ServerFrame::Challenge { nonce } = next_frame(&mut ws).await else {
            panic!("the server's first frame is not a Challenge");
        };
        // A new key per registration.
        static SEED: AtomicU8 = AtomicU8::new(1);
        let key = NodeKey::from_seed([SEED.fetch_add(1, Ordering::Relaxed); 32]);
        let pk = key.public_key();
        let frame = AgentFrame::RegisterInstance {
            protocol_version: fleetrun_proto::version::PROTOCOL_VERSION,
            activation_code: code.to_owned(),
            public_key: pk.to_vec(),
            signature: key.sign(&auth::register_instance_message(&nonce, &pk, instance_id)),
            info: NodeInfo {
                name: "raw".into(),
                hostname: "raw".into(),
                ..NodeInfo::default()
            },
            tags: Default::default(),
            instance_id: instance_id.to_owned(),
        };
        ws.send(Message::Binary(frame.encode().into()))
            .await
            .expect("send RegisterInstance");
        match next_frame(&mut ws).await {
            ServerFrame::Error { code, message } => json!({"error": code, "message": message}),
            ServerFrame::Registered { node_id } => json!({"registered": node_id.to_string()}),
            other => panic!("unexpected answer {other:?}"),
        }
    })
}
