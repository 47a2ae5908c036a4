//! `GET /v1/nodes/{node_id}/exec` (and `/v1/sessions/{id}/stream`, a session SSM's StartSession
//! issued, `super::tickets`): a one-shot command on a node, or with a PTY a shell (the
//! login shell, or a command on a terminal), relayed live to the client's WebSocket (the messages
//! are `fleetrun_proto::stream::client`). Authorized by the `shell` action on the node; opened and
//! ended in the audit trail (`exec.open` / `exec.end`, with the session's kind, `exec` or
//! `shell`, in the params) and in a session record of that kind; recorded when `recorded` says
//! so (`super::recording`: output, input when configured, resizes).
//!
//! Flow control end to end: the agent gets output credit only as the client's socket accepts the
//! bytes, and the client's stdin is read only as far as the agent grants credit (one message
//! ahead at most), so a stream holds at most one window per direction here. Resizes are passed on
//! at most every [`RESIZE_INTERVAL`] (the last size wins), so a client cannot flood the agent's
//! connection with them.

use super::recording::{self, Outcome, Recording};
use super::streams::{AgentEvent, Input, StreamHandle, Streams};
use super::tickets::{Preset, Ticket};
use crate::AppState;
use crate::access::audit as trail;
use crate::access::authz::{Action, Principal};
use crate::api::{ApiError, parse_id};
use crate::errors::Code;
use axum::Extension;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{ConnectInfo, Path, State};
use axum::response::Response;
use fleetrun_proto::NodeId;
use fleetrun_proto::api::SessionStatus;
use fleetrun_proto::stream::client::{
    CLIENT_MESSAGE_MAX, ClientEvent, ExecRequest, ServerEvent, TAG_STDERR, TAG_STDIN, TAG_STDOUT,
};
use fleetrun_proto::stream::{STREAM_WINDOW_BULK, StreamFd, StreamKind};
use fleetrun_proto::time::now_ms;
use fleetrun_store::{AuditEntry, NewSession, SessionEnd};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a client has to send its first message (what to run).
pub const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Output credit per stream: what the server may hold of a stream's output for a slow client.
pub const OUTPUT_WINDOW: u64 = STREAM_WINDOW_BULK;
/// Shortest time between two resizes sent to the agent; a newer size waits and replaces the older.
pub const RESIZE_INTERVAL: Duration = Duration::from_millis(50);

/// Upgrades to the exec WebSocket, once the caller may open a shell on the node and the node is
/// connected with an agent that speaks session streams. A known node that is not (or too old an
/// agent) is a `Failed` session record and an `exec.refused` in the trail: the attempt shows.
pub async fn exec(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(node_id): Path<String>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let node: NodeId = parse_id(&node_id, Code::InvalidNodeId)?;
    upgrade(state, p, node, addr, ws, None).await
}

/// `GET /v1/sessions/{session_id}/stream`: the session a ticket of SSM's StartSession names
/// (redeemed by authentication, `crate::api`), on the ticket's node, running what the ticket
/// says. Authorized again now: a policy changed since StartSession applies.
pub async fn ticketed(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(ticket): Extension<Ticket>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let node = ticket.node.clone();
    upgrade(state, p, node, addr, ws, Some(ticket)).await
}

/// Upgrades once `p` may open a shell on `node`; with a ticket, the session takes its id and may
/// run only what it says.
async fn upgrade(
    state: Arc<AppState>,
    p: Principal,
    node: NodeId,
    addr: SocketAddr,
    ws: WebSocketUpgrade,
    ticket: Option<Ticket>,
) -> Result<Response, ApiError> {
    state
        .authz
        .require_node(&state.store, &p, Action::Shell, &node)
        .await?;
    let session = Session {
        state: state.clone(),
        principal: p.name().to_owned(),
        source: addr.to_string(),
        node: node.clone(),
        ticket: ticket.map(|t| (t.session_id, t.preset)),
    };
    let Some(streams) = state.hub.streams(&node) else {
        let known = state
            .store
            .node_refs(Some(std::slice::from_ref(&node)))
            .await?;
        if known.is_empty() {
            return Err(ApiError::new(Code::NodeNotFound, format!("no node {node}")));
        }
        let message = format!("node {node} is not connected");
        session.refused_early(&message).await;
        return Err(ApiError::new(Code::Unavailable, message));
    };
    if streams.version() < fleetrun_proto::version::STREAMS_SINCE {
        let message = super::streams::OpenError::TooOld(streams.version()).to_string();
        session.refused_early(&message).await;
        return Err(ApiError::new(Code::Unavailable, message));
    }
    Ok(ws
        .max_message_size(CLIENT_MESSAGE_MAX)
        .max_frame_size(CLIENT_MESSAGE_MAX)
        .on_upgrade(move |socket| session.run(socket, streams)))
}

/// Who runs what where, for the audit trail.
struct Session {
    state: Arc<AppState>,
    principal: String,
    source: String,
    node: NodeId,
    /// The session id and what may run, for a session StartSession issued.
    ticket: Option<(String, Preset)>,
}

/// How a relay ended.
#[derive(Default)]
struct Ended {
    exit: Option<(i32, Option<i32>)>,
    /// Why it did not end with an exit status.
    error: Option<String>,
    bytes_in: u64,
    bytes_out: u64,
    /// Whether the agent started it (and so its record exists).
    started: bool,
    /// Whether the server ended it (terminate, a timeout).
    terminated: bool,
}

pub(super) type Sink = SplitSink<WebSocket, Message>;
pub(super) type Source = SplitStream<WebSocket>;

impl Session {
    async fn run(self, socket: WebSocket, streams: Arc<Streams>) {
        let (mut sink, mut source) = socket.split();
        let first = first_message(&mut source)
            .await
            .and_then(|req| match &self.ticket {
                Some((_, preset)) => ticket_allows(preset, req),
                None => Ok(req),
            });
        let req = match first {
            Ok(req) => req,
            Err(message) => {
                self.audit("exec.refused", serde_json::json!({}), &message)
                    .await;
                return refuse(sink, close_code::POLICY, &message).await;
            }
        };
        let pty = req.pty.is_some();
        let mut params = serde_json::json!({
            "kind": if pty { "shell" } else { "exec" },
            "command": req.command, "run_as": req.run_as, "working_dir": req.working_dir,
            "env": req.env.keys().collect::<Vec<_>>(),
        });
        if let Some(p) = &req.pty {
            params["pty"] = serde_json::json!({"term": p.term, "rows": p.rows, "cols": p.cols});
        }
        let session_id = match &self.ticket {
            Some((id, _)) => id.clone(),
            None => uuid::Uuid::new_v4().to_string(),
        };
        let mut record = NewSession {
            session_id,
            kind: if pty { "shell" } else { "exec" }.into(),
            node_id: self.node.clone(),
            principal: self.principal.clone(),
            source: self.source.clone(),
            run_as: req.run_as.clone(),
            command: record_command(&req),
            // The attempt; the agent's start replaces it.
            started_at: now_ms(),
            recording: Default::default(),
        };
        // Recording starts before anything runs: one that cannot start refuses the session.
        let header = self.recording_header(&req);
        let record_it = recorded(&req);
        let kind = match stream_kind(req) {
            Ok(kind) => kind,
            Err(message) => {
                self.audit("exec.refused", params, &message).await;
                return refuse(sink, close_code::POLICY, &message).await;
            }
        };
        // The trail's open and end name the record they belong to.
        params["session_id"] = record.session_id.clone().into();
        let recording = Recording::start(
            self.state.objects.as_ref(),
            self.state.recording,
            record_it,
            &record.session_id,
            header,
        );
        let mut recording = match recording.await {
            Ok(r) => r,
            Err(message) => {
                self.record_failed(&record, &message).await;
                self.audit("exec.refused", params, &message).await;
                return refuse(sink, close_code::ERROR, &message).await;
            }
        };
        record.recording = recording.status();
        let stream = match streams.open(kind, OUTPUT_WINDOW) {
            Ok(s) => s,
            Err(e) => {
                recording.abort().await;
                let message = e.to_string();
                self.record_failed(&record, &message).await;
                self.audit("exec.refused", params, &message).await;
                return refuse(sink, close_code::AGAIN, &message).await;
            }
        };
        self.audit("exec.open", params.clone(), "Opened").await;
        tracing::info!(node = %self.node, principal = %self.principal, stream = stream.number(), kind = %record.kind, "session opened");
        let live = &self.state.sessions;
        let mut registration = live.register(&record.session_id, &self.node);
        let ended = relay(
            &mut sink,
            &mut source,
            stream,
            &self,
            &mut record,
            &mut registration.stop,
            &mut recording,
        )
        .await;
        drop(registration);
        // The recording completes before the record and the client hear of the end.
        let recorded = if ended.started {
            recording.finish().await
        } else {
            recording.abort().await;
            Outcome::None
        };
        let mut end = serde_json::json!({
            "bytes_in": ended.bytes_in, "bytes_out": ended.bytes_out,
            "recording": recorded.status().0.as_str(),
        });
        if let Outcome::Failed(why) = &recorded {
            tracing::error!(session = %record.session_id, "{why}");
            end["recording_error"] = why.clone().into();
        }
        if ended.started {
            self.record_end(&record.session_id, &ended, &recorded).await;
        } else {
            let why = ended.error.as_deref().unwrap_or("the session ended");
            self.record_failed(&record, why).await;
        }
        let result = match (&ended.exit, &ended.error) {
            (Some((code, signal)), None) => {
                end["exit_code"] = (*code).into();
                end["signal"] = (*signal).into();
                let event = ServerEvent::Exit {
                    code: *code,
                    signal: *signal,
                };
                let _ = sink.send(text(&event)).await;
                let _ = sink.close().await;
                format!("Exited {code}")
            }
            (_, error) => {
                let message = error.clone().unwrap_or_else(|| "the session ended".into());
                end["error"] = message.clone().into();
                refuse(sink, close_code::ERROR, &message).await;
                if ended.terminated {
                    "Terminated".into()
                } else {
                    "Failed".into()
                }
            }
        };
        if let (serde_json::Value::Object(m), Some(e)) = (params, end.as_object_mut()) {
            e.extend(m);
        }
        self.audit("exec.end", end, &result).await;
    }

    /// Records that the agent started the session; a failure is logged, the session goes on.
    async fn record_start(&self, record: &mut NewSession) {
        record.started_at = now_ms();
        if let Err(e) = self.state.store.insert_session(record).await {
            tracing::warn!(session = %record.session_id, error = %e, "cannot record session start");
        }
    }

    /// Records a session that never started as `Failed` with why; a failure is logged.
    async fn record_failed(&self, record: &NewSession, why: &str) {
        let store = &self.state.store;
        if let Err(e) = store.insert_failed_session(record, now_ms(), why).await {
            tracing::warn!(session = %record.session_id, error = %e, "cannot record a failed session");
        }
    }

    /// A refusal before the client said what to run (the node is not connected, its agent too
    /// old): a `Failed` record of kind `exec` without a command, and `exec.refused` naming it.
    async fn refused_early(&self, why: &str) {
        let session_id = match &self.ticket {
            Some((id, _)) => id.clone(),
            None => uuid::Uuid::new_v4().to_string(),
        };
        let record = NewSession {
            session_id,
            kind: "exec".into(),
            node_id: self.node.clone(),
            principal: self.principal.clone(),
            source: self.source.clone(),
            run_as: String::new(),
            command: String::new(),
            started_at: now_ms(),
            recording: Default::default(),
        };
        self.record_failed(&record, why).await;
        let params = serde_json::json!({ "session_id": record.session_id });
        self.audit("exec.refused", params, why).await;
    }

    /// Completes the session's record with how it ended.
    async fn record_end(&self, session_id: &str, ended: &Ended, recorded: &Outcome) {
        let (recording, recording_bytes) = recorded.status();
        let end = SessionEnd {
            recording,
            recording_bytes,
            ended_at: now_ms(),
            bytes_in: ended.bytes_in,
            bytes_out: ended.bytes_out,
            exit_code: ended.exit.map(|(code, _)| code),
            end_reason: match (&ended.exit, &ended.error) {
                (Some(_), None) => "exited".into(),
                (_, error) => error.clone().unwrap_or_else(|| "the session ended".into()),
            },
            status: if ended.terminated {
                SessionStatus::Terminated
            } else {
                SessionStatus::Ended
            },
        };
        if let Err(e) = self.state.store.end_session(session_id, &end).await {
            tracing::warn!(session = %session_id, error = %e, "cannot record session end");
        }
    }

    /// What the session's recording says of it: the PTY's size and `TERM` when it has one.
    fn recording_header(&self, req: &ExecRequest) -> recording::Header {
        let title = format!("{}@{}: {}", self.principal, self.node, req.command);
        let (width, height) = match &req.pty {
            Some(p) => (p.cols, p.rows),
            None => recording::DEFAULT_SIZE,
        };
        let term = match &req.pty {
            Some(p) => Some(p.term.clone()),
            None => req.env.get("TERM").cloned(),
        };
        recording::Header {
            width,
            height,
            timestamp: now_ms() / 1000,
            term,
            shell: req.env.get("SHELL").cloned(),
            title: title.chars().take(200).collect(),
        }
    }

    async fn audit(&self, action: &str, params: serde_json::Value, result: &str) {
        let entry = AuditEntry {
            at: now_ms(),
            principal: self.principal.clone(),
            source: self.source.clone(),
            action: action.into(),
            node_ids: vec![self.node.to_string()],
            params,
            result: result.into(),
            ..AuditEntry::default()
        };
        trail::record(&self.state.store, entry, true).await;
    }
}

/// Whether a session is recorded: the one place it is decided. Sessions on a terminal (a login
/// shell, or `-t -c`): what a person saw. A one-shot command on pipes is not: its output is often
/// bulk or binary (`tar c | ...`), which a terminal recording would only double.
fn recorded(req: &ExecRequest) -> bool {
    req.pty.is_some()
}

/// What a session's record says ran: the command, or for a login shell (an empty command on a
/// PTY) [`LOGIN_SHELL`], so a listing does not show a blank.
fn record_command(req: &ExecRequest) -> String {
    if req.pty.is_some() && req.command.is_empty() {
        LOGIN_SHELL.into()
    } else {
        req.command.clone()
    }
}

/// The command a login shell's record shows (the agent picks the user's shell).
pub const LOGIN_SHELL: &str = "(login shell)";

/// The client's first message: a JSON [`ExecRequest`] within [`FIRST_MESSAGE_TIMEOUT`].
async fn first_message(source: &mut Source) -> Result<ExecRequest, String> {
    let first = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, async {
        loop {
            match source.next().await {
                Some(Ok(Message::Text(t))) => return Ok(t),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Binary(_))) => {
                    return Err(
                        "the first message must be a JSON text message saying what to run".into(),
                    );
                }
                Some(Ok(Message::Close(_))) | None => return Err("the client left".into()),
                Some(Err(e)) => return Err(format!("bad message: {e}")),
            }
        }
    })
    .await
    .map_err(|_| {
        format!(
            "no first message within {} s",
            FIRST_MESSAGE_TIMEOUT.as_secs()
        )
    })??;
    serde_json::from_str::<ExecRequest>(first.as_str())
        .map_err(|e| format!("bad first message: {e}"))
}

/// The first message of a ticket's session, if it asks for what the ticket allows: the login
/// shell (on a PTY) for [`Preset::Shell`], the command (or none, meaning it) for
/// [`Preset::Command`]. The client
/// still picks the PTY's size, `TERM`, the environment and run-as, as on `/v1/nodes/{id}/exec`.
fn ticket_allows(preset: &Preset, req: ExecRequest) -> Result<ExecRequest, String> {
    match preset {
        Preset::Shell if req.pty.is_none() || !req.command.is_empty() => Err(
            "this session was started for the login shell: send an empty command with a \"pty\""
                .into(),
        ),
        // An empty command is "the session's": a client need not repeat it.
        Preset::Command(c) if req.command.is_empty() => Ok(ExecRequest {
            command: c.clone(),
            ..req
        }),
        Preset::Command(c) if req.command != *c => Err(format!(
            "this session was started for the command {c:?}, not {:?}",
            req.command
        )),
        _ => Ok(req),
    }
}

/// What a first message asks the node to run: an `Exec` without a PTY, a `Shell` with one (an
/// empty command: the login shell). The error is the refusal, naming what is wrong.
fn stream_kind(req: ExecRequest) -> Result<StreamKind, String> {
    fleetrun_proto::send::check_run_as(&req.run_as).map_err(|e| e.to_string())?;
    let run_as = (!req.run_as.is_empty()).then_some(req.run_as);
    let env = req.env.into_iter().collect();
    let kind = match req.pty {
        None if req.command.is_empty() => {
            return Err(
                "an empty command is the login shell, which needs a PTY (\"pty\": {\"term\", \"rows\", \"cols\"})"
                    .into(),
            );
        }
        None => StreamKind::Exec {
            command: req.command,
            run_as,
            env,
            working_dir: req.working_dir,
            pty: false,
        },
        Some(_) if !req.working_dir.is_empty() => {
            return Err(
                "working_dir is not supported with a PTY (a shell starts in the user's home)"
                    .into(),
            );
        }
        Some(pty) => StreamKind::Shell {
            command: (!req.command.is_empty()).then_some(req.command),
            run_as,
            term: pty.term,
            rows: pty.rows,
            cols: pty.cols,
            env,
        },
    };
    kind.check().map_err(|e| format!("bad session: {e}"))?;
    Ok(kind)
}

/// Relays until the stream ends, either side leaves or breaks the rules. Every byte and resize
/// passes one of three points, marked "recorded here": output to the client, input from it, and
/// a resize of its window.
async fn relay(
    sink: &mut Sink,
    source: &mut Source,
    mut stream: StreamHandle,
    session: &Session,
    record: &mut NewSession,
    stop: &mut tokio::sync::oneshot::Receiver<String>,
    recording: &mut Recording,
) -> Ended {
    // A shell's record is of kind "shell": the session has a PTY (resizes allowed).
    let pty = record.kind == "shell";
    let mut ended = Ended::default();
    let live = &session.state.sessions;
    // Idle: no bytes either way since `last`; the maximum duration counts from the open.
    let mut last = Instant::now();
    let max_at = live.max_duration.map(|d| Instant::now() + d);
    let mut input = Input::default();
    // A resize waiting for RESIZE_INTERVAL to pass since the last one sent.
    let mut resize: Option<(u16, u16)> = None;
    let mut resize_at = Instant::now();
    loop {
        // A failed send means the connection is gone: the stream's events end next.
        let _ = input.flush(&stream);
        tokio::select! {
            reason = &mut *stop => {
                let reason = reason.unwrap_or_else(|_| "the session was ended".into());
                return terminated(stream, ended, reason);
            }
            () = tokio::time::sleep_until(last + live.idle_timeout) => {
                return terminated(stream, ended, "idle timeout".into());
            }
            () = sleep_until_or_never(max_at) => {
                return terminated(stream, ended, "max duration".into());
            }
            () = tokio::time::sleep_until(resize_at), if resize.is_some() => {
                if let Some((rows, cols)) = resize.take() {
                    // A resize, recorded here as the PTY gets it.
                    if let Err(why) = recording.resize(cols, rows).await {
                        return terminated(stream, ended, why);
                    }
                    stream.send_resize(rows, cols);
                    resize_at = Instant::now() + RESIZE_INTERVAL;
                }
            }
            event = stream.next() => match event {
                None => {
                    ended.error = Some("the node's agent disconnected; the command's outcome is unknown".into());
                    return ended;
                }
                Some(AgentEvent::Credit(n)) => match input.credit(n) {
                    Ok(true) => {
                        session.record_start(record).await;
                        ended.started = true;
                        if sink.send(text(&ServerEvent::Started)).await.is_err() {
                            stream.close("the client left");
                            ended.error = Some("the client left".into());
                            return ended;
                        }
                    }
                    Ok(false) => {}
                    Err(why) => return broken(stream, ended, why),
                },
                Some(AgentEvent::Data(fd, bytes)) => {
                    let tag = match fd {
                        StreamFd::Stdout => TAG_STDOUT,
                        StreamFd::Stderr => TAG_STDERR,
                    };
                    let n = bytes.len();
                    // Output, recorded here, before the client sees it: failing closed, nothing
                    // goes unrecorded.
                    if let Err(why) = recording.output(&bytes).await {
                        return terminated(stream, ended, why);
                    }
                    let mut msg = Vec::with_capacity(n + 1);
                    msg.push(tag);
                    msg.extend_from_slice(&bytes);
                    drop(bytes);
                    // Awaited here: output credit goes back only once the client took the bytes.
                    if sink.send(Message::Binary(msg.into())).await.is_err() {
                        stream.close("the client left");
                        ended.error = Some("the client left".into());
                        return ended;
                    }
                    ended.bytes_out += n as u64;
                    last = Instant::now();
                    stream.consumed(n);
                }
                Some(AgentEvent::Exit { code, signal }) => ended.exit = Some((code, signal)),
                // Only file streams have these.
                Some(AgentEvent::FileInfo { .. } | AgentEvent::FileDone(_)) => {}
                Some(AgentEvent::Close(error)) => {
                    if error.is_some() || ended.exit.is_none() {
                        ended.error = Some(error.unwrap_or_else(|| "the agent ended the session without an exit status".into()));
                    }
                    return ended;
                }
            },
            msg = source.next(), if input.ready() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => {
                    stream.close("the client left");
                    ended.error = Some("the client left".into());
                    return ended;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Binary(b))) => {
                    match b.split_first() {
                        Some((&TAG_STDIN, rest)) => {
                            // Input, recorded here (when configured).
                            if let Err(why) = recording.input(rest).await {
                                return terminated(stream, ended, why);
                            }
                            if input.push(b.slice(1..)).is_err() {
                                return broken(stream, ended, "stdin after its end".into());
                            }
                            ended.bytes_in += rest.len() as u64;
                            last = Instant::now();
                        }
                        _ => return broken(stream, ended, "a binary message must be a stdin tag byte (0) and bytes".into()),
                    }
                }
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ClientEvent>(t.as_str()) {
                    Ok(ClientEvent::Eof) => if input.end().is_err() {
                        return broken(stream, ended, "stdin ended twice".into());
                    },
                    Ok(ClientEvent::End { .. }) => {
                        return broken(stream, ended, "a trailer ({\"type\":\"end\"}) ends a file put, not a command's stdin".into());
                    }
                    Ok(ClientEvent::Resize { .. }) if !pty => {
                        return broken(stream, ended, "a resize needs a PTY (this session has none)".into());
                    }
                    Ok(ClientEvent::Resize { rows, cols }) => {
                        if let Err(e) = fleetrun_proto::stream::check_window(rows, cols) {
                            return broken(stream, ended, format!("bad resize: {e}"));
                        }
                        // Sent (and recorded) by the resize branch, at most every RESIZE_INTERVAL.
                        resize = Some((rows, cols));
                    }
                    Err(e) => return broken(stream, ended, format!("bad message: {e}")),
                },
            },
        }
    }
}

/// Ends a relay whose peer broke the rules: the stream is hung up, the client told why.
fn broken(stream: StreamHandle, mut ended: Ended, why: String) -> Ended {
    stream.close(&why);
    ended.exit = None;
    ended.error = Some(why);
    ended
}

/// Ends a relay the server ends (terminate, a timeout): the stream is hung up, the client told why.
fn terminated(stream: StreamHandle, mut ended: Ended, why: String) -> Ended {
    stream.close(&why);
    ended.exit = None;
    ended.error = Some(why);
    ended.terminated = true;
    ended
}

/// Sleeps until `at`, or forever without one.
pub(super) async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Tells the client why, then closes with `code`; bounded, so a client that reads nothing cannot
/// hold the task.
pub(super) async fn refuse(mut sink: Sink, code: u16, message: &str) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let event = ServerEvent::Error {
            message: message.to_owned(),
        };
        let _ = sink.send(text(&event)).await;
        // A close reason is at most 123 bytes.
        let reason: String = message.chars().take(60).collect();
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = sink.send(Message::Close(Some(frame))).await;
        let _ = sink.close().await;
    })
    .await;
}

pub(super) fn text(event: &ServerEvent) -> Message {
    Message::Text(serde_json::to_string(event).unwrap_or_default().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetrun_proto::stream::client::PtyRequest;

    fn req(command: &str, pty: bool) -> ExecRequest {
        ExecRequest {
            command: command.into(),
            run_as: String::new(),
            env: Default::default(),
            working_dir: String::new(),
            pty: pty.then(|| PtyRequest {
                term: "xterm".into(),
                rows: 24,
                cols: 80,
            }),
        }
    }

    #[test]
    fn a_ticket_runs_only_what_start_session_said() {
        let shell = Preset::Shell;
        assert!(ticket_allows(&shell, req("", true)).is_ok());
        let e = ticket_allows(&shell, req("id", true)).expect_err("a command over a shell ticket");
        assert!(e.contains("login shell"), "{e}");
        assert!(
            ticket_allows(&shell, req("", false)).is_err(),
            "a shell needs a PTY"
        );
        let command = Preset::Command("uptime".into());
        let filled = ticket_allows(&command, req("", true)).expect("the session's command");
        assert_eq!(filled.command, "uptime");
        assert!(ticket_allows(&command, req("uptime", false)).is_ok());
        let e = ticket_allows(&command, req("rm -rf /", true)).expect_err("another command");
        assert!(e.contains("not \"rm -rf /\""), "{e}");
    }
}
