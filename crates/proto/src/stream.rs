//! Session streams over the agent channel (since protocol version 3): what a stream runs, and
//! the credit windows that bound every stream's bytes in flight. See docs/protocol.md, "Session
//! streams".
//!
//! A session stream is named by a `u32` the server picks ([`StreamNo`]); it is opened by the
//! server (`ServerFrame::StreamOpen`), carries bytes both ways (`StreamData`) and is
//! flow-controlled per direction: a sender never has more bytes in flight than the credit the
//! receiver granted ([`SendWindow`]), and the receiver grants more as it consumes
//! ([`RecvWindow`]). One stream waiting for credit never holds up another, nor heartbeats or
//! command output.

use serde::{Deserialize, Serialize};

/// The number of a session stream on one connection, chosen by the server and never reused on
/// that connection (a counter), so a late answer about an ended stream is never read as about a
/// newer one.
pub type StreamNo = u32;

pub use crate::limits::{
    STREAM_FRAME_MAX, STREAM_WINDOW_BULK, STREAM_WINDOW_DEFAULT, STREAM_WINDOW_MAX,
    STREAMS_PER_CONNECTION_MAX,
};
/// Longest command of an `Exec` stream, in bytes (as a script of `Run`).
pub const STREAM_COMMAND_MAX: usize = crate::limits::SCRIPT_MAX;
/// Most environment variables an `Exec` stream sets.
pub const STREAM_ENV_MAX: usize = 256;
const _: () = assert!(
    crate::limits::CHANNEL_MESSAGE_MAX >= STREAM_FRAME_MAX + 1024
        && crate::limits::CHANNEL_MESSAGE_MAX >= STREAM_COMMAND_MAX + 64 * 1024
);

/// What a stream runs on the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamKind {
    /// A one-shot command (`sh -c COMMAND`): the stream's input is its stdin, its output its
    /// stdout and stderr; it ends with the exit status.
    Exec {
        /// The command line, run by `sh -c`.
        command: String,
        /// Run as this user (name or uid); the agent must be root.
        run_as: Option<String>,
        /// Extra environment variables (name, value).
        env: Vec<(String, String)>,
        /// Working directory; empty for the user's home (`/` when it has none).
        working_dir: String,
        /// Always false: agents refuse `true` (a command on a PTY is a [`StreamKind::Shell`]).
        pty: bool,
    },
    /// Since version 4. A PTY on the node running the login shell of `run_as` (or of the agent's
    /// user), or `command` by that shell's `-c`: the stream's input is what the terminal is typed,
    /// its output what the terminal shows (all as [`StreamFd::Stdout`]); it ends with the exit
    /// status. The server sends the window size at the start and in `StreamResize`.
    Shell {
        /// A command instead of an interactive login shell.
        command: Option<String>,
        /// Run as this user (name or uid); the agent must be root.
        run_as: Option<String>,
        /// `TERM` for the PTY (the client's).
        term: String,
        /// Rows of the window.
        rows: u16,
        /// Columns of the window.
        cols: u16,
        /// Extra environment variables (name, value).
        env: Vec<(String, String)>,
    },
    /// Since version 4. A TCP connection the agent makes from the node to `host:port` (a port
    /// forward): the stream's input is written to it, its output is what it reads
    /// ([`StreamFd::Stdout`]); the stream ends when either side closes (no exit status).
    Tcp {
        /// A host name or IP address, as the node resolves it (`localhost` for the node itself).
        host: String,
        /// The port, 1 to 65535.
        port: u16,
    },
    /// Since version 5. Write a file on the node: the stream's input is its bytes (from the
    /// offset the agent reports in `StreamFileInfo`), written to a temp file beside `path`
    /// (`.NAME.fleetrun-<first 16 hex of sha256>.part`), checked (size and SHA-256 of the whole
    /// file), synced and renamed over `path` at `StreamEof`; the agent then sends
    /// `StreamFileDone` and closes. A hang-up keeps the temp file for a resume; a mismatch
    /// deletes it. `path` itself never holds a partial file.
    ///
    /// Since version 6 `sha256` may instead be a resume key ([`PutHash::Trailer`]): the hash
    /// then comes after the bytes, as [`FILE_TRAILER_LEN`] more bytes of input, so a sender
    /// starts at once and hashes as it sends.
    FilePut {
        /// Absolute path of the target on the node.
        path: String,
        /// Permission bits (at most 0o7777); `None`: the existing target's, else 0o644.
        mode: Option<u32>,
        /// Owner (user name or uid); needs a root agent.
        owner: Option<String>,
        /// Group (name or gid); needs a root agent.
        group: Option<String>,
        /// The whole file's length in bytes.
        size: u64,
        /// The whole file's SHA-256, 64 lowercase hex digits; or (since version 6) a resume key
        /// of 16 (see [`PutHash::parse`]).
        sha256: String,
        /// Continue a temp file an earlier put of the same target and hash (or key) left.
        resume: bool,
        /// Create the target's missing parent directories (mode 0755; `cp -r`).
        parents: bool,
    },
    /// Since version 5. Read a file on the node: the agent sends `StreamFileInfo` (size, mode),
    /// then the bytes from `offset` as `StreamData` within the credit, then `StreamFileDone`
    /// with the SHA-256 of the whole file, and closes. The stream takes no input.
    FileGet {
        /// Absolute path of the file on the node.
        path: String,
        /// Where to start (a resumed download), at most the file's size.
        offset: u64,
    },
    /// Since version 7. List the tree under a directory on the node (`cp -r` down): the agent
    /// sends a `StreamCredit` (started), then records of a type byte and a path relative to
    /// `path`, each ending in NUL (as `find -H PATH -mindepth 1 -maxdepth 32 \( -type f -o
    /// -type l -o -type d ! -empty \) -printf '%y%P\0'`: `f` a regular file, `l` a symlink,
    /// never followed, `d` a directory that is not empty), as `StreamData` within the credit,
    /// then `StreamExit` 0 and closes. At most [`LIST_FILES_MAX`] files, [`LIST_DEPTH_MAX`]
    /// levels, [`LIST_BYTES_MAX`] bytes and [`LIST_TIME_MAX`]. The stream takes no input.
    FileList {
        /// Absolute path of the directory on the node (a symlink to one is followed).
        path: String,
    },
}

/// Most regular files a `FileList` lists (more ends it with an error).
pub const LIST_FILES_MAX: usize = 100_000;
/// Deepest level a `FileList` lists (a directory there that is not empty is still listed, so
/// that a reader refuses a tree deeper than it copies instead of cutting it).
pub const LIST_DEPTH_MAX: usize = 32;
/// Most bytes of a `FileList`'s records.
pub const LIST_BYTES_MAX: usize = 16 << 20;
/// Longest a `FileList`'s walk may take.
pub const LIST_TIME_MAX: std::time::Duration = std::time::Duration::from_secs(120);

/// Checks a `FileList`'s path: as [`check_file_path`], and no `..` segment.
pub fn check_dir_path(path: &str) -> Result<(), String> {
    check_file_path(path)?;
    if path.split('/').any(|seg| seg == "..") {
        return Err(format!(
            "bad path {path:?} (an absolute path of a directory, without `..`)"
        ));
    }
    Ok(())
}

/// Longest path of a file stream, in bytes (as Linux's PATH_MAX).
pub const FILE_PATH_MAX: usize = 4096;
/// Largest permission bits of a put.
pub const FILE_MODE_MAX: u32 = 0o7777;
/// Longest owner or group name of a put.
pub const FILE_OWNER_MAX: usize = 32;

/// Checks a file stream's path: absolute, no NUL, at most [`FILE_PATH_MAX`] bytes, not `/`.
pub fn check_file_path(path: &str) -> Result<(), String> {
    if path.len() > FILE_PATH_MAX {
        return Err(format!(
            "path is {} bytes, more than {FILE_PATH_MAX}",
            path.len()
        ));
    }
    if !path.starts_with('/') || path.contains('\0') || path.trim_end_matches('/').is_empty() {
        return Err(format!(
            "bad path {path:?} (an absolute path of a file, without NUL)"
        ));
    }
    Ok(())
}

/// Checks an owner or group name of a put: a uid/gid, or 1 to [`FILE_OWNER_MAX`] letters,
/// digits and `_.-` not starting with `-`.
pub fn check_owner_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= FILE_OWNER_MAX
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad {what} {name:?} (a name of 1 to {FILE_OWNER_MAX} letters, digits and _.-, or a number)"
        ))
    }
}

/// Checks a SHA-256 in hex: 64 lowercase hex digits.
pub fn check_sha256(sha256: &str) -> Result<(), String> {
    if sha256.len() == 64
        && sha256
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        Ok(())
    } else {
        Err(format!("bad sha256 {sha256:?} (64 lowercase hex digits)"))
    }
}

/// Length of a put's trailer: the raw SHA-256 that follows a file's bytes (since version 6).
pub const FILE_TRAILER_LEN: usize = 32;
/// Length of a put's resume key, in hex digits (since version 6).
pub const FILE_KEY_LEN: usize = 16;

/// Where a `FilePut`'s SHA-256 comes from (its `sha256` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutHash<'a> {
    /// 64 lowercase hex digits, known before the bytes (version 5's only form).
    Upfront(&'a str),
    /// Since version 6: [`FILE_KEY_LEN`] lowercase hex digits naming this version of the
    /// sender's file (it picks them, e.g. from the file's size and mtime): the temp file is named
    /// after the key, so a retry resumes it, and the whole file's SHA-256 follows the file's
    /// `size` bytes as [`FILE_TRAILER_LEN`] raw bytes, before `StreamEof`.
    Trailer(&'a str),
}

impl<'a> PutHash<'a> {
    /// Reads a `FilePut`'s `sha256` field.
    pub fn parse(sha256: &'a str) -> Result<Self, String> {
        let hex = sha256
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        match sha256.len() {
            64 if hex => Ok(PutHash::Upfront(sha256)),
            FILE_KEY_LEN if hex => Ok(PutHash::Trailer(sha256)),
            _ => Err(format!(
                "bad sha256 {sha256:?} (64 lowercase hex digits, or a resume key of {FILE_KEY_LEN})"
            )),
        }
    }

    /// The first protocol version that has this form.
    pub fn since(&self) -> u32 {
        match self {
            PutHash::Upfront(_) => crate::version::FILES_SINCE,
            PutHash::Trailer(_) => crate::version::FILE_TRAILER_SINCE,
        }
    }
}

/// Checks a resume key: [`FILE_KEY_LEN`] lowercase hex digits.
pub fn check_file_key(key: &str) -> Result<(), String> {
    match PutHash::parse(key) {
        Ok(PutHash::Trailer(_)) => Ok(()),
        _ => Err(format!(
            "bad key {key:?} ({FILE_KEY_LEN} lowercase hex digits)"
        )),
    }
}

/// The temp file name a put of `name` with hash `sha256` (or resume key) writes beside its target
/// (the same for a retried put, so it resumes).
pub fn partial_name(name: &str, sha256: &str) -> String {
    let short = sha256.get(..16).unwrap_or(sha256);
    format!(".{name}.fleetrun-{short}.part")
}

/// Longest `TERM` of a `Shell` stream.
pub const TERM_MAX: usize = 64;
/// Longest host name of a `Tcp` stream (as DNS).
pub const HOST_MAX: usize = 253;
/// Largest window side of a `Shell` stream, in rows or columns.
pub const WINDOW_SIDE_MAX: u16 = 4096;

/// Checks a window size (a `Shell`'s start, or a `StreamResize`): 1 to [`WINDOW_SIDE_MAX`] each.
pub fn check_window(rows: u16, cols: u16) -> Result<(), String> {
    if (1..=WINDOW_SIDE_MAX).contains(&rows) && (1..=WINDOW_SIDE_MAX).contains(&cols) {
        Ok(())
    } else {
        Err(format!(
            "a window of {rows} rows and {cols} columns (each must be 1 to {WINDOW_SIDE_MAX})"
        ))
    }
}

fn check_env(env: &[(String, String)]) -> Result<(), String> {
    if env.len() > STREAM_ENV_MAX {
        return Err(format!(
            "{} environment variables, more than {STREAM_ENV_MAX}",
            env.len()
        ));
    }
    if let Some((k, _)) = env
        .iter()
        .find(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
    {
        return Err(format!("bad environment variable name {k:?}"));
    }
    Ok(())
}

fn check_command(command: &str) -> Result<(), String> {
    if command.len() > STREAM_COMMAND_MAX {
        return Err(format!(
            "command is {} bytes, more than {STREAM_COMMAND_MAX}",
            command.len()
        ));
    }
    Ok(())
}

impl StreamKind {
    /// Checks the sizes of what the server asks for; the error says which limit.
    pub fn check(&self) -> Result<(), String> {
        match self {
            StreamKind::Exec { command, env, .. } => {
                check_command(command)?;
                check_env(env)
            }
            StreamKind::Shell {
                command,
                term,
                rows,
                cols,
                env,
                ..
            } => {
                if let Some(c) = command {
                    check_command(c)?;
                }
                if term.len() > TERM_MAX
                    || !term
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b))
                {
                    return Err(format!(
                        "bad TERM {term:?} (at most {TERM_MAX} letters, digits and -_.+)"
                    ));
                }
                check_window(*rows, *cols)?;
                check_env(env)
            }
            StreamKind::Tcp { host, port } => {
                if host.is_empty() || host.len() > HOST_MAX || host.contains(['\0', '/', ' ']) {
                    return Err(format!(
                        "bad host {host:?} (a name or address of 1 to {HOST_MAX} bytes)"
                    ));
                }
                if *port == 0 {
                    return Err("port 0 is not a port to connect to".into());
                }
                Ok(())
            }
            StreamKind::FilePut {
                path,
                mode,
                owner,
                group,
                sha256,
                ..
            } => {
                check_file_path(path)?;
                if let Some(m) = mode
                    && *m > FILE_MODE_MAX
                {
                    return Err(format!("bad mode {m:o} (at most 7777 in octal)"));
                }
                if let Some(o) = owner {
                    check_owner_name("owner", o)?;
                }
                if let Some(g) = group {
                    check_owner_name("group", g)?;
                }
                PutHash::parse(sha256).map(|_| ())
            }
            StreamKind::FileGet { path, .. } => check_file_path(path),
            StreamKind::FileList { path } => check_dir_path(path),
        }
    }

    /// The first protocol version with this kind: a server opens it only on connections whose
    /// agent said that version or later.
    pub fn since(&self) -> u32 {
        match self {
            StreamKind::Exec { .. } => crate::version::STREAMS_SINCE,
            StreamKind::Shell { .. } | StreamKind::Tcp { .. } => {
                crate::version::SHELLS_AND_TCP_SINCE
            }
            StreamKind::FilePut { sha256, .. } => PutHash::parse(sha256)
                .map(|h| h.since())
                .unwrap_or(crate::version::FILES_SINCE),
            StreamKind::FileGet { .. } => crate::version::FILES_SINCE,
            StreamKind::FileList { .. } => crate::version::FILE_LIST_SINCE,
        }
    }

    /// The kind's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            StreamKind::Exec { .. } => "exec",
            StreamKind::Shell { .. } => "shell",
            StreamKind::Tcp { .. } => "tcp",
            StreamKind::FilePut { .. } | StreamKind::FileGet { .. } => "file transfer",
            StreamKind::FileList { .. } => "file list",
        }
    }
}

/// Which output of a stream's process a `StreamData` from the agent carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StreamFd {
    /// Standard output (or the PTY).
    Stdout,
    /// Standard error.
    Stderr,
}

/// A peer broke the credit rules.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CreditError {
    /// Data beyond the credit granted.
    #[error("{got} bytes of data with only {credit} bytes of credit")]
    Overrun {
        /// Bytes that arrived.
        got: u64,
        /// Credit they had.
        credit: u64,
    },
    /// A grant that would raise the credit past [`STREAM_WINDOW_MAX`].
    #[error("credit of {credit} bytes would exceed the largest window ({STREAM_WINDOW_MAX})")]
    TooMuch {
        /// The credit the grant would make.
        credit: u64,
    },
}

/// The sending side of a stream's flow control: the bytes the peer still lets us send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendWindow {
    credit: u64,
}

impl SendWindow {
    /// A window with the peer's initial grant (at most [`STREAM_WINDOW_MAX`]).
    pub fn new(initial: u64) -> Result<Self, CreditError> {
        let mut w = SendWindow { credit: 0 };
        w.grant(initial)?;
        Ok(w)
    }

    /// Bytes that may be sent now.
    pub fn credit(&self) -> u64 {
        self.credit
    }

    /// How many bytes of `want` to send in the next frame: at most the credit and
    /// [`STREAM_FRAME_MAX`]. The credit is taken; 0 means wait for a grant.
    pub fn take(&mut self, want: usize) -> usize {
        let n = (want.min(STREAM_FRAME_MAX) as u64).min(self.credit);
        self.credit -= n;
        // n <= STREAM_FRAME_MAX, so it fits in usize.
        n as usize
    }

    /// Returns credit taken but not used (a read gave fewer bytes than reserved).
    pub fn give_back(&mut self, bytes: usize) {
        self.credit = self.credit.saturating_add(bytes as u64);
    }

    /// The peer granted `bytes` more.
    pub fn grant(&mut self, bytes: u64) -> Result<(), CreditError> {
        let credit = self.credit.saturating_add(bytes);
        if credit > STREAM_WINDOW_MAX {
            return Err(CreditError::TooMuch { credit });
        }
        self.credit = credit;
        Ok(())
    }
}

/// The receiving side: how much the peer may still send, and when to grant more. Credit is granted
/// back as received bytes are consumed, once half the window is consumed (fewer, larger grants).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecvWindow {
    window: u64,
    /// Credit the peer still holds.
    outstanding: u64,
    /// Consumed bytes not yet granted back.
    consumed: u64,
}

impl RecvWindow {
    /// A window of `window` bytes, all granted to the peer at the start (the caller sends that
    /// grant); at most [`STREAM_WINDOW_MAX`].
    pub fn new(window: u64) -> Self {
        let window = window.clamp(1, STREAM_WINDOW_MAX);
        RecvWindow {
            window,
            outstanding: window,
            consumed: 0,
        }
    }

    /// The window size (the initial grant).
    pub fn window(&self) -> u64 {
        self.window
    }

    /// `bytes` arrived: an error when they exceed the peer's credit.
    pub fn receive(&mut self, bytes: usize) -> Result<(), CreditError> {
        let got = bytes as u64;
        if got > self.outstanding {
            return Err(CreditError::Overrun {
                got,
                credit: self.outstanding,
            });
        }
        self.outstanding -= got;
        Ok(())
    }

    /// `bytes` were consumed (written on); `Some(n)` when a grant of `n` is due now.
    pub fn consume(&mut self, bytes: usize) -> Option<u64> {
        self.consumed = self.consumed.saturating_add(bytes as u64);
        if self.consumed == 0 || self.consumed < self.window.div_ceil(2) {
            return None;
        }
        let n = std::mem::take(&mut self.consumed);
        self.outstanding = self.outstanding.saturating_add(n);
        Some(n)
    }
}

/// A client's exec WebSocket (`GET /v1/nodes/{node_id}/exec`, see docs/protocol.md "Client
/// sessions"): binary messages carry one tag byte, then bytes.
pub mod client {
    use serde::{Deserialize, Serialize};
    use std::collections::BTreeMap;

    /// Tag of a client's binary message: stdin bytes.
    pub const TAG_STDIN: u8 = 0;
    /// Tag of a server's binary message: stdout bytes.
    pub const TAG_STDOUT: u8 = 1;
    /// Tag of a server's binary message: stderr bytes.
    pub const TAG_STDERR: u8 = 2;
    /// Largest message a client may send (a tag byte and one frame of stdin).
    pub const CLIENT_MESSAGE_MAX: usize = super::STREAM_FRAME_MAX + 1;

    /// The client's first message (JSON text): what to run.
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ExecRequest {
        /// The command line: run by `sh -c` on the node, or with a PTY by the user's shell's
        /// `-c`; empty with a PTY for the interactive login shell.
        pub command: String,
        /// Run as this user; empty for the agent's own.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        pub run_as: String,
        /// Extra environment variables.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub env: BTreeMap<String, String>,
        /// Working directory; empty for the user's home. Only without a PTY.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        pub working_dir: String,
        /// A PTY on the node (a `Shell` stream): its output is all stdout, stdin is what is typed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub pty: Option<PtyRequest>,
    }

    /// The terminal a client asks for.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct PtyRequest {
        /// `TERM` on the node (the client's).
        pub term: String,
        /// Rows of the client's window.
        pub rows: u16,
        /// Columns of the client's window.
        pub cols: u16,
    }

    /// A client's text message after the first.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
    pub enum ClientEvent {
        /// Stdin ends (the remote stdin is closed after the bytes before it; a PTY ignores it).
        Eof,
        /// A put's trailer (since protocol version 6, a put opened with `key=` instead of
        /// `sha256=`): the file's bytes end, and these are its size and SHA-256.
        End {
            /// The whole file's length.
            size: u64,
            /// The whole file's SHA-256, 64 lowercase hex digits.
            sha256: String,
        },
        /// The client's window changed size (only with a PTY; each side 1 to 4096).
        Resize {
            /// Rows.
            rows: u16,
            /// Columns.
            cols: u16,
        },
    }

    /// A server's text message.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub enum ServerEvent {
        /// The command started on the node.
        Started,
        /// The command ended (after all its output): exit code, or 128 + signal and the signal.
        Exit {
            /// Exit code.
            code: i32,
            /// The signal that ended it, if one did.
            signal: Option<i32>,
        },
        /// A file transfer (since protocol version 5): the file's size and mode, and the offset
        /// its bytes start at (a put: where the client starts sending; a get: where the bytes
        /// that follow start).
        File {
            /// Where the bytes start.
            offset: u64,
            /// The whole file's length.
            size: u64,
            /// Its permission bits (a get; 0 for a put).
            mode: u32,
        },
        /// A file transfer ended well: the SHA-256 of the whole file (a put: checked and renamed
        /// into place; a get: the client checks it), then a normal close.
        Done {
            /// 64 lowercase hex digits.
            sha256: String,
        },
        /// The session failed or was refused; the socket closes after it.
        Error {
            /// Why, in words.
            message: String,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_puts_hash_is_up_front_or_a_key_for_the_trailer() {
        let sha = "ab".repeat(32);
        assert_eq!(PutHash::parse(&sha), Ok(PutHash::Upfront(&sha)));
        assert_eq!(
            PutHash::parse("0123456789abcdef"),
            Ok(PutHash::Trailer("0123456789abcdef"))
        );
        for bad in ["", "0123456789ABCDEF", "0123456789abcde", &"g".repeat(64)] {
            assert!(PutHash::parse(bad).is_err(), "{bad:?}");
        }
        assert!(check_file_key(&sha).is_err());
        // A keyed put needs an agent of version 6; a hashed one, 5.
        let put = |sha256: &str| StreamKind::FilePut {
            path: "/f".into(),
            mode: None,
            owner: None,
            group: None,
            size: 1,
            sha256: sha256.into(),
            resume: false,
            parents: false,
        };
        assert_eq!(put(&sha).since(), crate::version::FILES_SINCE);
        assert_eq!(
            put("0123456789abcdef").since(),
            crate::version::FILE_TRAILER_SINCE
        );
        assert_eq!(
            partial_name("f", "0123456789abcdef"),
            ".f.fleetrun-0123456789abcdef.part"
        );
    }

    #[test]
    fn a_sender_takes_at_most_its_credit_and_a_frame() {
        let mut w = SendWindow::new(200_000).unwrap();
        assert_eq!(w.take(1_000_000), STREAM_FRAME_MAX);
        assert_eq!(w.take(1_000_000), 200_000 - STREAM_FRAME_MAX);
        assert_eq!(w.take(10), 0);
        w.give_back(5);
        assert_eq!(w.take(10), 5);
        w.grant(7).unwrap();
        assert_eq!(w.credit(), 7);
        assert_eq!(
            w.grant(STREAM_WINDOW_MAX),
            Err(CreditError::TooMuch {
                credit: STREAM_WINDOW_MAX + 7
            })
        );
        assert!(SendWindow::new(STREAM_WINDOW_MAX + 1).is_err());
    }

    #[test]
    fn a_receiver_refuses_data_past_credit_and_grants_at_half_the_window() {
        let mut r = RecvWindow::new(100);
        r.receive(60).unwrap();
        assert_eq!(r.consume(40), None);
        assert_eq!(r.consume(20), Some(60));
        // 40 + 60 of credit now.
        r.receive(100).unwrap();
        assert_eq!(
            r.receive(1),
            Err(CreditError::Overrun { got: 1, credit: 0 })
        );
        assert_eq!(RecvWindow::new(u64::MAX).window(), STREAM_WINDOW_MAX);
    }

    #[test]
    fn exec_streams_are_checked() {
        let exec = |command: &str, env: Vec<(String, String)>| StreamKind::Exec {
            command: command.into(),
            run_as: None,
            env,
            working_dir: String::new(),
            pty: false,
        };
        assert_eq!(
            exec("echo hi", vec![("A".into(), "b".into())]).check(),
            Ok(())
        );
        let long = exec(&"x".repeat(STREAM_COMMAND_MAX + 1), vec![]).check();
        assert!(long.unwrap_err().contains("more than"));
        let bad = exec("true", vec![("A=B".into(), String::new())]).check();
        assert!(bad.unwrap_err().contains("bad environment variable"));
    }

    #[test]
    fn shell_and_tcp_streams_are_checked() {
        let shell = |term: &str, rows: u16, cols: u16| StreamKind::Shell {
            command: None,
            run_as: None,
            term: term.into(),
            rows,
            cols,
            env: vec![],
        };
        assert_eq!(shell("xterm-256color", 24, 80).check(), Ok(()));
        assert!(
            shell("xterm\n", 24, 80)
                .check()
                .unwrap_err()
                .contains("TERM")
        );
        assert!(
            shell("xterm", 0, 80)
                .check()
                .unwrap_err()
                .contains("window")
        );
        assert!(
            shell("xterm", 24, 5000)
                .check()
                .unwrap_err()
                .contains("window")
        );
        let tcp = |host: &str, port: u16| StreamKind::Tcp {
            host: host.into(),
            port,
        };
        assert_eq!(tcp("localhost", 22).check(), Ok(()));
        assert!(tcp("", 22).check().unwrap_err().contains("bad host"));
        assert!(tcp("a", 0).check().unwrap_err().contains("port 0"));
        assert_eq!(tcp("a", 1).since(), crate::version::SHELLS_AND_TCP_SINCE);
        assert_eq!(exec_kind().since(), crate::version::STREAMS_SINCE);
    }

    #[test]
    fn file_streams_are_checked() {
        let put =
            |path: &str, mode: Option<u32>, owner: Option<&str>, sha: &str| StreamKind::FilePut {
                path: path.into(),
                mode,
                owner: owner.map(Into::into),
                group: None,
                size: 1,
                sha256: sha.into(),
                resume: false,
                parents: false,
            };
        let sha = "ab".repeat(32);
        assert_eq!(
            put("/tmp/x", Some(0o755), Some("root"), &sha).check(),
            Ok(())
        );
        assert!(
            put("tmp/x", None, None, &sha)
                .check()
                .unwrap_err()
                .contains("bad path")
        );
        assert!(
            put("/", None, None, &sha)
                .check()
                .unwrap_err()
                .contains("bad path")
        );
        assert!(
            put("/a\0b", None, None, &sha)
                .check()
                .unwrap_err()
                .contains("bad path")
        );
        let long = format!("/{}", "a".repeat(FILE_PATH_MAX));
        assert!(
            put(&long, None, None, &sha)
                .check()
                .unwrap_err()
                .contains("more than")
        );
        assert!(
            put("/x", Some(0o10000), None, &sha)
                .check()
                .unwrap_err()
                .contains("bad mode")
        );
        assert!(
            put("/x", None, Some("-rf"), &sha)
                .check()
                .unwrap_err()
                .contains("bad owner")
        );
        assert!(
            put("/x", None, None, "AB")
                .check()
                .unwrap_err()
                .contains("bad sha256")
        );
        let get = StreamKind::FileGet {
            path: "x".into(),
            offset: 0,
        };
        assert!(get.check().unwrap_err().contains("bad path"));
        assert_eq!(get.since(), crate::version::FILES_SINCE);
        assert_eq!(partial_name("f", &sha), ".f.fleetrun-abababababababab.part");
        let list = |path: &str| StreamKind::FileList { path: path.into() }.check();
        assert_eq!(list("/var/log/app"), Ok(()));
        for bad in ["var/log", "/var/../etc", "/..", "/a\0b", "/"] {
            assert!(list(bad).unwrap_err().contains("bad path"), "{bad:?}");
        }
        let long = format!("/{}", "a".repeat(FILE_PATH_MAX));
        assert!(list(&long).unwrap_err().contains("more than"));
        // `..` inside a name is a name.
        assert_eq!(list("/a..b/c.."), Ok(()));
        assert_eq!(
            StreamKind::FileList { path: "/a".into() }.since(),
            crate::version::FILE_LIST_SINCE
        );
    }

    fn exec_kind() -> StreamKind {
        StreamKind::Exec {
            command: "true".into(),
            run_as: None,
            env: vec![],
            working_dir: String::new(),
            pty: false,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A sender that follows its SendWindow never has more in flight than the receiver
        /// granted, whatever the sizes and the order of grants; and the receiver agrees.
        #[test]
        fn a_sender_following_its_window_never_overruns_the_receiver(
            window in 1u64..400_000,
            steps in proptest::collection::vec((0usize..300_000, 0usize..300_000, any::<bool>()), 1..64),
        ) {
            let mut rx = RecvWindow::new(window);
            let mut tx = SendWindow::new(rx.window()).unwrap();
            let mut in_flight: u64 = 0;
            let mut unconsumed: u64 = 0;
            for (want, consume, deliver) in steps {
                let n = tx.take(want);
                prop_assert!(n <= STREAM_FRAME_MAX);
                in_flight += n as u64;
                prop_assert!(in_flight <= rx.window());
                if deliver {
                    // Everything in flight arrives, then some of it is consumed.
                    prop_assert!(rx.receive(in_flight as usize).is_ok());
                    unconsumed += in_flight;
                    in_flight = 0;
                    let c = (consume as u64).min(unconsumed);
                    unconsumed -= c;
                    if let Some(g) = rx.consume(c as usize) {
                        prop_assert!(tx.grant(g).is_ok());
                    }
                }
                prop_assert!(in_flight + unconsumed <= rx.window());
            }
        }
    }
}
