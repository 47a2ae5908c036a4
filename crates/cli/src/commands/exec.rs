//! `fleetrun exec NODE -- CMD...`: a one-shot command on one node, live: its stdout and stderr
//! come to ours as written, our stdin goes to it (when ours is not a terminal), and our exit
//! status is its own. SIGINT, SIGTERM or SIGHUP ends the session, and the node stops the
//! command's process group.
//!
//! The session socket and its relay ([`open`], [`relay`]) and the node lookup ([`resolve`]) are
//! shared with `fleetrun shell`, whose PTY sessions add resizes to the same relay.

use super::Ctx;
use crate::client::{ApiError, Client, Socket};
use anyhow::Context;
use fleetrun_proto::NodeId;
use fleetrun_proto::api::Node;
use fleetrun_proto::stream::client::{
    ClientEvent, ExecRequest, ServerEvent, TAG_STDERR, TAG_STDIN, TAG_STDOUT,
};
use fleetrun_proto::targets::{TargetExpr, TargetTerm};
use futures_util::{SinkExt, StreamExt};
use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Stdin is sent to the command when it is not a terminal (a pipe or a file), and closed at its end;
from a terminal the command gets an empty stdin (interactive input comes with `fleetrun shell`).
The exit status is the remote command's (128 + N when signal N ended it).")]
pub struct Args {
    /// The node: its id; its name or IP address, or a target expression (tag:KEY=VALUE,
    /// tag-key:KEY, id:ID; terms ANDed), when exactly one node has it
    #[arg(value_name = "NODE")]
    node: String,
    /// Run as this user on the node (the agent must run as root)
    #[arg(long, value_name = "USER")]
    run_as: Option<String>,
    /// Working directory on the node (else the user's home)
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// The command and its arguments, run by `sh -c` on the node
    #[arg(value_name = "CMD", last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

/// Bytes read from stdin at a time (one message).
const STDIN_CHUNK: usize = 64 * 1024;
/// How long to wait for the server to answer our close after a signal.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let node = resolve(&client, &args.node).await?;
    let req = ExecRequest {
        command: args.command.join(" "),
        run_as: args.run_as.unwrap_or_default(),
        env: Default::default(),
        working_dir: args.cwd.unwrap_or_default(),
        pty: None,
    };
    let signals = Signals::catch()?;
    let ws = open(&client, &node, &req).await?;
    relay(ws, !std::io::stdin().is_terminal(), None, signals).await
}

/// Opens a session on `node` and sends what to run (its first message).
pub(super) async fn open(
    client: &Client,
    node: &NodeId,
    req: &ExecRequest,
) -> anyhow::Result<Socket> {
    let ws = client
        .socket(&format!("/v1/nodes/{node}/exec"))
        .await
        .with_context(|| format!("cannot open a session on {node}"))?;
    start(ws, req).await
}

/// Sends what to run on a session socket (its first message).
pub(super) async fn start(mut ws: Socket, req: &ExecRequest) -> anyhow::Result<Socket> {
    ws.send(Message::Text(serde_json::to_string(req)?.into()))
        .await
        .context("the server closed the session")?;
    Ok(ws)
}

/// A node id as given; else the one node with that name or IP address; else, for a target
/// expression (`tag:role=web`, `tag-key:KEY`, `id:ID`, terms ANDed), the one node it matches.
pub(crate) async fn resolve(client: &Client, given: &str) -> anyhow::Result<NodeId> {
    let given = given.trim();
    if let Ok(id) = given.parse::<NodeId>() {
        return Ok(id);
    }
    if is_expression(given) {
        let expr = TargetExpr::parse(given)
            .map_err(|e| anyhow::anyhow!("bad target expression {given:?}: {e}"))?;
        return pick_matching(&client.nodes().await?, &expr, given);
    }
    pick(&client.nodes().await?, given)
}

/// Whether `given` reads as a target expression rather than a node name: its first term starts
/// with one of the expression's prefixes (node names have no `:`).
pub(crate) fn is_expression(given: &str) -> bool {
    ["tag:", "tag-key:", "id:"]
        .iter()
        .any(|p| given.starts_with(p))
}

/// Whether `node` is matched by every term of `expr` (as the server resolves `send --targets`).
pub(crate) fn matches(expr: &TargetExpr, node: &Node) -> bool {
    expr.0.iter().all(|term| match term {
        TargetTerm::All => true,
        TargetTerm::Tag { key, values } => node.tags.get(key).is_some_and(|v| values.contains(v)),
        TargetTerm::TagKey(keys) => keys.iter().any(|k| node.tags.contains_key(k)),
        TargetTerm::Ids(ids) => ids.contains(&node.node_id),
    })
}

/// The one node `expr` matches; else an error naming the candidates (the matches when several,
/// the nodes one may see when none).
fn pick_matching(nodes: &[Node], expr: &TargetExpr, given: &str) -> anyhow::Result<NodeId> {
    let found: Vec<&Node> = nodes.iter().filter(|n| matches(expr, n)).collect();
    let named = |n: &&Node| format!("{} ({})", n.name, n.node_id);
    match found.as_slice() {
        [one] => Ok(one.node_id.clone()),
        [] => {
            let known = listed(nodes.iter().map(|n| named(&n)));
            anyhow::bail!("no node matches {given:?}; the nodes you may see: {known}")
        }
        many => anyhow::bail!(
            "{} nodes match {given:?}: {}; narrow the expression or give the node id",
            many.len(),
            listed(many.iter().map(named))
        ),
    }
}

/// Most candidates an error names (a fleet can have thousands of nodes).
const CANDIDATES_SHOWN: usize = 20;

/// The one node named `given`, or with `given` among its IP addresses; else an error naming the
/// candidates (the matches when several, the nodes one may see when none).
fn pick(nodes: &[Node], given: &str) -> anyhow::Result<NodeId> {
    let ip = given.parse::<std::net::IpAddr>().ok();
    let matches = |n: &&Node| {
        n.name == given
            || ip.is_some_and(|ip| {
                n.ips
                    .iter()
                    .any(|a| a.parse::<std::net::IpAddr>() == Ok(ip))
            })
    };
    let found: Vec<&Node> = nodes.iter().filter(matches).collect();
    let what = if ip.is_some() {
        "has the address"
    } else {
        "is named"
    };
    match found.as_slice() {
        [one] => Ok(one.node_id.clone()),
        [] => {
            let known = listed(nodes.iter().map(|n| format!("{} ({})", n.name, n.node_id)));
            anyhow::bail!("no node {what} {given:?}; the nodes you may see: {known}")
        }
        many => {
            let ids = listed(many.iter().map(|n| format!("{} ({})", n.name, n.node_id)));
            anyhow::bail!(
                "{} nodes {} {given:?}: {ids}; give the node id",
                many.len(),
                if ip.is_some() {
                    "have the address"
                } else {
                    "are named"
                }
            )
        }
    }
}

/// Up to [`CANDIDATES_SHOWN`] items, comma-separated, with how many more there are.
fn listed(items: impl ExactSizeIterator<Item = String>) -> String {
    let total = items.len();
    if total == 0 {
        return "none".to_owned();
    }
    let shown: Vec<String> = items.take(CANDIDATES_SHOWN).collect();
    match total - shown.len() {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

/// The signals that end a session (SIGINT, SIGTERM, SIGHUP), caught from the moment this exists:
/// `fleetrun shell` takes them before it puts the terminal in raw mode, so none can end the
/// process with the terminal left raw.
pub(super) struct Signals {
    sigint: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
    sighup: tokio::signal::unix::Signal,
}

impl Signals {
    pub(super) fn catch() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            sigint: signal(SignalKind::interrupt())?,
            sigterm: signal(SignalKind::terminate())?,
            sighup: signal(SignalKind::hangup())?,
        })
    }
}

/// Relays until the command's exit (its status is ours), an error, or a signal. With
/// `read_stdin` our stdin goes to the session (else it gets an empty one); `sizes` are our
/// window's sizes (rows, columns) for a PTY session, each change sent as a resize.
pub(super) async fn relay(
    ws: Socket,
    read_stdin: bool,
    sizes: Option<watch::Receiver<(u16, u16)>>,
    signals: Signals,
) -> anyhow::Result<ExitCode> {
    let (sink, mut source) = ws.split();
    // Stdin from a thread of its own: a blocking read cannot be cancelled, and must not hold up
    // the exit. The bounded channel keeps at most a few chunks (tagged stdin messages) ahead of
    // the socket.
    let (stdin_tx, stdin_rx) = mpsc::channel::<Option<Vec<u8>>>(4);
    let stdin = std::io::stdin();
    if !read_stdin {
        let _ = stdin_tx.try_send(None);
    } else {
        std::thread::spawn(move || {
            let mut stdin = stdin.lock();
            loop {
                // Read behind the message's tag byte: the chunk goes out as it is.
                let mut msg = vec![0u8; STDIN_CHUNK + 1];
                msg[0] = TAG_STDIN;
                let chunk = match stdin.read(&mut msg[1..]) {
                    Ok(0) | Err(_) => None,
                    Ok(n) => {
                        msg.truncate(n + 1);
                        // A keystroke need not hold 64 KiB while it waits.
                        if n < 4096 {
                            msg.shrink_to_fit();
                        }
                        Some(msg)
                    }
                };
                let end = chunk.is_none();
                if stdin_tx.blocking_send(chunk).is_err() || end {
                    return;
                }
            }
        });
    }
    // Stdin is written by a task of its own: the server reads it only as the node takes it, and
    // output must go on meanwhile (a `cat` whose stdout is not read stops reading its stdin).
    let (close_tx, close_rx) = tokio::sync::oneshot::channel();
    let writer = tokio::spawn(write_stdin(sink, stdin_rx, sizes, close_rx));
    let Signals {
        mut sigint,
        mut sigterm,
        mut sighup,
    } = signals;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let ended = loop {
        let msg = tokio::select! {
            msg = source.next() => msg,
            _ = sigint.recv() => break Ok(ExitCode::from(130)),
            _ = sigterm.recv() => break Ok(ExitCode::from(143)),
            _ = sighup.recv() => break Ok(ExitCode::from(129)),
        };
        let msg = match msg {
            None | Some(Ok(Message::Close(_))) => {
                break Err(anyhow::anyhow!(
                    "the server closed the session without an exit status"
                ));
            }
            Some(Err(e)) => break Err(anyhow::anyhow!("the session broke: {e}")),
            Some(Ok(m)) => m,
        };
        match msg {
            Message::Binary(b) => match b.split_first() {
                Some((&TAG_STDOUT, rest)) => {
                    stdout.write_all(rest)?;
                    stdout.flush()?;
                }
                Some((&TAG_STDERR, rest)) => {
                    stderr.write_all(rest)?;
                    stderr.flush()?;
                }
                _ => {
                    break Err(anyhow::anyhow!(
                        "the server sent a message this CLI does not know"
                    ));
                }
            },
            Message::Text(t) => match serde_json::from_str::<ServerEvent>(t.as_str()) {
                Ok(ServerEvent::Started) => {}
                Ok(ServerEvent::File { .. } | ServerEvent::Done { .. }) => {
                    break Err(anyhow::anyhow!(
                        "the server sent a file transfer's message to a command session"
                    ));
                }
                Ok(ServerEvent::Exit { code, .. }) => {
                    break Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
                }
                Ok(ServerEvent::Error { message }) => {
                    break Err(ApiError {
                        code: "SessionFailed".into(),
                        message,
                    }
                    .into());
                }
                Err(e) => {
                    break Err(anyhow::anyhow!(
                        "the server sent a message this CLI does not know: {e}"
                    ));
                }
            },
            _ => {}
        }
    };
    // Close the session (after a signal, the node stops the command's process group); bounded:
    // a writer stuck on a full socket is dropped with the process.
    let _ = close_tx.send(());
    let _ = tokio::time::timeout(CLOSE_WAIT, writer).await;
    ended
}

/// Sends stdin (then its end) and the window's new sizes until told to close, then closes the
/// socket.
async fn write_stdin(
    mut sink: futures_util::stream::SplitSink<Socket, Message>,
    mut stdin: mpsc::Receiver<Option<Vec<u8>>>,
    mut sizes: Option<watch::Receiver<(u16, u16)>>,
    mut close: tokio::sync::oneshot::Receiver<()>,
) {
    let mut open = true;
    loop {
        let resized = async {
            match sizes.as_mut() {
                Some(rx) => rx.changed().await.ok().map(|()| *rx.borrow_and_update()),
                None => std::future::pending().await,
            }
        };
        let chunk = tokio::select! {
            _ = &mut close => break,
            chunk = stdin.recv(), if open => chunk,
            size = resized => match size {
                Some((rows, cols)) => {
                    let resize = serde_json::to_string(&ClientEvent::Resize { rows, cols });
                    let msg = Message::Text(resize.unwrap_or_default().into());
                    if sink.send(msg).await.is_err() {
                        return;
                    }
                    continue;
                }
                // The window is no longer followed.
                None => {
                    sizes = None;
                    continue;
                }
            },
        };
        let msg = match chunk {
            // Tagged by the reader.
            Some(Some(msg)) => Message::Binary(msg.into()),
            // The end of stdin (or its reader stopped).
            Some(None) | None => {
                open = false;
                let eof = serde_json::to_string(&ClientEvent::Eof).unwrap_or_default();
                Message::Text(eof.into())
            }
        };
        let send = tokio::select! {
            _ = &mut close => break,
            r = sink.send(msg) => r,
        };
        if send.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u128, name: &str, ips: &[&str]) -> Node {
        Node {
            node_id: NodeId::from_random(n),
            name: name.into(),
            ping_status: "Online".into(),
            last_seen: String::new(),
            hostname: String::new(),
            os: String::new(),
            platform: "linux".into(),
            arch: String::new(),
            ips: ips.iter().map(|s| s.to_string()).collect(),
            agent_version: String::new(),
            tags: Default::default(),
            activation_id: String::new(),
            registered_at: String::new(),
            key_fingerprint: String::new(),
            key_rotated_at: None,
        }
    }

    #[test]
    fn a_node_is_picked_by_unique_name_or_address_and_candidates_are_capped() {
        let nodes = vec![
            node(1, "web-1", &["10.0.0.1", "fd00::1"]),
            node(2, "web-2", &["10.0.0.2"]),
            node(3, "twin", &["10.0.0.9"]),
            node(4, "twin", &["10.0.0.9"]),
        ];
        assert_eq!(pick(&nodes, "web-2").unwrap(), nodes[1].node_id);
        assert_eq!(pick(&nodes, "10.0.0.1").unwrap(), nodes[0].node_id);
        assert_eq!(pick(&nodes, "fd00:0::1").unwrap(), nodes[0].node_id);

        let e = pick(&nodes, "twin").unwrap_err().to_string();
        assert!(
            e.starts_with("2 nodes are named \"twin\": twin (mi-"),
            "{e}"
        );
        let e = pick(&nodes, "10.0.0.9").unwrap_err().to_string();
        assert!(
            e.starts_with("2 nodes have the address \"10.0.0.9\""),
            "{e}"
        );
        let e = pick(&nodes, "10.9.9.9").unwrap_err().to_string();
        assert!(
            e.starts_with("no node has the address \"10.9.9.9\"; the nodes you may see: web-1"),
            "{e}"
        );

        let many: Vec<Node> = (0..50)
            .map(|i| node(100 + i, &format!("n{i}"), &[]))
            .collect();
        let e = pick(&many, "nosuch").unwrap_err().to_string();
        assert!(e.ends_with(" and 30 more"), "{e}");
        assert_eq!(e.matches(" (mi-").count(), CANDIDATES_SHOWN, "{e}");
        assert_eq!(
            pick(&[], "x").unwrap_err().to_string(),
            "no node is named \"x\"; the nodes you may see: none"
        );
    }

    #[test]
    fn a_target_expression_picks_the_one_node_it_matches() {
        let tagged = |n: u128, name: &str, tags: &[(&str, &str)]| {
            let mut node = node(n, name, &[]);
            node.tags = tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            node
        };
        let nodes = vec![
            tagged(1, "web-1", &[("role", "web"), ("env", "prod")]),
            tagged(2, "web-2", &[("role", "web"), ("env", "dev")]),
            tagged(3, "db-1", &[("role", "db")]),
        ];
        let pick = |given: &str| {
            let expr = TargetExpr::parse(given).unwrap();
            pick_matching(&nodes, &expr, given)
        };
        assert_eq!(pick("tag:role=db").unwrap(), nodes[2].node_id);
        assert_eq!(pick("tag:role=web tag:env=prod").unwrap(), nodes[0].node_id);
        assert_eq!(pick("tag-key:env tag:env=dev").unwrap(), nodes[1].node_id);
        let e = pick("tag:role=web").unwrap_err().to_string();
        assert!(
            e.starts_with("2 nodes match \"tag:role=web\": web-1 (mi-"),
            "{e}"
        );
        assert!(
            e.contains("web-2 (mi-") && e.ends_with("give the node id"),
            "{e}"
        );
        let e = pick("tag:role=cache").unwrap_err().to_string();
        assert!(
            e.starts_with("no node matches \"tag:role=cache\"; the nodes you may see: web-1"),
            "{e}"
        );
        assert!(is_expression("tag:role=web") && is_expression("id:mi-0"));
        assert!(!is_expression("web-1") && !is_expression("10.0.0.1"));
    }
}
