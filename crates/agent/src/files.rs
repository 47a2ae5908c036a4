//! File transfers on session streams (protocol version 5): `FilePut` writes a file on the node,
//! `FileGet` reads one, each one stream with the credit flow control of every stream (see
//! `streams.rs` and docs/protocol.md, "File transfers").
//!
//! A put writes into a temp file beside its target, named after the target and the expected
//! SHA-256, or (since version 6) the sender's resume key (`fleetrun_proto::stream::partial_name`),
//! created `O_EXCL | O_NOFOLLOW` with mode 0600. It reports the offset it starts at
//! (`StreamFileInfo`: 0, or with `resume` the temp file's length, whose bytes are hashed from
//! disk), takes the bytes from there (with a resume key, then the 32-byte trailer: the whole
//! file's SHA-256), and at `StreamEof` checks the count and the SHA-256 of the whole file, syncs
//! it, sets mode and owner and renames it over the target (then syncs the directory). A mismatch
//! or data past the size (and trailer) deletes the temp file; a hang-up keeps it for a resume. The
//! target never holds a partial file.
//!
//! A get sends `StreamFileInfo` (size, mode), the bytes from the offset within the credit, and
//! `StreamFileDone` with the SHA-256 of the whole file (the prefix before the offset hashed from
//! disk).
//!
//! Cost model: the stream's task decodes frames and keeps the credit; the file's bytes are
//! written (a put) or read (a get) and hashed on one blocking thread per transfer, fed through a
//! bounded channel, so hashing and disk work run beside the socket on another core. A put's
//! thread starts the kernel's writeback every [`WRITEBACK_EVERY`] bytes, so the one fsync
//! before the rename finds little left to write.

use crate::streams::{Credit, Ended, Input, Stop, Streams, Tag, stopped};
use fleetrun_proto::channel::AgentFrame;
use fleetrun_proto::stream::{
    FILE_TRAILER_LEN, PutHash, STREAM_FRAME_MAX, STREAM_WINDOW_BULK, StreamFd, partial_name,
};
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// Mode of a put's file when neither the put nor an existing target gives one.
pub const DEFAULT_MODE: u32 = 0o644;

/// A put starts the writeback of what it wrote after this many bytes (`sync_file_range`), so
/// dirty pages never pile up for the final fsync.
pub const WRITEBACK_EVERY: u64 = 8 << 20;

/// Chunks a get reads ahead of the credit (at most this many frames in memory besides it).
const READ_AHEAD: usize = 8;

/// What a `FilePut` stream writes.
pub(crate) struct Put {
    pub(crate) path: String,
    pub(crate) mode: Option<u32>,
    pub(crate) owner: Option<String>,
    pub(crate) group: Option<String>,
    pub(crate) size: u64,
    pub(crate) sha256: String,
    pub(crate) resume: bool,
    pub(crate) parents: bool,
}

/// The uid and gid a put sets (either may be left as it is).
type Owner = Option<(Option<u32>, Option<u32>)>;

/// A put ready for its bytes (a resumed temp file's prefix not hashed yet).
struct Prepared {
    file: File,
    offset: u64,
    tmp: PathBuf,
    target: PathBuf,
    mode: u32,
    owner: Owner,
}

fn remove_quietly(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(file = %path.display(), "cannot remove a partial file: {e}");
    }
}

/// Takes the temp file's lock (`flock`, held while the fd is open): one put of a target and hash
/// at a time, so two copies never write one temp file, nor one renames the other's.
fn lock(file: &File, target: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor this File owns; no memory is involved.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(format!(
            "another copy of this file to {} is in progress",
            target.display()
        ))
    } else {
        Err(format!(
            "cannot lock the temp file of {}: {e}",
            target.display()
        ))
    }
}

/// Hashes the first `len` bytes of `file` (a resumed prefix), from its start.
fn hash_prefix(file: &mut File, len: u64, hasher: &mut Sha256) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    let mut reader = file.take(len);
    while left > 0 {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while being hashed",
            ));
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(())
}

/// The uid and gid a put's `owner`/`group` name (a name or a number); needs root.
fn resolve_owner(owner: Option<&str>, group: Option<&str>) -> Result<Owner, String> {
    if owner.is_none() && group.is_none() {
        return Ok(None);
    }
    let euid = nix::unistd::Uid::effective();
    if !euid.is_root() {
        return Err(format!(
            "setting the owner or group needs the agent to run as root (it runs as uid {euid})"
        ));
    }
    let uid = match owner {
        None => None,
        Some(o) => Some(match o.parse::<u32>() {
            Ok(uid) => uid,
            Err(_) => match nix::unistd::User::from_name(o) {
                Ok(Some(u)) => u.uid.as_raw(),
                Ok(None) => return Err(format!("no such user {o}")),
                Err(e) => return Err(format!("cannot look up user {o}: {e}")),
            },
        }),
    };
    let gid = match group {
        None => None,
        Some(g) => Some(match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => match nix::unistd::Group::from_name(g) {
                Ok(Some(gr)) => gr.gid.as_raw(),
                Ok(None) => return Err(format!("no such group {g}")),
                Err(e) => return Err(format!("cannot look up group {g}: {e}")),
            },
        }),
    };
    Ok(Some((uid, gid)))
}

/// Checks the target, resolves the owner, and opens (or, resuming, reopens) the temp file.
fn prepare_put(put: &Put) -> Result<Prepared, String> {
    let path = &put.path;
    if path.ends_with('/') {
        return Err(format!("{path} names a directory, not a file"));
    }
    let target = PathBuf::from(path);
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(format!("{path} names no file"));
    };
    let Some(name) = name.to_str() else {
        return Err(format!("{path} is not valid UTF-8"));
    };
    if put.parents
        && let Err(e) = fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
    {
        return Err(format!("cannot create {}: {e}", parent.display()));
    }
    match fs::metadata(parent) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("{} is not a directory", parent.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!("no directory {} on the node", parent.display()));
        }
        Err(e) => return Err(format!("cannot use {}: {e}", parent.display())),
    }
    let existing = match fs::metadata(&target) {
        Ok(m) if m.is_dir() => return Err(format!("{path} is a directory")),
        Ok(m) => Some(m.mode() & 0o7777),
        Err(_) => None,
    };
    let mode = put.mode.or(existing).unwrap_or(DEFAULT_MODE);
    let owner = resolve_owner(put.owner.as_deref(), put.group.as_deref())?;
    let tmp = parent.join(partial_name(name, &put.sha256));
    let cannot = |e: io::Error| format!("cannot write {}: {e}", tmp.display());
    if put.resume {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
        {
            Ok(mut file) => {
                let meta = file.metadata().map_err(cannot)?;
                if meta.is_file() {
                    lock(&file, &target)?;
                    let mut offset = meta.len();
                    if offset > put.size {
                        // Longer than the file: not a prefix of it.
                        file.set_len(0).map_err(cannot)?;
                        offset = 0;
                    }
                    file.seek(io::SeekFrom::Start(offset)).map_err(cannot)?;
                    return Ok(Prepared {
                        file,
                        offset,
                        tmp,
                        target,
                        mode,
                        owner,
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // A symlink (ELOOP) or another odd entry is replaced below.
            Err(_) => {}
        }
    }
    // A temp file another put is writing is not replaced under it.
    if let Ok(busy) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
    {
        lock(&busy, &target)?;
    }
    remove_quietly(&tmp);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&tmp)
        .map_err(cannot)?;
    lock(&file, &target)?;
    Ok(Prepared {
        file,
        offset: 0,
        tmp,
        target,
        mode,
        owner,
    })
}

/// Checks the whole file's hash, syncs it, sets mode and owner, renames it into place and syncs
/// the directory. On a mismatch the temp file is deleted.
fn finish_put(
    file: File,
    hasher: Sha256,
    expected: &str,
    tmp: &Path,
    target: &Path,
    mode: u32,
    owner: Owner,
) -> Result<String, String> {
    let got = hex::encode(hasher.finalize());
    if got != expected {
        remove_quietly(tmp);
        return Err(format!(
            "sha256 mismatch: expected {expected}, got {got} ({} was not written)",
            target.display()
        ));
    }
    let fail = |what: &str, e: io::Error| {
        remove_quietly(tmp);
        format!("cannot {what} {}: {e}", tmp.display())
    };
    if let Some((uid, gid)) = owner {
        nix::unistd::fchown(
            &file,
            uid.map(nix::unistd::Uid::from_raw),
            gid.map(nix::unistd::Gid::from_raw),
        )
        .map_err(|e| fail("chown", e.into()))?;
    }
    // After the chown, which clears set-id bits.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| fail("chmod", e))?;
    file.sync_all().map_err(|e| fail("sync", e))?;
    drop(file);
    fs::rename(tmp, target).map_err(|e| fail("rename", e))?;
    if let Some(dir) = target.parent()
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(got)
}

/// A get's file, opened and checked: the file, its size and mode.
fn prepare_get(path: &str, offset: u64) -> Result<(File, u64, u32), String> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!("no such file {path} on the node"));
        }
        Err(e) => return Err(format!("cannot open {path}: {e}")),
    };
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot open {path}: {e}"))?;
    if meta.is_dir() {
        return Err(format!("{path} is a directory"));
    }
    if !meta.is_file() {
        return Err(format!("{path} is not a regular file"));
    }
    let size = meta.len();
    if offset > size {
        return Err(format!(
            "offset {offset} is past the end of {path} ({size} bytes)"
        ));
    }
    Ok((file, size, meta.mode() & 0o7777))
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(format!("the file task failed: {e}")))
}

/// What a put's stream task hands its writer.
enum Job {
    Data(Vec<u8>),
    End,
}

/// How a put's writer ended.
enum Written {
    /// Checked and renamed into place: the whole file's SHA-256.
    Done(String),
    Failed(String),
    /// The input stopped before its end: the temp file stays for a resume.
    HungUp,
}

/// Asks the kernel to start writing `len` bytes at `from` back to disk, without waiting.
fn start_writeback(file: &File, from: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(from), Ok(len)) = (i64::try_from(from), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range(2) on a descriptor this File owns; no memory is involved. Only a
    // hint: a failure leaves the work to the final fsync.
    let _ =
        unsafe { libc::sync_file_range(file.as_raw_fd(), from, len, libc::SYNC_FILE_RANGE_WRITE) };
}

/// A put's writer, on a blocking thread: hashes a resumed prefix from disk, then writes and
/// hashes each chunk, hands its bytes back to the credit (`consumed`), keeps the trailer, and at
/// the end checks and renames (`finish_put`). Every failure deletes the temp file.
fn write_put(
    p: Prepared,
    put: &Put,
    jobs: &mut mpsc::Receiver<Job>,
    consumed: impl Fn(usize),
) -> Written {
    let Prepared {
        mut file,
        offset,
        tmp,
        target,
        mode,
        owner,
    } = p;
    let fail = |file: File, why: String| {
        drop(file);
        remove_quietly(&tmp);
        Written::Failed(why)
    };
    let cannot = |e: io::Error| format!("cannot write {}: {e}", tmp.display());
    let mut hasher = Sha256::new();
    if offset > 0 {
        let hashed = file
            .seek(io::SeekFrom::Start(0))
            .and_then(|_| hash_prefix(&mut file, offset, &mut hasher));
        if let Err(e) = hashed {
            return fail(file, cannot(e));
        }
    }
    let size = put.size;
    let hash = PutHash::parse(&put.sha256);
    let mut trailer = match hash {
        Ok(PutHash::Trailer(_)) => Some(Vec::with_capacity(FILE_TRAILER_LEN)),
        _ => None,
    };
    let mut got = offset;
    let mut synced = offset;
    loop {
        match jobs.blocking_recv() {
            Some(Job::Data(bytes)) => {
                let n = bytes.len();
                let body = usize::try_from(size - got).map_or(n, |room| room.min(n));
                let (body, extra) = bytes.split_at(body);
                if !extra.is_empty() {
                    match trailer.as_mut() {
                        Some(t) if t.len() + extra.len() <= FILE_TRAILER_LEN => {
                            t.extend_from_slice(extra);
                        }
                        Some(_) => {
                            return fail(
                                file,
                                format!(
                                    "bad input: bytes after the trailer (the file's {size} bytes and its {FILE_TRAILER_LEN}-byte SHA-256)"
                                ),
                            );
                        }
                        None => {
                            return fail(
                                file,
                                format!("bad input: more bytes than the file's size ({size})"),
                            );
                        }
                    }
                }
                if !body.is_empty() {
                    hasher.update(body);
                    if let Err(e) = file.write_all(body) {
                        return fail(file, cannot(e));
                    }
                    got += body.len() as u64;
                    if got - synced >= WRITEBACK_EVERY {
                        start_writeback(&file, synced, got - synced);
                        synced = got;
                    }
                }
                consumed(n);
            }
            Some(Job::End) => break,
            None => return Written::HungUp,
        }
    }
    if got != size {
        return fail(
            file,
            format!(
                "got {got} bytes of {size} ({} was not written)",
                target.display()
            ),
        );
    }
    let expected = match (hash, trailer) {
        (Ok(PutHash::Upfront(h)), _) => h.to_owned(),
        (Ok(PutHash::Trailer(_)), Some(t)) if t.len() == FILE_TRAILER_LEN => hex::encode(t),
        (Ok(PutHash::Trailer(_)), _) => {
            return fail(
                file,
                format!(
                    "the put ended without its trailer (the file's SHA-256 after its {size} bytes; {} was not written)",
                    target.display()
                ),
            );
        }
        // The stream's kind was checked at its open.
        (Err(e), _) => return fail(file, format!("bad stream: {e}")),
    };
    match finish_put(file, hasher, &expected, &tmp, &target, mode, owner) {
        Ok(sha256) => Written::Done(sha256),
        Err(e) => Written::Failed(e),
    }
}

/// What a get's reader (or a list's walker) hands its stream task.
pub(crate) enum Chunk {
    Data(Vec<u8>),
    /// All read: the whole file's SHA-256 (a list: empty).
    Done(String),
    Failed(String),
}

/// A get's reader, on a blocking thread: hashes the prefix before `offset`, then reads the rest
/// in frames, hashing each, at most [`READ_AHEAD`] frames ahead of the stream task.
fn read_get(
    mut file: File,
    path: &str,
    offset: u64,
    size: u64,
    chunks: &mpsc::Sender<Chunk>,
) -> Option<()> {
    let mut hasher = Sha256::new();
    let cannot = |e: io::Error| Chunk::Failed(format!("cannot read {path}: {e}"));
    if let Err(e) = hash_prefix(&mut file, offset, &mut hasher) {
        return chunks.blocking_send(cannot(e)).ok();
    }
    let mut left = size - offset;
    while left > 0 {
        let want = usize::try_from(left).map_or(STREAM_FRAME_MAX, |l| l.min(STREAM_FRAME_MAX));
        let mut buf = Vec::with_capacity(want);
        match (&file).take(want as u64).read_to_end(&mut buf) {
            Ok(0) => {
                let why = format!(
                    "{path} shrank while being read ({} of {size} bytes)",
                    size - left
                );
                return chunks.blocking_send(Chunk::Failed(why)).ok();
            }
            Ok(n) => left -= n as u64,
            Err(e) => return chunks.blocking_send(cannot(e)).ok(),
        }
        hasher.update(&buf);
        chunks.blocking_send(Chunk::Data(buf)).ok()?;
    }
    chunks
        .blocking_send(Chunk::Done(hex::encode(hasher.finalize())))
        .ok()
}

impl Streams {
    /// Runs a `FilePut` stream to its end (see the module docs).
    pub(crate) async fn run_put(
        self: &Arc<Self>,
        tag: Tag,
        put: Put,
        mut input: mpsc::UnboundedReceiver<Input>,
        mut stop: watch::Receiver<Option<Stop>>,
    ) -> Ended {
        let put = Arc::new(put);
        let p = Arc::clone(&put);
        let prepared = tokio::select! {
            r = blocking(move || prepare_put(&p)) => r,
            _ = stop.changed() => return stopped(&stop),
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => return Ended::failed(e),
        };
        let offset = prepared.offset;
        let size = put.size;
        let Tag {
            stream,
            serial,
            generation,
        } = tag;
        self.push(
            generation,
            [
                AgentFrame::StreamFileInfo {
                    stream,
                    offset,
                    size,
                    mode: 0,
                },
                // Ready: the first grant of the input window tells the server so.
                AgentFrame::StreamCredit {
                    stream,
                    bytes: STREAM_WINDOW_BULK,
                },
            ],
        );
        // The credit bounds what is in flight; the channel only needs room for a window of
        // frames, so a send never waits in practice.
        let (jobs, mut rx) = mpsc::channel(64);
        let me = Arc::clone(self);
        let writer = tokio::task::spawn_blocking(move || {
            write_put(prepared, &put, &mut rx, |n| {
                me.consumed(stream, serial, generation, n);
            })
        });
        let mut hung_up = false;
        loop {
            tokio::select! {
                // Input first: what arrived before a hang-up is written, for the resume.
                biased;
                msg = input.recv() => match msg {
                    Some(Input::Data(bytes)) => {
                        // An error: the writer ended (it says why below).
                        if jobs.send(Job::Data(bytes)).await.is_err() {
                            break;
                        }
                    }
                    Some(Input::Eof) => {
                        let _ = jobs.send(Job::End).await;
                        break;
                    }
                    Some(Input::Resize(..)) => {}
                    // Hung up: the partial file stays for a resume.
                    None => {
                        hung_up = true;
                        break;
                    }
                },
                _ = stop.changed() => {
                    hung_up = true;
                    break;
                }
            }
        }
        // Waited for even on a hang-up: the temp file stays locked until the writer lets go.
        drop(jobs);
        let written = writer
            .await
            .unwrap_or_else(|e| Written::Failed(format!("the file task failed: {e}")));
        match written {
            Written::Done(sha256) => {
                self.push(generation, [AgentFrame::StreamFileDone { stream, sha256 }]);
                Ended::ok()
            }
            Written::Failed(e) => Ended::failed(e),
            Written::HungUp if hung_up => stopped(&stop),
            Written::HungUp => Ended::failed("the file's writer stopped".into()),
        }
    }

    /// Runs a `FileGet` stream to its end (see the module docs).
    pub(crate) async fn run_get(
        self: &Arc<Self>,
        tag: Tag,
        path: String,
        offset: u64,
        credit: Arc<Credit>,
        mut input: mpsc::UnboundedReceiver<Input>,
        mut stop: watch::Receiver<Option<Stop>>,
    ) -> Ended {
        let p = path.clone();
        let prepared = tokio::select! {
            r = blocking(move || prepare_get(&p, offset)) => r,
            _ = stop.changed() => return stopped(&stop),
        };
        let (file, size, mode) = match prepared {
            Ok(p) => p,
            Err(e) => return Ended::failed(e),
        };
        let Tag {
            stream, generation, ..
        } = tag;
        self.push(
            generation,
            [
                AgentFrame::StreamFileInfo {
                    stream,
                    offset,
                    size,
                    mode,
                },
                AgentFrame::StreamCredit {
                    stream,
                    bytes: STREAM_WINDOW_BULK,
                },
            ],
        );
        let (tx, mut chunks) = mpsc::channel(READ_AHEAD);
        // Ends by itself once `chunks` is dropped (its next send fails).
        tokio::task::spawn_blocking(move || read_get(file, &path, offset, size, &tx));
        let sent = self
            .send_chunks(
                tag,
                &credit,
                &mut chunks,
                &mut input,
                &mut stop,
                "a file get",
            )
            .await;
        match sent {
            Ok(sha256) => {
                self.push(generation, [AgentFrame::StreamFileDone { stream, sha256 }]);
                Ended::ok()
            }
            Err(ended) => ended,
        }
    }

    /// Sends what a reader thread hands over as `StreamData` `Stdout` within the credit, until
    /// its `Done` (returned) or how the stream ended otherwise. `what` names the stream for the
    /// refusal of input (it takes none).
    pub(crate) async fn send_chunks(
        self: &Arc<Self>,
        tag: Tag,
        credit: &Credit,
        chunks: &mut mpsc::Receiver<Chunk>,
        input: &mut mpsc::UnboundedReceiver<Input>,
        stop: &mut watch::Receiver<Option<Stop>>,
        what: &str,
    ) -> Result<String, Ended> {
        let Tag {
            stream, generation, ..
        } = tag;
        let no_input = || Ended::failed(format!("bad input: {what} takes no input"));
        loop {
            let chunk = tokio::select! {
                c = chunks.recv() => c,
                _ = stop.changed() => return Err(stopped(stop)),
                msg = input.recv() => match msg {
                    Some(Input::Data(_)) => return Err(no_input()),
                    Some(_) => continue,
                    None => return Err(stopped(stop)),
                },
            };
            let mut bytes = match chunk {
                Some(Chunk::Data(b)) => b,
                Some(Chunk::Done(end)) => return Ok(end),
                Some(Chunk::Failed(e)) => return Err(Ended::failed(e)),
                None => return Err(Ended::failed("the file's reader stopped".into())),
            };
            while !bytes.is_empty() {
                let n = tokio::select! {
                    n = credit.take(bytes.len()) => n,
                    _ = stop.changed() => return Err(stopped(stop)),
                    msg = input.recv() => match msg {
                        Some(Input::Data(_)) => return Err(no_input()),
                        Some(_) => continue,
                        None => return Err(stopped(stop)),
                    },
                };
                // Whole frames as read, without a copy, while the credit allows.
                let rest = if n < bytes.len() {
                    bytes.split_off(n)
                } else {
                    Vec::new()
                };
                self.push(
                    generation,
                    [AgentFrame::StreamData {
                        stream,
                        fd: StreamFd::Stdout,
                        bytes,
                    }],
                );
                bytes = rest;
            }
        }
    }
}
