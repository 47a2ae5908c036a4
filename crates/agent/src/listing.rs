//! Directory listings on session streams (`FileList`, protocol version 7): the tree `cp -r`
//! copies down, so that a copy needs only the `cp` action (a `find` over exec needs `shell`).
//!
//! The walk runs on a blocking thread with `std::fs` and never follows a symlink below the
//! directory (a symlink to a directory is the directory itself only at the top, as `find -H`).
//! It writes what `find -H DIR -mindepth 1 -maxdepth 32 \( -type f -o -type l -o -type d !
//! -empty \) -printf '%y%P\0'` would (the reader's parser is the same for both): a type byte and
//! the path relative to DIR, NUL-ended, in frames handed to the stream task through a bounded
//! channel, which sends them within the credit (`Streams::send_chunks`, as a get's bytes). The
//! bounds ([`LIST_FILES_MAX`] files, [`LIST_DEPTH_MAX`] levels, [`LIST_BYTES_MAX`] bytes,
//! [`LIST_TIME_MAX`]) end the walk with an error naming the one passed.

use crate::files::{Chunk, blocking};
use crate::streams::{Credit, Ended, Input, Stop, Streams, Tag, stopped};
use fleetrun_proto::channel::AgentFrame;
use fleetrun_proto::stream::{
    LIST_BYTES_MAX, LIST_DEPTH_MAX, LIST_FILES_MAX, LIST_TIME_MAX, STREAM_FRAME_MAX,
    STREAM_WINDOW_BULK,
};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, watch};

/// Frames the walk gets ahead of the credit.
const READ_AHEAD: usize = 8;

/// Checks the directory to list: there, and a directory (a symlink to one followed).
fn check_root(path: &str) -> Result<(), String> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{path} is not a directory")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(format!("no directory {path} on the node"))
        }
        Err(e) => Err(format!("cannot list {path}: {e}")),
    }
}

/// The records of a listing, cut into frames and bounded.
struct Records<'a> {
    root: &'a str,
    buf: Vec<u8>,
    bytes: usize,
    files: usize,
    out: &'a mpsc::Sender<Chunk>,
}

impl Records<'_> {
    /// Adds one record; `Err` with why the listing stops (`None`: the stream is gone).
    fn add(&mut self, kind: u8, rel: &[u8]) -> Result<(), Option<String>> {
        if kind == b'f' {
            self.files += 1;
            if self.files > LIST_FILES_MAX {
                return Err(Some(format!(
                    "{} holds more than {LIST_FILES_MAX} files: copy a part of it",
                    self.root
                )));
            }
        }
        self.bytes += rel.len() + 2;
        if self.bytes > LIST_BYTES_MAX {
            return Err(Some(format!(
                "the listing of {} is over {} MiB: copy a part of it",
                self.root,
                LIST_BYTES_MAX >> 20
            )));
        }
        self.buf.push(kind);
        self.buf.extend_from_slice(rel);
        self.buf.push(0);
        if self.buf.len() >= STREAM_FRAME_MAX {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Option<String>> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let frame = std::mem::take(&mut self.buf);
        self.out.blocking_send(Chunk::Data(frame)).map_err(|_| None)
    }
}

/// Walks the tree under `root` (depth first, at most [`LIST_DEPTH_MAX`] levels) into `records`.
fn walk_tree(root: &str, records: &mut Records, deadline: Instant) -> Result<(), Option<String>> {
    // Directories still to read: absolute path, path relative to the root, depth (root 0).
    let mut todo: Vec<(PathBuf, Vec<u8>, usize)> = vec![(PathBuf::from(root), Vec::new(), 0)];
    while let Some((dir, rel, depth)) = todo.pop() {
        if Instant::now() > deadline {
            return Err(Some(format!(
                "listing {root} took more than {} s: copy a part of it",
                LIST_TIME_MAX.as_secs()
            )));
        }
        let cannot = |e: io::Error| Some(format!("cannot read {}: {e}", dir.display()));
        let mut entries = fs::read_dir(&dir).map_err(cannot)?.peekable();
        // A directory is listed only when it is not empty (as find's `-type d ! -empty`).
        if depth > 0 && entries.peek().is_some() {
            records.add(b'd', &rel)?;
        }
        // At the deepest level listed, what is inside is not.
        if depth == LIST_DEPTH_MAX {
            continue;
        }
        for entry in entries {
            let entry = entry.map_err(cannot)?;
            let name = entry.file_name();
            let mut child = rel.clone();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(name.as_bytes());
            // The entry's own type: a symlink is never followed.
            let kind = entry.file_type().map_err(cannot)?;
            if kind.is_symlink() {
                records.add(b'l', &child)?;
            } else if kind.is_file() {
                records.add(b'f', &child)?;
            } else if kind.is_dir() {
                todo.push((entry.path(), child, depth + 1));
            }
            // Sockets, FIFOs and devices are not listed (nor copied).
        }
    }
    records.flush()
}

/// A list's walker, on a blocking thread: the records, then `Done` (or why it failed).
fn list(root: &str, out: &mpsc::Sender<Chunk>) -> Option<()> {
    let deadline = Instant::now() + LIST_TIME_MAX;
    let mut records = Records {
        root,
        buf: Vec::with_capacity(STREAM_FRAME_MAX + 4096),
        bytes: 0,
        files: 0,
        out,
    };
    match walk_tree(root, &mut records, deadline) {
        Ok(()) => out.blocking_send(Chunk::Done(String::new())).ok(),
        Err(Some(why)) => out.blocking_send(Chunk::Failed(why)).ok(),
        Err(None) => None,
    }
}

impl Streams {
    /// Runs a `FileList` stream to its end (see the module docs).
    pub(crate) async fn run_list(
        self: &Arc<Self>,
        tag: Tag,
        path: String,
        credit: Arc<Credit>,
        mut input: mpsc::UnboundedReceiver<Input>,
        mut stop: watch::Receiver<Option<Stop>>,
    ) -> Ended {
        let p = path.clone();
        let checked = tokio::select! {
            r = blocking(move || check_root(&p)) => r,
            _ = stop.changed() => return stopped(&stop),
        };
        if let Err(e) = checked {
            return Ended::failed(e);
        }
        let Tag {
            stream, generation, ..
        } = tag;
        // Started (the stream takes no input; the grant says it began, as for a get).
        self.push(
            generation,
            [AgentFrame::StreamCredit {
                stream,
                bytes: STREAM_WINDOW_BULK,
            }],
        );
        let (tx, mut chunks) = mpsc::channel(READ_AHEAD);
        // Ends by itself once `chunks` is dropped (its next send fails).
        tokio::task::spawn_blocking(move || list(&path, &tx));
        match self
            .send_chunks(
                tag,
                &credit,
                &mut chunks,
                &mut input,
                &mut stop,
                "a file list",
            )
            .await
        {
            Ok(_) => Ended::exited(0),
            Err(ended) => ended,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(root: &std::path::Path) -> Result<Vec<String>, String> {
        let (tx, mut rx) = mpsc::channel(1024);
        let root = root.to_str().expect("utf-8").to_owned();
        list(&root, &tx).expect("sent");
        drop(tx);
        let mut out = Vec::new();
        while let Some(c) = rx.blocking_recv() {
            match c {
                Chunk::Data(b) => out.extend(b),
                Chunk::Done(_) => break,
                Chunk::Failed(e) => return Err(e),
            }
        }
        let mut records: Vec<String> = out
            .split(|b| *b == 0)
            .filter(|r| !r.is_empty())
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect();
        records.sort();
        Ok(records)
    }

    #[test]
    fn a_tree_is_listed_as_find_would_without_following_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("sub/deeper")).unwrap();
        std::fs::create_dir(d.path().join("empty")).unwrap();
        std::fs::write(d.path().join("a"), b"a").unwrap();
        std::fs::write(d.path().join("sub/deeper/c"), b"").unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("sub/out")).unwrap();
        assert_eq!(
            listing(d.path()).unwrap(),
            ["dsub", "dsub/deeper", "fa", "fsub/deeper/c", "lsub/out"]
        );
        // The top may be a symlink to a directory (find -H).
        let link = outside.path().join("link");
        std::os::unix::fs::symlink(d.path(), &link).unwrap();
        assert!(listing(&link).unwrap().contains(&"fa".to_owned()));
    }

    #[test]
    fn a_tree_deeper_than_listed_shows_its_last_directory_and_stops() {
        let d = tempfile::tempdir().unwrap();
        let mut p = d.path().to_owned();
        for _ in 0..LIST_DEPTH_MAX + 2 {
            p.push("d");
        }
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("f"), b"x").unwrap();
        let l = listing(d.path()).unwrap();
        let deepest = l.iter().map(|r| r.split('/').count()).max();
        assert_eq!(deepest, Some(LIST_DEPTH_MAX));
        assert!(l.iter().all(|r| r.starts_with('d')), "{l:?}");
    }

    #[test]
    fn a_missing_path_or_a_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let f = d.path().join("f");
        let f = f.to_str().unwrap();
        assert_eq!(check_root(f), Err(format!("{f} is not a directory")));
        let nope = d.path().join("nope");
        let nope = nope.to_str().unwrap();
        assert_eq!(
            check_root(nope),
            Err(format!("no directory {nope} on the node"))
        );
    }
}
