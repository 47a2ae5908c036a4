//! File transfers on session streams (protocol version 5): `FilePut` writes a file on the node,
//! `FileGet` reads one, each one stream with the credit flow control of every stream (see
//! `streams.rs` and docs/protocol.md, "File transfers").
//!
//! A put writes into a temp file beside its target, named after the target and the expected
//! SHA-256 (`fleetrun_proto::stream::partial_name`), created `O_EXCL | O_NOFOLLOW` with mode 0600.
//! It reports the offset it starts at (`StreamFileInfo`: 0, or with `resume` the temp file's
//! length, whose bytes are hashed from disk), takes the bytes from there, and at `StreamEof`
//! checks the count and the SHA-256 of the whole file, syncs it, sets mode and owner and renames
//! it over the target (then syncs the directory). A mismatch or data past the size deletes the
//! temp file; a hang-up keeps it for a resume. The target never holds a partial file.
//!
//! A get sends `StreamFileInfo` (size, mode), the bytes from the offset within the credit, and
//! `StreamFileDone` with the SHA-256 of the whole file (the prefix before the offset hashed from
//! disk).

use crate::streams::{Credit, Ended, Input, Stop, Streams, Tag, stopped};
use fleetrun_proto::channel::AgentFrame;
use fleetrun_proto::stream::{STREAM_FRAME_MAX, STREAM_WINDOW_BULK, StreamFd, partial_name};
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

/// Mode of a put's file when neither the put nor an existing target gives one.
pub const DEFAULT_MODE: u32 = 0o644;

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

/// A put ready for its bytes.
struct Prepared {
    file: File,
    offset: u64,
    hasher: Sha256,
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
    let mut hasher = Sha256::new();
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
                    hash_prefix(&mut file, offset, &mut hasher).map_err(cannot)?;
                    use std::io::Seek;
                    file.seek(io::SeekFrom::Start(offset)).map_err(cannot)?;
                    return Ok(Prepared {
                        file,
                        offset,
                        hasher,
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
        hasher,
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

/// A get's file, opened and checked, with the hash of the bytes before the offset.
fn prepare_get(path: &str, offset: u64) -> Result<(File, u64, u32, Sha256), String> {
    let mut file = match File::open(path) {
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
    let mut hasher = Sha256::new();
    hash_prefix(&mut file, offset, &mut hasher).map_err(|e| format!("cannot read {path}: {e}"))?;
    Ok((file, size, meta.mode() & 0o7777, hasher))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(format!("the file task failed: {e}")))
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
        let Prepared {
            file,
            offset,
            mut hasher,
            tmp,
            target,
            mode,
            owner,
        } = match prepared {
            Ok(p) => p,
            Err(e) => return Ended::failed(e),
        };
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
        let mut file = tokio::fs::File::from_std(file);
        let mut got = offset;
        loop {
            tokio::select! {
                msg = input.recv() => match msg {
                    Some(Input::Data(bytes)) => {
                        let n = bytes.len() as u64;
                        if got + n > size {
                            drop(file);
                            remove_quietly(&tmp);
                            return Ended::failed(format!(
                                "bad input: more bytes than the file's size ({size})"
                            ));
                        }
                        hasher.update(&bytes);
                        if let Err(e) = file.write_all(&bytes).await {
                            drop(file);
                            remove_quietly(&tmp);
                            return Ended::failed(format!("cannot write {}: {e}", tmp.display()));
                        }
                        got += n;
                        self.consumed(stream, serial, generation, bytes.len());
                    }
                    Some(Input::Eof) => break,
                    Some(Input::Resize(..)) => {}
                    // Hung up: the partial file stays for a resume.
                    None => return stopped(&stop),
                },
                _ = stop.changed() => return stopped(&stop),
            }
        }
        if got != size {
            drop(file);
            remove_quietly(&tmp);
            return Ended::failed(format!(
                "got {got} bytes of {size} ({} was not written)",
                target.display()
            ));
        }
        if let Err(e) = file.flush().await {
            drop(file);
            remove_quietly(&tmp);
            return Ended::failed(format!("cannot write {}: {e}", tmp.display()));
        }
        let file = file.into_std().await;
        let expected = put.sha256.clone();
        let done =
            blocking(move || finish_put(file, hasher, &expected, &tmp, &target, mode, owner)).await;
        match done {
            Ok(sha256) => {
                self.push(generation, [AgentFrame::StreamFileDone { stream, sha256 }]);
                Ended::ok()
            }
            Err(e) => Ended::failed(e),
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
        let (file, size, mode, mut hasher) = match prepared {
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
        let mut file = tokio::fs::File::from_std(file);
        let mut left = size - offset;
        let mut buf = vec![0u8; STREAM_FRAME_MAX];
        while left > 0 {
            let want = usize::try_from(left)
                .unwrap_or(STREAM_FRAME_MAX)
                .min(STREAM_FRAME_MAX);
            let n = tokio::select! {
                n = credit.take(want) => n,
                _ = stop.changed() => return stopped(&stop),
                msg = input.recv() => match msg {
                    Some(Input::Data(_)) => {
                        return Ended::failed("bad input: a file get takes no input".into());
                    }
                    Some(_) => continue,
                    None => return stopped(&stop),
                },
            };
            let read = match file.read(&mut buf[..n]).await {
                Ok(0) => {
                    return Ended::failed(format!(
                        "{path} shrank while being read ({} of {size} bytes)",
                        size - left
                    ));
                }
                Ok(r) => r,
                Err(e) => return Ended::failed(format!("cannot read {path}: {e}")),
            };
            credit.window.lock().give_back(n - read);
            hasher.update(&buf[..read]);
            left -= read as u64;
            let bytes = buf[..read].to_vec();
            self.push(
                generation,
                [AgentFrame::StreamData {
                    stream,
                    fd: StreamFd::Stdout,
                    bytes,
                }],
            );
        }
        let sha256 = hex::encode(hasher.finalize());
        self.push(generation, [AgentFrame::StreamFileDone { stream, sha256 }]);
        Ended::ok()
    }
}
