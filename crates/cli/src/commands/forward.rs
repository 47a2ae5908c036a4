//! `fleetrun port-forward NODE [BIND:]LOCAL_PORT:[HOST:]REMOTE_PORT` and `fleetrun proxy NODE
//! [HOST:]PORT`: TCP connections made from a node, carried over the server (see
//! `fleetrun_proto::forward`). One control socket holds the forward session; each TCP
//! connection gets a data socket of its own, so one slow connection holds up no other.

use super::Ctx;
use super::exec::resolve;
use crate::client::{ApiError, Client, Socket};
use crate::render::Format;
use anyhow::Context;
use bytes::BytesMut;
use fleetrun_proto::NodeId;
use fleetrun_proto::forward::{DATA_MESSAGE_MAX, DEFAULT_HOST, ForwardEvent};
use fleetrun_proto::stream::client::{ClientEvent, ServerEvent};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::process::ExitCode;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  fleetrun port-forward web-1 8080:80             127.0.0.1:8080 to port 80 on web-1 itself
  fleetrun port-forward web-1 0.0.0.0:0:db:5432   any free port, on every interface, to db:5432 as web-1 reaches it
Each TCP connection is its own stream; one that fails on the node is closed here and logged.
Ctrl-C ends the session. A host other than the node's own (localhost, 127.0.0.0/8, ::1) needs
the `port-forward-remote` action besides `port-forward`.")]
// The help text writes optional parts as `[PART]`, as usage lines do: not doc links.
#[allow(rustdoc::broken_intra_doc_links)]
pub struct ForwardArgs {
    /// The node: its id, or its name or IP address when exactly one node has it
    #[arg(value_name = "NODE")]
    node: String,
    /// What to forward: [BIND:]LOCAL_PORT:[HOST:]REMOTE_PORT (BIND 127.0.0.1 unless given,
    /// LOCAL_PORT 0 for any free port, HOST localhost on the node unless given; IPv6 in brackets)
    #[arg(value_name = "SPEC")]
    spec: String,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
For OpenSSH:  ssh -o ProxyCommand='fleetrun proxy %h 22' root@web-1
The end of stdin half-closes the connection; the command exits when the remote side closes.")]
// The help text writes optional parts as `[PART]`, as usage lines do: not doc links.
#[allow(rustdoc::broken_intra_doc_links)]
pub struct ProxyArgs {
    /// The node: its id, or its name or IP address when exactly one node has it
    #[arg(value_name = "NODE")]
    node: String,
    /// Where the node connects: [HOST:]PORT (HOST localhost on the node unless given)
    #[arg(value_name = "TARGET")]
    target: String,
}

/// What `port-forward` listens on and where the node connects.
#[derive(Debug, PartialEq, Eq)]
struct Spec {
    bind: String,
    local: u16,
    host: String,
    port: u16,
}

/// Splits `a:b:[c::d]:e` at the colons outside brackets, brackets removed.
fn fields(s: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        let (field, after) = if let Some(inner) = rest.strip_prefix('[') {
            let Some(end) = inner.find(']') else {
                anyhow::bail!("an unclosed [ in {s:?}");
            };
            let after = &inner[end + 1..];
            if !after.is_empty() && !after.starts_with(':') {
                anyhow::bail!("a ] not followed by : in {s:?}");
            }
            (&inner[..end], after.strip_prefix(':'))
        } else {
            match rest.split_once(':') {
                Some((f, a)) => (f, Some(a)),
                None => (rest, None),
            }
        };
        out.push(field.to_owned());
        match after {
            Some(a) => rest = a,
            None => return Ok(out),
        }
    }
}

fn port(s: &str, what: &str, zero_ok: bool) -> anyhow::Result<u16> {
    match s.parse::<u16>() {
        Ok(0) if !zero_ok => anyhow::bail!("{what} 0 is not a port to connect to"),
        Ok(p) => Ok(p),
        Err(_) => anyhow::bail!("{what} {s:?} is not a port (0 to 65535)"),
    }
}

/// Parses `[BIND:]LOCAL_PORT:[HOST:]REMOTE_PORT`. With three fields the middle one tells: a port
/// makes them BIND:LOCAL:REMOTE, anything else LOCAL:HOST:REMOTE.
fn parse_spec(s: &str) -> anyhow::Result<Spec> {
    let f = fields(s)?;
    let is_port = |x: &str| x.parse::<u16>().is_ok();
    let (bind, local, host, remote) = match f.as_slice() {
        [l, r] => ("127.0.0.1", l, DEFAULT_HOST, r),
        [b, l, r] if is_port(l) && !is_port(b) => (b.as_str(), l, DEFAULT_HOST, r),
        [l, h, r] => ("127.0.0.1", l, h.as_str(), r),
        [b, l, h, r] => (b.as_str(), l, h.as_str(), r),
        _ => anyhow::bail!(
            "{s:?} is not [BIND:]LOCAL_PORT:[HOST:]REMOTE_PORT (e.g. 8080:80 or 127.0.0.1:0:db:5432)"
        ),
    };
    if bind.is_empty() || host.is_empty() {
        anyhow::bail!("{s:?} has an empty address");
    }
    Ok(Spec {
        bind: bind.to_owned(),
        local: port(local, "local port", true)?,
        host: host.to_owned(),
        port: port(remote, "remote port", false)?,
    })
}

/// Parses `[HOST:]PORT`.
fn parse_target(s: &str) -> anyhow::Result<(String, u16)> {
    match fields(s)?.as_slice() {
        [p] => Ok((DEFAULT_HOST.to_owned(), port(p, "port", false)?)),
        [h, p] if !h.is_empty() => Ok((h.clone(), port(p, "port", false)?)),
        _ => anyhow::bail!("{s:?} is not [HOST:]PORT (e.g. 22 or db:5432)"),
    }
}

/// A query value, percent-encoded.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A forward session: its control socket, once the server said it is ready, and its id.
async fn open_session(
    client: &Client,
    node: &NodeId,
    host: &str,
    port: u16,
) -> anyhow::Result<(Socket, String)> {
    let path = format!(
        "/v1/nodes/{node}/port-forward?host={}&port={port}",
        encode(host)
    );
    let mut ws = client
        .socket(&path)
        .await
        .with_context(|| format!("cannot open a port forward through {node}"))?;
    match control_event(&mut ws).await? {
        ForwardEvent::Ready { session_id, .. } => Ok((ws, session_id)),
        ForwardEvent::Error { message } => Err(session_failed(message)),
    }
}

/// The next event on a control socket; the socket's end is an error.
async fn control_event(ws: &mut Socket) -> anyhow::Result<ForwardEvent> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(t.as_str()).map_err(|e| {
                    anyhow::anyhow!("the server sent a message this CLI does not know: {e}")
                });
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(Message::Binary(_))) => {
                anyhow::bail!("the server sent a message this CLI does not know")
            }
            Some(Ok(Message::Close(_))) | None => {
                anyhow::bail!("the server closed the port forward")
            }
            Some(Err(e)) => anyhow::bail!("the port forward broke: {e}"),
        }
    }
}

fn session_failed(message: String) -> anyhow::Error {
    ApiError {
        code: "SessionFailed".into(),
        message,
    }
    .into()
}

/// Closes a socket politely, bounded.
async fn close(ws: &mut SplitSink<Socket, Message>) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = ws.send(Message::Close(Some(frame))).await;
        let _ = ws.close().await;
    })
    .await;
}

/// Carries one TCP connection (or stdin/stdout) over a data socket of session `id` until the
/// remote side closes (`Ok`) or the connection fails (`Err`, the node's or server's reason).
async fn carry(
    client: &Client,
    id: &str,
    mut local_in: impl AsyncRead + Unpin,
    mut local_out: impl AsyncWrite + Unpin,
) -> anyhow::Result<()> {
    let ws = client.socket(&format!("/v1/sessions/{id}/tcp")).await?;
    let (mut sink, mut source) = ws.split();
    let mut up = Box::pin(async {
        loop {
            // A buffer per message: it leaves as the message's bytes, without a copy.
            let mut chunk = BytesMut::with_capacity(DATA_MESSAGE_MAX);
            let n = {
                let mut limited = (&mut local_in).take(DATA_MESSAGE_MAX as u64);
                limited.read_buf(&mut chunk).await.unwrap_or(0)
            };
            if n == 0 {
                let eof = serde_json::to_string(&ClientEvent::Eof).unwrap_or_default();
                let _ = sink.send(Message::Text(eof.into())).await;
                return;
            }
            if sink.send(Message::Binary(chunk.freeze())).await.is_err() {
                return;
            }
        }
    });
    let down = receive(&mut source, &mut local_out);
    tokio::pin!(down);
    let mut up_done = false;
    let ended = loop {
        tokio::select! {
            r = &mut down => break r,
            () = &mut up, if !up_done => up_done = true,
        }
    };
    // `up` borrows the sink: dropped first.
    drop(up);
    close(&mut sink).await;
    ended
}

/// Writes what the data socket brings to `out` until its end.
async fn receive(
    source: &mut SplitStream<Socket>,
    out: &mut (impl AsyncWrite + Unpin),
) -> anyhow::Result<()> {
    loop {
        match source.next().await {
            Some(Ok(Message::Binary(b))) => {
                out.write_all(&b).await.context("cannot write locally")?;
                out.flush().await.context("cannot write locally")?;
            }
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerEvent>(t.as_str()) {
                Ok(ServerEvent::Started) => {}
                Ok(ServerEvent::Error { message }) => return Err(session_failed(message)),
                Ok(
                    ServerEvent::Exit { .. } | ServerEvent::File { .. } | ServerEvent::Done { .. },
                )
                | Err(_) => {
                    anyhow::bail!("the server sent a message this CLI does not know")
                }
            },
            Some(Ok(Message::Close(_))) | None => {
                let _ = out.shutdown().await;
                return Ok(());
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => anyhow::bail!("the connection broke: {e}"),
        }
    }
}

/// `fleetrun port-forward`.
pub async fn port_forward(ctx: &Ctx, args: ForwardArgs) -> anyhow::Result<ExitCode> {
    let spec = parse_spec(&args.spec)?;
    let client = std::sync::Arc::new(ctx.client()?);
    let node = resolve(&client, &args.node).await?;
    let listener = TcpListener::bind((spec.bind.as_str(), spec.local))
        .await
        .with_context(|| format!("cannot listen on {}:{}", spec.bind, spec.local))?;
    let bound = listener.local_addr()?;
    let (control, id) = open_session(&client, &node, &spec.host, spec.port).await?;
    let target = format!("{}:{}", spec.host, spec.port);
    // Before the address is printed: whoever reads it may press Ctrl-C at once.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    match ctx.format {
        Format::Json => println!(
            "{}",
            serde_json::json!({
                "bound": bound.to_string(), "node_id": node.to_string(), "host": spec.host,
                "port": spec.port, "session_id": id,
            })
        ),
        Format::Table => println!("Forwarding {bound} -> {target} on {node} (session {id})"),
    }
    let (mut control_tx, mut control_rx) = control.split();
    let ended = loop {
        tokio::select! {
            _ = sigint.recv() => break Ok(ExitCode::SUCCESS),
            _ = sigterm.recv() => break Ok(ExitCode::SUCCESS),
            msg = control_rx.next() => break Err(match msg {
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ForwardEvent>(t.as_str()) {
                    Ok(ForwardEvent::Error { message }) => session_failed(message),
                    _ => anyhow::anyhow!("the server sent a message this CLI does not know"),
                },
                Some(Err(e)) => anyhow::anyhow!("the port forward broke: {e}"),
                _ => anyhow::anyhow!("the server closed the port forward"),
            }),
            accepted = listener.accept() => {
                let (conn, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("fleetrun: cannot accept a connection on {bound}: {e}");
                        continue;
                    }
                };
                let _ = conn.set_nodelay(true);
                let (client, id, target) = (client.clone(), id.clone(), target.clone());
                tokio::spawn(async move {
                    let (rd, wr) = conn.into_split();
                    if let Err(e) = carry(&client, &id, rd, wr).await {
                        eprintln!("fleetrun: connection from {peer} to {target}: {e:#}");
                    }
                });
            }
        }
    };
    close(&mut control_tx).await;
    ended
}

/// `fleetrun proxy`.
pub async fn proxy(ctx: &Ctx, args: ProxyArgs) -> anyhow::Result<ExitCode> {
    let (host, port) = parse_target(&args.target)?;
    let client = ctx.client()?;
    let node = resolve(&client, &args.node).await?;
    let (control, id) = open_session(&client, &node, &host, port).await?;
    let (mut control_tx, mut control_rx) = control.split();
    let mut sigterm = signal(SignalKind::terminate())?;
    let ended = tokio::select! {
        r = carry(&client, &id, stdin(), tokio::io::stdout()) => r,
        msg = control_rx.next() => Err(match msg {
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<ForwardEvent>(t.as_str()) {
                Ok(ForwardEvent::Error { message }) => session_failed(message),
                _ => anyhow::anyhow!("the server sent a message this CLI does not know"),
            },
            _ => anyhow::anyhow!("the server closed the port forward"),
        }),
        _ = sigterm.recv() => Ok(()),
    };
    close(&mut control_tx).await;
    ended.map(|()| ExitCode::SUCCESS)
}

/// Stdin as an async reader fed by a thread of its own: a blocking read cannot be cancelled, and
/// tokio's own stdin would hold up the exit until it returned (ssh keeps our stdin open until we
/// exit). A pipe of one message's size keeps the thread at most that far ahead.
fn stdin() -> tokio::io::DuplexStream {
    let (reader, mut writer) = tokio::io::duplex(DATA_MESSAGE_MAX);
    let rt = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; DATA_MESSAGE_MAX];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if rt.block_on(writer.write_all(&buf[..n])).is_err() {
                return;
            }
        }
        // The end of stdin: the reader sees its end once the writer is gone.
        let _ = rt.block_on(writer.shutdown());
    });
    reader
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(bind: &str, local: u16, host: &str, port: u16) -> Spec {
        Spec {
            bind: bind.into(),
            local,
            host: host.into(),
            port,
        }
    }

    #[test]
    fn specs_and_targets_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_spec("8080:80").unwrap(),
            spec("127.0.0.1", 8080, "localhost", 80)
        );
        assert_eq!(
            parse_spec("0.0.0.0:0:22").unwrap(),
            spec("0.0.0.0", 0, "localhost", 22)
        );
        assert_eq!(
            parse_spec("0:db.internal:5432").unwrap(),
            spec("127.0.0.1", 0, "db.internal", 5432)
        );
        assert_eq!(
            parse_spec("[::1]:9000:[fd00::5]:443").unwrap(),
            spec("::1", 9000, "fd00::5", 443)
        );
        assert_eq!(
            parse_spec("localhost:0:10.0.0.1:22").unwrap(),
            spec("localhost", 0, "10.0.0.1", 22)
        );
        for (bad, says) in [
            ("80", "is not [BIND:]"),
            ("8080:0", "remote port 0"),
            ("x:80", "local port \"x\""),
            ("1:2:3:4:5", "is not [BIND:]"),
            ("[::1:80:22", "unclosed"),
            ("70000:22", "not a port"),
        ] {
            let e = parse_spec(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert_eq!(parse_target("22").unwrap(), ("localhost".into(), 22));
        assert_eq!(parse_target("db:5432").unwrap(), ("db".into(), 5432));
        assert_eq!(parse_target("[::1]:22").unwrap(), ("::1".into(), 22));
        assert!(parse_target("0").is_err() && parse_target("a:b:c").is_err());
        assert_eq!(encode("a b&[:]"), "a%20b%26%5B%3A%5D");
    }
}
