//! Frames of the agent channel: one WebSocket per agent, binary messages, each one postcard-encoded
//! [`AgentFrame`] (agent to server) or [`ServerFrame`] (server to agent). See docs/protocol.md.
//!
//! The channel multiplexes streams. An output stream is one output pipe of one invocation
//! ([`StreamId`]); live session streams (since version 3, the `Stream*` frames) are described in
//! [`crate::stream`]. Each output stream is flow-controlled on its own: the sender may have at most [`crate::limits::OUTPUT_WINDOW`] bytes
//! past the receiver's last `Ack`, and the receiver acknowledges only bytes it has durably stored.
//! Every data frame carries its stream and byte offset, so a sender can resend from the last
//! acknowledged offset after a reconnect and the receiver can drop what it already has.

use crate::ids::{CommandId, NodeId};
use crate::stream::{StreamFd, StreamKind, StreamNo};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Facts about a node that its agent reports on every connect.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Display name (`--name`, default the hostname).
    pub name: String,
    /// The machine's hostname.
    pub hostname: String,
    /// OS name and version, e.g. `Debian GNU/Linux 12 (bookworm)`.
    pub os: String,
    /// CPU architecture, e.g. `x86_64`.
    pub arch: String,
    /// Non-loopback IP addresses.
    pub ips: Vec<String>,
    /// The agent's version.
    pub agent_version: String,
}

/// Longest text member of [`NodeInfo`] (name, hostname, os, arch, agent version), in bytes.
pub const NODE_INFO_TEXT_MAX: usize = 255;
/// Most IP addresses a [`NodeInfo`] lists.
pub const NODE_IPS_MAX: usize = 64;
/// Longest IP address a [`NodeInfo`] lists, in bytes.
pub const NODE_IP_MAX: usize = 64;

/// Checks a text member of [`NodeInfo`] (`what` names it): at most [`NODE_INFO_TEXT_MAX`] bytes
/// and no control characters (a NUL or an escape sequence in a node name would reach every
/// listing and terminal that shows it).
pub fn check_node_text(what: &str, value: &str) -> Result<(), String> {
    if value.len() > NODE_INFO_TEXT_MAX {
        return Err(format!(
            "node {what} is longer than {NODE_INFO_TEXT_MAX} bytes ({} bytes)",
            value.len()
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(format!(
            "node {what} contains the control character U+{:04X}: use printable characters",
            u32::from(c)
        ));
    }
    Ok(())
}

impl NodeInfo {
    /// Checks every member: texts by [`check_node_text`], a non-empty name, at most
    /// [`NODE_IPS_MAX`] addresses of at most [`NODE_IP_MAX`] bytes each.
    pub fn check(&self) -> Result<(), String> {
        let texts = [
            ("name", &self.name),
            ("hostname", &self.hostname),
            ("os", &self.os),
            ("arch", &self.arch),
            ("agent_version", &self.agent_version),
        ];
        for (what, v) in texts {
            check_node_text(what, v)?;
        }
        if self.name.trim().is_empty() {
            return Err("node name is empty".into());
        }
        if self.ips.len() > NODE_IPS_MAX || self.ips.iter().any(|ip| ip.len() > NODE_IP_MAX) {
            return Err(format!(
                "node reports too many or too long IP addresses (at most {NODE_IPS_MAX} of {NODE_IP_MAX} bytes)"
            ));
        }
        for ip in &self.ips {
            check_node_text("IP address", ip)?;
        }
        Ok(())
    }
}

/// Which output pipe of an invocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Pipe {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Pipe {
    /// `stdout` or `stderr`.
    pub fn as_str(self) -> &'static str {
        match self {
            Pipe::Stdout => "stdout",
            Pipe::Stderr => "stderr",
        }
    }
}

/// A flow-controlled stream on the channel.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum StreamId {
    /// One output pipe of the invocation of a command on this node.
    Output {
        /// The command.
        command_id: CommandId,
        /// Which pipe.
        pipe: Pipe,
    },
}

/// What the agent sends. The first frame on a connection is `Hello` or `Register`, after the server's
/// `Challenge`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AgentFrame {
    /// Since version 1 (key and signature since version 2). First frame of an enrolled agent: who it
    /// is, proof that it holds the node's key, and what it still holds.
    Hello {
        /// The agent's protocol version.
        protocol_version: u32,
        /// The node's id, from registration.
        node_id: NodeId,
        /// The node's Ed25519 public key (current, or the previous one during a rotation).
        #[serde(with = "serde_bytes")]
        public_key: Vec<u8>,
        /// Signature over [`crate::auth::hello_message`] of the server's challenge.
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
        /// Facts about the node.
        info: NodeInfo,
        /// Invocations the agent knows of (queued, running, or with a result not yet acknowledged).
        /// An invocation the server thinks is running but is not here was lost by the agent.
        known: Vec<CommandId>,
    },
    /// Since version 1. First frame of a new agent: enrol with an activation code.
    Register {
        /// The agent's protocol version.
        protocol_version: u32,
        /// The activation code (`fleetrun activation create`).
        activation_code: String,
        /// Since version 2. The new node's Ed25519 public key.
        #[serde(with = "serde_bytes")]
        public_key: Vec<u8>,
        /// Since version 2. Signature over [`crate::auth::register_message`] of the challenge.
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
        /// Facts about the node.
        info: NodeInfo,
        /// Tags the node asks for, added to the activation's.
        tags: BTreeMap<String, String>,
    },
    /// Since version 1. The invocation's process has started.
    Started {
        /// The command.
        command_id: CommandId,
        /// Start time, epoch milliseconds on the node.
        started_at_ms: i64,
    },
    /// Since version 1. Bytes of a stream, starting at `offset`.
    Output {
        /// The stream.
        stream: StreamId,
        /// Byte offset of `data[0]` in the stream.
        offset: u64,
        /// The bytes (never more than [`crate::limits::OUTPUT_FRAME_MAX`]).
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Since version 1. The invocation ended. Sent after every byte of its output.
    Finished {
        /// The command.
        command_id: CommandId,
        /// What happened.
        result: ExecResult,
    },
    /// Since version 2. Replace the node's key with a new one (the agent persisted it first). The
    /// server stores it, keeps the key of this session as the previous one, and answers `KeyRotated`;
    /// sending the same key again is harmless.
    RotateKey {
        /// The key this session authenticated with.
        #[serde(with = "serde_bytes")]
        old_public_key: Vec<u8>,
        /// The new Ed25519 public key.
        #[serde(with = "serde_bytes")]
        new_public_key: Vec<u8>,
        /// Signature by the new key over [`crate::auth::rotate_message`].
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    /// Since version 2. The agent now uses `public_key` (after `KeyRotated`): the server stops
    /// accepting the previous key.
    KeyConfirmed {
        /// The node's current key.
        #[serde(with = "serde_bytes")]
        public_key: Vec<u8>,
    },
    /// Since version 3. Output of a session stream (at most the credit the server granted, and
    /// [`crate::stream::STREAM_FRAME_MAX`] bytes).
    StreamData {
        /// The stream.
        stream: StreamNo,
        /// Which output.
        fd: StreamFd,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Since version 3. The server may send `bytes` more input to the stream. The first one, right
    /// after `StreamOpen`, says the stream started and grants its window.
    StreamCredit {
        /// The stream.
        stream: StreamNo,
        /// More credit, in bytes.
        bytes: u64,
    },
    /// Since version 3. The stream's process ended (sent after all its output).
    StreamExit {
        /// The stream.
        stream: StreamNo,
        /// Exit code; for a signal, 128 + the signal number.
        code: i32,
        /// The signal that ended it, if one did.
        signal: Option<i32>,
    },
    /// Since version 3. The agent ended the stream and forgot it: after `StreamExit` (`error`
    /// `None`), or refused or failed (why, in words), including for a stream it does not know.
    StreamClose {
        /// The stream.
        stream: StreamNo,
        /// Why, when it did not end normally.
        error: Option<String>,
    },
    /// Since version 5. A file stream's facts, before its first credit (put) or its bytes
    /// (get): the offset its bytes start at (a put resuming: the temp file's length), the whole
    /// file's size and (a get) its permission bits.
    StreamFileInfo {
        /// The stream.
        stream: StreamNo,
        /// Where the bytes start (at most `size`).
        offset: u64,
        /// The whole file's length.
        size: u64,
        /// Permission bits (a get; 0 for a put).
        mode: u32,
    },
    /// Since version 5. A file stream succeeded (then `StreamClose` without an error): a put's
    /// file is checked, synced and renamed into place; a get's bytes are all sent. `sha256`
    /// (64 lowercase hex digits) is the whole file's.
    StreamFileDone {
        /// The stream.
        stream: StreamNo,
        /// The whole file's SHA-256.
        sha256: String,
    },
    /// Since version 7. First frame of a new agent on an EC2 instance: `Register`, plus the
    /// instance id the node asks to be known by instead of a server-made `mi-` id (as SSM
    /// registers EC2 instances under their own ids). `protocol_version` stays the first field, so
    /// [`handshake_version`] reads it as it reads `Register`'s.
    RegisterInstance {
        /// The agent's protocol version.
        protocol_version: u32,
        /// The activation code.
        activation_code: String,
        /// The new node's Ed25519 public key.
        #[serde(with = "serde_bytes")]
        public_key: Vec<u8>,
        /// Signature over [`crate::auth::register_instance_message`] of the challenge (it binds
        /// the instance id too).
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
        /// Facts about the node.
        info: NodeInfo,
        /// Tags the node asks for, added to the activation's.
        tags: BTreeMap<String, String>,
        /// The EC2 instance id (`i-` + 17 or 8 lowercase hex digits), as text: the server checks
        /// it and answers a malformed one with `BadNodeInfo` naming it, not `BadFrame`.
        instance_id: String,
    },
}

/// The index of [`AgentFrame::RegisterInstance`] in the postcard encoding (appended in version 7).
const REGISTER_INSTANCE_INDEX: u32 = 13;

/// How an invocation ended on the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// How it ended.
    pub outcome: Outcome,
    /// Exit code; for a signal, 128 + the signal number (as a shell reports it); -1 if it never ran.
    pub exit_code: i32,
    /// The signal that ended the process, if one did.
    pub signal: Option<i32>,
    /// Start and end, epoch milliseconds on the node.
    pub started_at_ms: i64,
    /// End time, epoch milliseconds on the node.
    pub finished_at_ms: i64,
    /// User CPU time of the command and its waited-for descendants.
    pub cpu_user_ms: u64,
    /// System CPU time of the command and its waited-for descendants.
    pub cpu_system_ms: u64,
    /// Peak resident set size of the largest process, in KiB.
    pub max_rss_kb: u64,
    /// Total bytes written to stdout.
    pub stdout_bytes: u64,
    /// Total bytes written to stderr.
    pub stderr_bytes: u64,
    /// A human-readable note (why it could not start, which signal ended it, spool throttling).
    pub message: String,
    /// Which mechanism enforced the limits: `cgroup2`, `cgroup1`, `rlimit`, or `none`.
    pub limits_applied: String,
}

/// How an invocation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Ran to the end (success or failure follows from the exit code).
    Exited,
    /// Killed after its execution timeout.
    TimedOut,
    /// Killed by a cancel.
    Cancelled,
    /// Could not be started (bad working directory, unknown run-as user, spawn failure).
    NotStarted,
    /// Killed for using more memory than its limit.
    MemoryLimitExceeded,
    /// It was running when the agent stopped (crash, kill -9, reboot); its exit status is unknown
    /// and the agent killed what was left of its process group when it came back.
    AgentRestarted,
}

/// What the server sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// Since version 1. Answer to `Hello`: the agent is known and connected.
    Welcome {
        /// The server's protocol version.
        protocol_version: u32,
        /// Seconds between pings; the agent pings at the shorter of this and its own setting, and
        /// either side drops a connection silent for 3 intervals.
        heartbeat_secs: u64,
    },
    /// Since version 1 (no secret since version 2). Answer to `Register`: the node's id, to be kept
    /// by the agent with its key.
    Registered {
        /// The new node's id.
        node_id: NodeId,
    },
    /// Since version 1. Run a command.
    Run(RunRequest),
    /// Since version 1. Cancel a queued or running invocation.
    Cancel {
        /// The command.
        command_id: CommandId,
    },
    /// Since version 1. Every byte of the stream before `offset` is durably stored: the agent may
    /// forget them and send up to `offset + window` .
    Ack {
        /// The stream.
        stream: StreamId,
        /// Stored length of the stream.
        offset: u64,
    },
    /// Since version 1. The result is durably stored; the agent may forget the invocation.
    ResultAck {
        /// The command.
        command_id: CommandId,
    },
    /// Since version 1. The connection is refused or a frame was bad; the server closes after this.
    Error {
        /// Machine-readable reason: an [`ErrorCode`] by name (`ErrorCode::parse` reads it).
        code: String,
        /// What is wrong.
        message: String,
    },
    /// Since version 2. The server's first frame on every connection: the challenge the agent's
    /// `Hello` or `Register` signs.
    Challenge {
        /// [`crate::auth::NONCE_LEN`] random bytes, new for each connection.
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
    },
    /// Since version 2. The new key of a `RotateKey` is stored: the agent may make it current.
    KeyRotated {
        /// The new key.
        #[serde(with = "serde_bytes")]
        public_key: Vec<u8>,
    },
    /// Since version 3 (sent only to agents of version 3 or later). Open a session stream; the
    /// agent answers `StreamCredit` (started) or `StreamClose` with an error (refused).
    StreamOpen {
        /// A number this connection has not used before (see [`StreamNo`]).
        stream: StreamNo,
        /// What to run.
        kind: StreamKind,
        /// The credit the agent has for its output (at most [`crate::stream::STREAM_WINDOW_MAX`]).
        window: u64,
    },
    /// Since version 3. Input for the stream (never more than the agent's credit).
    StreamData {
        /// The stream.
        stream: StreamNo,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Since version 3. The agent may send `bytes` more output.
    StreamCredit {
        /// The stream.
        stream: StreamNo,
        /// More credit, in bytes.
        bytes: u64,
    },
    /// Since version 3. The input ends (the process's stdin is closed).
    StreamEof {
        /// The stream.
        stream: StreamNo,
    },
    /// Since version 3. Hang up: the agent stops the stream's process group (SIGTERM, a grace,
    /// SIGKILL) and answers `StreamClose`.
    StreamClose {
        /// The stream.
        stream: StreamNo,
        /// Why (for the agent's log).
        reason: String,
    },
    /// Since version 4. The client's window changed size: the agent resizes the `Shell` stream's
    /// PTY (the shell gets SIGWINCH). Ignored for other kinds.
    StreamResize {
        /// The stream.
        stream: StreamNo,
        /// Rows (1 to [`crate::stream::WINDOW_SIDE_MAX`]).
        rows: u16,
        /// Columns (1 to [`crate::stream::WINDOW_SIDE_MAX`]).
        cols: u16,
    },
}

/// The code of a [`ServerFrame::Error`]: why the server refuses a connection or ends it. On the wire
/// it is the variant's name as a string (`Error.code`), so a code this side does not know still
/// arrives, as [`ErrorCode::Other`]. Both sides use this one list; [`ErrorCode::is_fatal`] says
/// which ones an agent stops on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Since version 1. The agent's protocol version is not the server's (read from the frozen start
    /// of the first frame, see [`handshake_version`]). Fatal.
    ProtocolVersion,
    /// Since version 1. The activation code is unknown, expired or used up. Fatal.
    InvalidActivation,
    /// Since version 1. No such node, deregistered, or registered with protocol 1 and keyless. Fatal.
    UnknownNode,
    /// Since version 2. The key is not the node's, or the signature does not verify over this
    /// connection's challenge. Fatal.
    BadSignature,
    /// Since version 1. The node's facts (`NodeInfo`) fail [`NodeInfo::check`]. Fatal: they come
    /// from the node's settings, which a retry does not change.
    BadNodeInfo,
    /// Since version 1. A tag asked for at registration is not valid. Fatal.
    InvalidTag,
    /// Since version 1. A message did not decode, or the first frame was neither `Hello` nor
    /// `Register`.
    BadFrame,
    /// Since version 2. No `Hello` or `Register` within the server's handshake timeout.
    HandshakeTimeout,
    /// Since version 2. Too many failed identifications as this node (from any address) lately.
    TooManyFailedAuthentications,
    /// Since version 2. A frame that decoded but is not valid where it came (e.g. a bad `RotateKey`).
    ProtocolError,
    /// Since version 1. The server could not do its part (e.g. write its database).
    InternalError,
    /// Since version 7. The instance id a `RegisterInstance` asks for is already another node's
    /// (held by another key, deregistered nodes included: their history keeps the id). Fatal.
    NodeIdTaken,
    /// A code this side does not know (a newer peer's): not fatal.
    Other(String),
}

impl ErrorCode {
    /// Every known code, for tests and documentation.
    pub const KNOWN: [ErrorCode; 12] = [
        ErrorCode::ProtocolVersion,
        ErrorCode::InvalidActivation,
        ErrorCode::UnknownNode,
        ErrorCode::BadSignature,
        ErrorCode::BadNodeInfo,
        ErrorCode::InvalidTag,
        ErrorCode::BadFrame,
        ErrorCode::HandshakeTimeout,
        ErrorCode::TooManyFailedAuthentications,
        ErrorCode::ProtocolError,
        ErrorCode::InternalError,
        ErrorCode::NodeIdTaken,
    ];

    /// The code as it travels in `Error.code`.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::ProtocolVersion => "ProtocolVersion",
            ErrorCode::InvalidActivation => "InvalidActivation",
            ErrorCode::UnknownNode => "UnknownNode",
            ErrorCode::BadSignature => "BadSignature",
            ErrorCode::BadNodeInfo => "BadNodeInfo",
            ErrorCode::InvalidTag => "InvalidTag",
            ErrorCode::BadFrame => "BadFrame",
            ErrorCode::HandshakeTimeout => "HandshakeTimeout",
            ErrorCode::TooManyFailedAuthentications => "TooManyFailedAuthentications",
            ErrorCode::ProtocolError => "ProtocolError",
            ErrorCode::InternalError => "InternalError",
            ErrorCode::NodeIdTaken => "NodeIdTaken",
            ErrorCode::Other(code) => code,
        }
    }

    /// The code of `Error.code`; an unknown one is [`ErrorCode::Other`].
    pub fn parse(code: &str) -> Self {
        Self::KNOWN
            .into_iter()
            .find(|known| known.as_str() == code)
            .unwrap_or_else(|| ErrorCode::Other(code.to_owned()))
    }

    /// Whether no retry can help: the agent stops with an error instead of re-dialling. These
    /// refuse the node itself (its version, activation, identity, settings); every other code, and
    /// any code this side does not know, is retried with backoff.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ErrorCode::ProtocolVersion
                | ErrorCode::InvalidActivation
                | ErrorCode::UnknownNode
                | ErrorCode::BadSignature
                | ErrorCode::BadNodeInfo
                | ErrorCode::InvalidTag
                | ErrorCode::NodeIdTaken
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ServerFrame {
    /// An `Error` frame with a typed code.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame::Error {
            code: code.as_str().to_owned(),
            message: message.into(),
        }
    }
}

/// The protocol version at the frozen start of the agent's first frame, read without decoding the
/// rest (whose layout may be another version's). Every version's `Hello` and `Register` begin with
/// the variant's index (postcard varint: 0 for `Hello`, 1 for `Register`, 13 for
/// `RegisterInstance` since version 7) followed by `protocol_version` (postcard varint `u32`):
/// these indices and that first field never move, so a server reads any agent's version and can
/// refuse it with [`ErrorCode::ProtocolVersion`]. `None` when the message is not one of those, or
/// ends before the version.
pub fn handshake_version(first_frame: &[u8]) -> Option<u32> {
    let (variant, rest) = postcard::take_from_bytes::<u32>(first_frame).ok()?;
    if variant > 1 && variant != REGISTER_INSTANCE_INDEX {
        return None;
    }
    postcard::take_from_bytes::<u32>(rest).ok().map(|(v, _)| v)
}

/// A command to run on the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRequest {
    /// The command.
    pub command_id: CommandId,
    /// The script: the document's `commands` joined with newlines.
    pub script: String,
    /// Working directory; empty for the agent's per-command directory.
    pub working_dir: String,
    /// Seconds after which the process group is terminated.
    pub execution_timeout_secs: u64,
    /// Since version 1. Run as this user (name or uid) instead of the agent's; the agent must be root.
    pub run_as: Option<String>,
    /// Since version 1. Most memory the command's processes together may use, in bytes.
    pub memory_limit_bytes: Option<u64>,
    /// Since version 1. Most CPU the command may use, in percent of one core (150 = 1.5 cores).
    pub cpu_limit_percent: Option<u32>,
}

/// A frame that did not decode: which kind of frame, which variant and field (as far as decoding
/// got), and what was wrong there.
#[derive(Debug, thiserror::Error)]
#[error("malformed {kind} ({len} bytes): {detail}")]
pub struct FrameError {
    kind: &'static str,
    len: usize,
    detail: String,
    #[source]
    cause: postcard::Error,
}

/// Variants of [`AgentFrame`] in declaration (wire) order, with their fields.
const AGENT_VARIANTS: &[(&str, &[&str])] = &[
    (
        "Hello",
        &[
            "protocol_version",
            "node_id",
            "public_key",
            "signature",
            "info",
            "known",
        ],
    ),
    (
        "Register",
        &[
            "protocol_version",
            "activation_code",
            "public_key",
            "signature",
            "info",
            "tags",
        ],
    ),
    ("Started", &["command_id", "started_at_ms"]),
    ("Output", &["stream", "offset", "data"]),
    ("Finished", &["command_id", "result"]),
    (
        "RotateKey",
        &["old_public_key", "new_public_key", "signature"],
    ),
    ("KeyConfirmed", &["public_key"]),
    ("StreamData", &["stream", "fd", "bytes"]),
    ("StreamCredit", &["stream", "bytes"]),
    ("StreamExit", &["stream", "code", "signal"]),
    ("StreamClose", &["stream", "error"]),
    ("StreamFileInfo", &["stream", "offset", "size", "mode"]),
    ("StreamFileDone", &["stream", "sha256"]),
];

/// Variants of [`ServerFrame`] in declaration (wire) order, with their fields.
const SERVER_VARIANTS: &[(&str, &[&str])] = &[
    ("Welcome", &["protocol_version", "heartbeat_secs"]),
    ("Registered", &["node_id"]),
    ("Run", &["0"]),
    ("Cancel", &["command_id"]),
    ("Ack", &["stream", "offset"]),
    ("ResultAck", &["command_id"]),
    ("Error", &["code", "message"]),
    ("Challenge", &["nonce"]),
    ("KeyRotated", &["public_key"]),
    ("StreamOpen", &["stream", "kind", "window"]),
    ("StreamData", &["stream", "bytes"]),
    ("StreamCredit", &["stream", "bytes"]),
    ("StreamEof", &["stream"]),
    ("StreamClose", &["stream", "reason"]),
    ("StreamResize", &["stream", "rows", "cols"]),
];

/// Decodes a postcard frame; on failure, says where and what.
fn decode_frame<T: serde::de::DeserializeOwned>(
    kind: &'static str,
    variants: &[(&str, &[&str])],
    bytes: &[u8],
) -> Result<T, FrameError> {
    let mut de = postcard::Deserializer::from_bytes(bytes);
    let err = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    use serde_path_to_error::Segment;
    // The path: the variant (its index), the field's index in it, then whatever lies inside.
    let mut segs = err.path().iter().skip(1);
    let field = match segs.next() {
        Some(Segment::Seq { index }) => Some(*index),
        _ => None,
    };
    let inner: String = segs
        .map(|s| match s {
            Segment::Seq { index } => format!("[{index}]"),
            Segment::Map { key } => format!(".{key}"),
            Segment::Enum { variant } => format!(".{variant}"),
            Segment::Unknown => ".?".to_owned(),
        })
        .collect();
    let cause = err.into_inner();
    // The variant, from its discriminant (a varint at the start).
    let variant = postcard::take_from_bytes::<u32>(bytes)
        .ok()
        .map(|(i, _)| i)
        .map(|i| match variants.get(i as usize) {
            Some((name, fields)) => Ok((*name, *fields)),
            None => Err(i),
        });
    let mut detail = match variant {
        None => "no frame type (the message is empty or its first varint is cut)".to_owned(),
        Some(Err(i)) => format!(
            "unknown frame type {i} (this side knows {} types; is the peer newer?)",
            variants.len()
        ),
        Some(Ok((name, fields))) => match field.and_then(|i| fields.get(i).copied()) {
            Some(f) if inner.is_empty() => format!("{name} frame, field {f}"),
            Some(f) => format!("{name} frame, field {f} (at {inner})"),
            None => format!("{name} frame"),
        },
    };
    detail.push_str(": ");
    let id_field = match (variant, field) {
        (Some(Ok((_, fields))), Some(i)) => fields.get(i).is_some_and(|f| f.ends_with("_id")),
        _ => false,
    };
    if id_field && inner.is_empty() && matches!(cause, postcard::Error::SerdeDeCustom) {
        detail.push_str("not a valid id");
    } else {
        detail.push_str(&describe(&cause));
    }
    Err(FrameError {
        kind,
        len: bytes.len(),
        detail,
        cause,
    })
}

/// What a postcard error means, in words (its own text for a rejected value is only "Serde
/// Deserialization Error").
fn describe(e: &postcard::Error) -> String {
    use postcard::Error as E;
    match e {
        E::DeserializeUnexpectedEnd => "the message ends in the middle of it".into(),
        E::DeserializeBadVarint => "a number is not a valid varint".into(),
        E::DeserializeBadBool => "a bool is neither 0 nor 1".into(),
        E::DeserializeBadChar => "a char is not a valid Unicode scalar".into(),
        E::DeserializeBadUtf8 => "a string is not valid UTF-8".into(),
        E::DeserializeBadOption => "an option tag is neither 0 nor 1".into(),
        E::DeserializeBadEnum => "an enum tag is out of range".into(),
        E::DeserializeBadEncoding => "bad encoding (e.g. a length that does not fit)".into(),
        E::SerdeDeCustom => {
            "a value is out of range or malformed (e.g. an unknown enum tag or an id that does not parse)"
                .into()
        }
        other => other.to_string(),
    }
}

impl AgentFrame {
    /// Encodes the frame for a binary WebSocket message.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("postcard encodes every AgentFrame")
    }
    /// Decodes a binary WebSocket message.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        decode_frame("AgentFrame", AGENT_VARIANTS, bytes)
    }
}

impl ServerFrame {
    /// Encodes the frame for a binary WebSocket message.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("postcard encodes every ServerFrame")
    }
    /// Decodes a binary WebSocket message.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        decode_frame("ServerFrame", SERVER_VARIANTS, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(protocol_version: u32) -> AgentFrame {
        AgentFrame::Hello {
            protocol_version,
            node_id: NodeId::from_random(1),
            public_key: vec![1; 32],
            signature: vec![2; 64],
            info: NodeInfo::default(),
            known: vec![],
        }
    }

    #[test]
    fn the_handshake_version_is_frozen_at_the_start_of_the_first_frame() {
        // The frozen bytes: variant index, then the version, both postcard varints.
        let h = hello(2).encode();
        assert_eq!(h[..2], [0x00, 0x02]);
        let register = AgentFrame::Register {
            protocol_version: 2,
            activation_code: "code".into(),
            public_key: vec![],
            signature: vec![],
            info: NodeInfo::default(),
            tags: BTreeMap::new(),
        };
        assert_eq!(register.encode()[..2], [0x01, 0x02]);
        assert_eq!(handshake_version(&h), Some(2));
        assert_eq!(handshake_version(&register.encode()), Some(2));
        // Another version's Hello is read although the rest is not this version's layout.
        assert_eq!(handshake_version(&[0x00, 0x01, 0xff, 0xff]), Some(1));
        assert!(AgentFrame::decode(&[0x00, 0x01, 0xff, 0xff]).is_err());
        // Multi-byte varints: version 300.
        assert_eq!(handshake_version(&hello(300).encode()), Some(300));
        assert_eq!(handshake_version(&[0x00, 0xac, 0x02]), Some(300));
        // Not a handshake frame, or cut before the version.
        let started = AgentFrame::Started {
            command_id: CommandId::from_random(1),
            started_at_ms: 2,
        };
        assert_eq!(handshake_version(&started.encode()), None);
        assert_eq!(handshake_version(&[]), None);
        assert_eq!(handshake_version(&[0x00]), None);
        assert_eq!(handshake_version(&[0x01, 0x80]), None);
        // Version 7's RegisterInstance: appended, and its version read like Register's.
        let instance = AgentFrame::RegisterInstance {
            protocol_version: 7,
            activation_code: "code".into(),
            public_key: vec![],
            signature: vec![],
            info: NodeInfo::default(),
            tags: BTreeMap::new(),
            instance_id: "i-0123456789abcdef0".into(),
        };
        assert_eq!(
            instance.encode()[..2],
            [REGISTER_INSTANCE_INDEX as u8, 0x07]
        );
        assert_eq!(handshake_version(&instance.encode()), Some(7));
        assert_eq!(AgentFrame::decode(&instance.encode()).unwrap(), instance);
        // Earlier versions' frames keep their bytes: StreamFileDone is still variant 12.
        let done = AgentFrame::StreamFileDone {
            stream: 1,
            sha256: String::new(),
        };
        assert_eq!(done.encode()[0], 12);
    }

    #[test]
    fn error_codes_round_trip_and_only_refusals_of_the_node_are_fatal() {
        for code in ErrorCode::KNOWN {
            assert_eq!(ErrorCode::parse(code.as_str()), code);
        }
        let fatal: Vec<&str> = ErrorCode::KNOWN
            .iter()
            .filter(|c| c.is_fatal())
            .map(ErrorCode::as_str)
            .collect();
        assert_eq!(
            fatal,
            [
                "ProtocolVersion",
                "InvalidActivation",
                "UnknownNode",
                "BadSignature",
                "BadNodeInfo",
                "InvalidTag",
                "NodeIdTaken"
            ]
        );
        // A newer peer's code arrives intact and is retried.
        let newer = ErrorCode::parse("SomethingNew");
        assert_eq!(newer, ErrorCode::Other("SomethingNew".into()));
        assert!(!newer.is_fatal());
        // The Error frame's own layout is frozen too: any version's agent can read a refusal.
        let e = ServerFrame::error(ErrorCode::ProtocolVersion, "v");
        assert_eq!(e.encode()[..2], [0x06, 15]);
        assert_eq!(
            ServerFrame::decode(&e.encode()).unwrap(),
            ServerFrame::Error {
                code: "ProtocolVersion".into(),
                message: "v".into()
            }
        );
    }

    #[test]
    fn node_info_refuses_control_characters_and_long_texts() {
        let ok = NodeInfo {
            name: "web-1".into(),
            hostname: "web-1.example".into(),
            ips: vec!["10.0.0.1".into()],
            ..NodeInfo::default()
        };
        assert_eq!(ok.check(), Ok(()));
        for bad in ["web\u{0}1", "web\x1b[31m", "a\nb", "\u{85}"] {
            let info = NodeInfo {
                name: bad.into(),
                ..ok.clone()
            };
            let e = info.check().unwrap_err();
            assert!(
                e.contains("node name contains the control character"),
                "{e}"
            );
        }
        let long = NodeInfo {
            hostname: "h".repeat(NODE_INFO_TEXT_MAX + 1),
            ..ok.clone()
        };
        assert!(long.check().unwrap_err().contains("longer than 255 bytes"));
        let empty = NodeInfo {
            name: " ".into(),
            ..ok
        };
        assert_eq!(empty.check().unwrap_err(), "node name is empty");
    }

    #[test]
    fn frames_round_trip_with_raw_bytes() {
        let f = AgentFrame::Output {
            stream: StreamId::Output {
                command_id: CommandId::from_random(7),
                pipe: Pipe::Stderr,
            },
            offset: 42,
            data: vec![0xff, 0x00, 0xfe],
        };
        assert_eq!(AgentFrame::decode(&f.encode()).unwrap(), f);
        assert!(AgentFrame::decode(&[0xff, 0xff]).is_err());
        let s = ServerFrame::Welcome {
            protocol_version: 2,
            heartbeat_secs: 15,
        };
        assert_eq!(ServerFrame::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn stream_frames_are_appended_and_round_trip() {
        use crate::stream::{StreamFd, StreamKind};
        // Appended variants: every older frame keeps its tag, so version 2 peers decode them.
        assert_eq!(
            AgentFrame::KeyConfirmed { public_key: vec![] }.encode()[0],
            6
        );
        assert_eq!(
            ServerFrame::KeyRotated { public_key: vec![] }.encode()[0],
            8
        );
        let agent = [
            AgentFrame::StreamData {
                stream: 7,
                fd: StreamFd::Stderr,
                bytes: vec![0, 255],
            },
            AgentFrame::StreamCredit {
                stream: 7,
                bytes: 1 << 20,
            },
            AgentFrame::StreamExit {
                stream: 7,
                code: 143,
                signal: Some(15),
            },
            AgentFrame::StreamClose {
                stream: u32::MAX,
                error: Some("unknown stream".into()),
            },
            AgentFrame::StreamFileInfo {
                stream: 7,
                offset: 5,
                size: 1 << 40,
                mode: 0o755,
            },
            AgentFrame::StreamFileDone {
                stream: 7,
                sha256: "0".repeat(64),
            },
        ];
        for (tag, f) in (7..).zip(agent) {
            let bytes = f.encode();
            assert_eq!(bytes[0], tag, "{f:?}");
            assert!(format!("{f:?}").starts_with(AGENT_VARIANTS[usize::from(tag)].0));
            assert_eq!(AgentFrame::decode(&bytes).unwrap(), f);
        }
        let server = [
            ServerFrame::StreamOpen {
                stream: 1,
                kind: StreamKind::Exec {
                    command: "cat".into(),
                    run_as: Some("nobody".into()),
                    env: vec![("TERM".into(), "xterm".into())],
                    working_dir: "/tmp".into(),
                    pty: false,
                },
                window: 65_536,
            },
            ServerFrame::StreamData {
                stream: 1,
                bytes: vec![1, 2, 3],
            },
            ServerFrame::StreamCredit {
                stream: 1,
                bytes: 9,
            },
            ServerFrame::StreamEof { stream: 1 },
            ServerFrame::StreamClose {
                stream: 1,
                reason: "client gone".into(),
            },
            ServerFrame::StreamResize {
                stream: 1,
                rows: 50,
                cols: 132,
            },
        ];
        for (tag, f) in (9..).zip(server) {
            let bytes = f.encode();
            assert_eq!(bytes[0], tag, "{f:?}");
            assert!(format!("{f:?}").starts_with(SERVER_VARIANTS[usize::from(tag)].0));
            assert_eq!(ServerFrame::decode(&bytes).unwrap(), f);
        }
        // Version 4's kinds come after Exec, which keeps its index (0) for version 3 agents.
        for (index, kind) in [
            StreamKind::Shell {
                command: Some("top".into()),
                run_as: None,
                term: "xterm".into(),
                rows: 24,
                cols: 80,
                env: vec![],
            },
            StreamKind::Tcp {
                host: "localhost".into(),
                port: 5432,
            },
            // Version 5's, after those.
            StreamKind::FilePut {
                path: "/opt/f".into(),
                mode: Some(0o755),
                owner: Some("root".into()),
                group: None,
                size: 3,
                sha256: "a".repeat(64),
                resume: true,
                parents: false,
            },
            StreamKind::FileGet {
                path: "/opt/f".into(),
                offset: 0,
            },
            // Version 7's, after those.
            StreamKind::FileList {
                path: "/opt".into(),
            },
        ]
        .into_iter()
        .enumerate()
        {
            let f = ServerFrame::StreamOpen {
                stream: 2,
                kind,
                window: 1,
            };
            let bytes = f.encode();
            // Tag, stream number (one varint byte), then the kind's index.
            assert_eq!(usize::from(bytes[2]), index + 1, "{f:?}");
            assert_eq!(ServerFrame::decode(&bytes).unwrap(), f);
        }
        // A cut stream frame names its field.
        let data = ServerFrame::StreamData {
            stream: 1,
            bytes: vec![1, 2, 3],
        }
        .encode();
        let e = ServerFrame::decode(&data[..data.len() - 1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("StreamData frame, field bytes"), "{e}");
    }

    #[test]
    fn decode_errors_name_the_frame_the_field_and_the_fault() {
        let started = AgentFrame::Started {
            command_id: CommandId::from_random(7),
            started_at_ms: 1,
        };
        let good = started.encode();
        let cut = AgentFrame::decode(&good[..5]).unwrap_err().to_string();
        assert!(cut.contains("AgentFrame (5 bytes)"), "{cut}");
        assert!(cut.contains("Started frame, field command_id"), "{cut}");
        assert!(cut.contains("ends in the middle"), "{cut}");
        let unknown = AgentFrame::decode(&[42]).unwrap_err().to_string();
        assert!(unknown.contains("unknown frame type 42"), "{unknown}");
        let empty = ServerFrame::decode(&[]).unwrap_err().to_string();
        assert!(empty.contains("no frame type"), "{empty}");
        // A command id that is not one: its string is replaced by junk of the same length.
        let mut bad = good.clone();
        for b in bad.iter_mut().skip(2).take(8) {
            *b = b'z';
        }
        let e = AgentFrame::decode(&bad).unwrap_err().to_string();
        assert!(
            e.contains("Started frame, field command_id: not a valid id"),
            "{e}"
        );
        // A nested field.
        let out = AgentFrame::Output {
            stream: StreamId::Output {
                command_id: CommandId::from_random(1),
                pipe: Pipe::Stdout,
            },
            offset: 0,
            data: vec![1],
        }
        .encode();
        let e = AgentFrame::decode(&out[..out.len() - 1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("Output frame, field data"), "{e}");
        // Every variant's tag is its index in the tables the messages use.
        let frames = [
            AgentFrame::KeyConfirmed { public_key: vec![] },
            AgentFrame::RotateKey {
                old_public_key: vec![],
                new_public_key: vec![],
                signature: vec![],
            },
        ];
        for f in frames {
            let name = format!("{f:?}");
            let tag = f.encode()[0] as usize;
            assert!(
                name.starts_with(AGENT_VARIANTS[tag].0),
                "{name} has tag {tag}"
            );
        }
        let s = ServerFrame::KeyRotated { public_key: vec![] };
        assert!(format!("{s:?}").starts_with(SERVER_VARIANTS[s.encode()[0] as usize].0));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn command_id() -> impl Strategy<Value = CommandId> {
            any::<u128>().prop_map(CommandId::from_random)
        }

        fn pipe() -> impl Strategy<Value = Pipe> {
            prop_oneof![Just(Pipe::Stdout), Just(Pipe::Stderr)]
        }

        fn agent_frame() -> impl Strategy<Value = AgentFrame> {
            prop_oneof![
                (command_id(), any::<i64>()).prop_map(|(command_id, started_at_ms)| {
                    AgentFrame::Started {
                        command_id,
                        started_at_ms,
                    }
                }),
                (
                    command_id(),
                    pipe(),
                    any::<u64>(),
                    proptest::collection::vec(any::<u8>(), 0..512)
                )
                    .prop_map(|(command_id, pipe, offset, data)| {
                        AgentFrame::Output {
                            stream: StreamId::Output { command_id, pipe },
                            offset,
                            data,
                        }
                    }),
                (
                    any::<u32>(),
                    any::<u128>(),
                    proptest::collection::vec(any::<u8>(), 0..64),
                    ".{0,40}",
                    proptest::collection::vec(command_id(), 0..8)
                )
                    .prop_map(|(v, node, key, name, known)| AgentFrame::Hello {
                        protocol_version: v,
                        node_id: NodeId::from_random(node),
                        public_key: key.clone(),
                        signature: key,
                        info: NodeInfo {
                            name,
                            ..NodeInfo::default()
                        },
                        known,
                    }),
                (
                    ".{0,40}",
                    proptest::collection::btree_map(".{0,8}", ".{0,8}", 0..4)
                )
                    .prop_map(|(code, tags)| AgentFrame::Register {
                        protocol_version: 2,
                        activation_code: code,
                        public_key: vec![1; 32],
                        signature: vec![2; 64],
                        info: NodeInfo::default(),
                        tags,
                    }),
                proptest::collection::vec(any::<u8>(), 0..64)
                    .prop_map(|public_key| AgentFrame::KeyConfirmed { public_key }),
                (
                    any::<u32>(),
                    any::<bool>(),
                    proptest::collection::vec(any::<u8>(), 0..512)
                )
                    .prop_map(|(stream, err, bytes)| AgentFrame::StreamData {
                        stream,
                        fd: if err {
                            crate::stream::StreamFd::Stderr
                        } else {
                            crate::stream::StreamFd::Stdout
                        },
                        bytes,
                    }),
                (
                    any::<u32>(),
                    any::<i32>(),
                    proptest::option::of(any::<i32>())
                )
                    .prop_map(|(stream, code, signal)| AgentFrame::StreamExit {
                        stream,
                        code,
                        signal,
                    }),
            ]
        }

        fn server_frame() -> impl Strategy<Value = ServerFrame> {
            prop_oneof![
                (any::<u32>(), any::<u64>()).prop_map(|(protocol_version, heartbeat_secs)| {
                    ServerFrame::Welcome {
                        protocol_version,
                        heartbeat_secs,
                    }
                }),
                (command_id(), pipe(), any::<u64>()).prop_map(|(command_id, pipe, offset)| {
                    ServerFrame::Ack {
                        stream: StreamId::Output { command_id, pipe },
                        offset,
                    }
                }),
                (".{0,40}", ".{0,200}")
                    .prop_map(|(code, message)| ServerFrame::Error { code, message }),
                (any::<u32>(), ".{0,80}", any::<u64>()).prop_map(|(stream, command, window)| {
                    ServerFrame::StreamOpen {
                        stream,
                        kind: crate::stream::StreamKind::Exec {
                            command,
                            run_as: None,
                            env: vec![],
                            working_dir: String::new(),
                            pty: false,
                        },
                        window,
                    }
                }),
                (any::<u32>(), any::<u64>())
                    .prop_map(|(stream, bytes)| ServerFrame::StreamCredit { stream, bytes }),
                (
                    command_id(),
                    ".{0,200}",
                    any::<u64>(),
                    proptest::option::of(any::<u64>())
                )
                    .prop_map(|(command_id, script, t, mem)| ServerFrame::Run(
                        RunRequest {
                            command_id,
                            script,
                            working_dir: String::new(),
                            execution_timeout_secs: t,
                            run_as: None,
                            memory_limit_bytes: mem,
                            cpu_limit_percent: None,
                        }
                    )),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                if let Err(e) = AgentFrame::decode(&bytes) {
                    prop_assert!(e.to_string().starts_with("malformed AgentFrame"));
                }
                if let Err(e) = ServerFrame::decode(&bytes) {
                    prop_assert!(e.to_string().starts_with("malformed ServerFrame"));
                }
            }

            #[test]
            fn agent_frames_round_trip(f in agent_frame()) {
                prop_assert_eq!(AgentFrame::decode(&f.encode()).unwrap(), f);
            }

            #[test]
            fn server_frames_round_trip(f in server_frame()) {
                prop_assert_eq!(ServerFrame::decode(&f.encode()).unwrap(), f);
            }

            #[test]
            fn cut_or_flipped_frames_fail_cleanly(f in agent_frame(), cut in any::<proptest::sample::Index>(), flip in any::<(proptest::sample::Index, u8)>()) {
                let bytes = f.encode();
                let n = cut.index(bytes.len());
                // Cut anywhere: an error (a prefix of a valid frame may itself decode; then fine).
                let _ = AgentFrame::decode(&bytes[..n]);
                let mut flipped = bytes.clone();
                let i = flip.0.index(flipped.len());
                flipped[i] ^= flip.1;
                let _ = AgentFrame::decode(&flipped);
            }
        }
    }
}
