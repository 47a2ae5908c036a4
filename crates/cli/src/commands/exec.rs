//! `fleetrun exec NODE -- CMD...`: a one-shot command on one node, live: its stdout and stderr
//! come to ours as written, our stdin goes to it (when ours is not a terminal), and our exit
//! status is its own. SIGINT or SIGTERM ends the session, and the node stops the command's
//! process group.

use super::Ctx;
use crate::client::{ApiError, Client, Socket};
use anyhow::Context;
use fleetrun_proto::NodeId;
use fleetrun_proto::api::Node;
use fleetrun_proto::stream::client::{
    ClientEvent, ExecRequest, ServerEvent, TAG_STDERR, TAG_STDIN, TAG_STDOUT,
};
use futures_util::{SinkExt, StreamExt};
use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Stdin is sent to the command when it is not a terminal (a pipe or a file), and closed at its end;
from a terminal the command gets an empty stdin (interactive input comes with `fleetrun shell`).
The exit status is the remote command's (128 + N when signal N ended it).")]
pub struct Args {
    /// The node: its id, or its name or IP address when exactly one node has it
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
    let mut ws = client
        .socket(&format!("/v1/nodes/{node}/exec"))
        .await
        .with_context(|| format!("cannot open a session on {node}"))?;
    let req = ExecRequest {
        command: args.command.join(" "),
        run_as: args.run_as.unwrap_or_default(),
        env: Default::default(),
        working_dir: args.cwd.unwrap_or_default(),
    };
    ws.send(Message::Text(serde_json::to_string(&req)?.into()))
        .await
        .context("the server closed the session")?;
    relay(ws).await
}

/// A node id as given, or the one node that name or IP address is.
pub(crate) async fn resolve(client: &Client, given: &str) -> anyhow::Result<NodeId> {
    if let Ok(id) = given.trim().parse::<NodeId>() {
        return Ok(id);
    }
    pick(&client.nodes().await?, given)
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

/// Relays until the command's exit (its status is ours), an error, or a signal.
async fn relay(ws: Socket) -> anyhow::Result<ExitCode> {
    let (sink, mut source) = ws.split();
    // Stdin from a thread of its own: a blocking read cannot be cancelled, and must not hold up
    // the exit. The bounded channel keeps at most a few chunks ahead of the socket.
    let (stdin_tx, stdin_rx) = mpsc::channel::<Option<Vec<u8>>>(4);
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        let _ = stdin_tx.try_send(None);
    } else {
        std::thread::spawn(move || {
            let mut stdin = stdin.lock();
            let mut buf = vec![0u8; STDIN_CHUNK];
            loop {
                let chunk = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => None,
                    Ok(n) => Some(buf[..n].to_vec()),
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
    let writer = tokio::spawn(write_stdin(sink, stdin_rx, close_rx));
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let ended = loop {
        let msg = tokio::select! {
            msg = source.next() => msg,
            _ = sigint.recv() => break Ok(ExitCode::from(130)),
            _ = sigterm.recv() => break Ok(ExitCode::from(143)),
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

/// Sends stdin (then its end) until told to close, then closes the socket.
async fn write_stdin(
    mut sink: futures_util::stream::SplitSink<Socket, Message>,
    mut stdin: mpsc::Receiver<Option<Vec<u8>>>,
    mut close: tokio::sync::oneshot::Receiver<()>,
) {
    let mut open = true;
    loop {
        let chunk = tokio::select! {
            _ = &mut close => break,
            chunk = stdin.recv(), if open => chunk,
        };
        let msg = match chunk {
            Some(Some(bytes)) => {
                let mut m = Vec::with_capacity(bytes.len() + 1);
                m.push(TAG_STDIN);
                m.extend_from_slice(&bytes);
                Message::Binary(m.into())
            }
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
}
