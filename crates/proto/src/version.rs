//! Protocol and product versions.

/// Version of the agent channel protocol (docs/protocol.md). Bumped on any incompatible frame change.
///
/// Since version 1: `Hello`, `Register`, `Welcome`, `Registered`, `Run`, `Cancel`, `Started`, `Output`,
/// `Ack`, `Finished`, `ResultAck`, `Error`.
/// Since version 2: nodes authenticate with an Ed25519 key over the server's `Challenge`
/// (`Hello`/`Register` carry a public key and signature, `Registered` no secret), and rotate it with
/// `RotateKey`, `KeyRotated`, `KeyConfirmed`.
/// Since version 3: session streams (`StreamOpen`, `StreamData`, `StreamCredit`, `StreamEof`,
/// `StreamClose` from the server; `StreamData`, `StreamCredit`, `StreamExit`, `StreamClose` from
/// the agent), appended to both frame enums so version 2's frames keep their encoding.
/// Since version 4: the stream kinds `Shell` (a PTY) and `Tcp` (a connection the agent makes), and
/// `StreamResize` from the server; appended again, so version 3's frames keep their encoding.
/// Since version 5: file transfers, the stream kinds `FilePut` and `FileGet` and the agent's
/// `StreamFileInfo` and `StreamFileDone`; appended again.
/// Since version 6: a `FilePut` may name a resume key instead of the hash, which then follows the
/// file's bytes as a trailer (`stream::PutHash`); no frame's layout changed.
/// Since version 7: EC2 instance ids, the agent's `RegisterInstance` (appended) and the error code
/// `NodeIdTaken`; and the stream kind `FileList` (a directory's tree, for `cp -r` down), appended
/// after `FileGet` (an agent of version 6 cannot decode it, so it is opened only to 7).
///
/// Versioned in the handshake: every version's first agent frame begins with the same bytes, the
/// frame's variant and then this number ([`crate::channel::handshake_version`] reads them without
/// decoding the rest), so a server refuses an agent of another version with `ProtocolVersion`
/// whatever the rest of its layout; and the server names its own version in the upgrade response's
/// [`PROTOCOL_VERSION_HEADER`], so an agent refused can say which versions disagree.
pub const PROTOCOL_VERSION: u32 = 7;

/// The oldest agent protocol version a server accepts. Versions 3 to 7 only appended frames
/// (session streams, [`crate::stream`]) to version 2, so a server speaks to all of them and opens
/// streams only on connections whose agent said version [`STREAMS_SINCE`] or later, and only of
/// kinds the agent's version has ([`crate::stream::StreamKind::since`]).
pub const PROTOCOL_VERSION_MIN: u32 = 2;

/// The first protocol version with session streams (`StreamOpen` and the frames after it).
pub const STREAMS_SINCE: u32 = 3;

/// The first protocol version with PTY shells and TCP connections on streams
/// (`StreamKind::Shell`, `StreamKind::Tcp`, `ServerFrame::StreamResize`).
pub const SHELLS_AND_TCP_SINCE: u32 = 4;

/// The first protocol version with file transfers (`StreamKind::FilePut`, `StreamKind::FileGet`,
/// `AgentFrame::StreamFileInfo`, `AgentFrame::StreamFileDone`).
pub const FILES_SINCE: u32 = 5;

/// The first protocol version whose `FilePut` takes its SHA-256 after the bytes
/// (`stream::PutHash::Trailer`).
pub const FILE_TRAILER_SINCE: u32 = 6;

/// The first protocol version with EC2 instance ids (`AgentFrame::RegisterInstance`).
pub const INSTANCE_IDS_SINCE: u32 = 7;

/// The first protocol version with directory listings on streams (`StreamKind::FileList`).
pub const FILE_LIST_SINCE: u32 = 7;

/// HTTP header of the server's WebSocket upgrade response (`101`) that carries its
/// [`PROTOCOL_VERSION`] (since version 2; absent from older servers).
pub const PROTOCOL_VERSION_HEADER: &str = "fleetrun-protocol-version";

/// Version of the fleetrun packages, reported by agents and servers.
pub const FLEETRUN_VERSION: &str = env!("CARGO_PKG_VERSION");
