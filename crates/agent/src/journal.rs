//! The durable record of invocations in the state directory, which makes "never run twice" and
//! "nothing lost" hold across agent crashes and restarts.
//!
//! ```text
//! STATE_DIR/completed.log          ids whose result the server acknowledged (the last 10,000)
//! STATE_DIR/runs/<id>/request.json the accepted RunRequest (data synced on acceptance; its entry
//!                                  and the run directory's are synced with the start marker)
//!                     started.json start marker, fixed size: written and synced (with both
//!                                  directories) before spawn without a pid, then the pid filled
//!                                  in by one in-place write
//!                     result.json  the ExecResult (fsynced before Finished is sent)
//!                     stdout.<offset:020>, stdout.acked, stderr.*   the output spool (see stream.rs)
//!                     work/        the command's own directory: script.sh, default cwd
//! ```
//!
//! A `Run` is executed only if its id has no run directory and is not in `completed.log`.
//!
//! The JSON files carry their layout's version, `"format_version": JOURNAL_FORMAT`; a file without
//! it is version 1 (written before the version was recorded). A file of a newer version than this
//! agent knows stops the agent at start-up ([`NewerFormat`]) instead of being misread.

use fleetrun_proto::CommandId;
use fleetrun_proto::channel::{ExecResult, RunRequest};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The accepted request.
pub const REQUEST_FILE: &str = "request.json";
/// The start marker.
pub const STARTED_FILE: &str = "started.json";
/// The result.
pub const RESULT_FILE: &str = "result.json";
/// Ids of invocations whose result the server acknowledged.
pub const COMPLETED_LOG: &str = "completed.log";
/// How many acknowledged ids are remembered.
pub const COMPLETED_KEEP: usize = 10_000;
/// Version of the layout of the run directory's JSON files (request, start marker, result),
/// written into each as `format_version`. Bumped when a newer agent's files would be misread by
/// this one; a file without the member is version 1.
pub const JOURNAL_FORMAT: u32 = 1;

/// A journal file written by a newer agent, in a layout this one does not know.
#[derive(Debug, thiserror::Error)]
#[error(
    "{} has journal format version {found}, newer than the version {JOURNAL_FORMAT} this agent reads: \
     it was written by a newer fleetrun-agent; run that version (or a newer one) with this state directory",
    path.display()
)]
pub struct NewerFormat {
    /// The file.
    pub path: PathBuf,
    /// Its `format_version`.
    pub found: u32,
}

/// Why a journal file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// It could not be read, or it is not the JSON it should be (`InvalidData`: a torn write).
    #[error(transparent)]
    Io(#[from] io::Error),
    /// It was written by a newer agent.
    #[error(transparent)]
    NewerFormat(#[from] NewerFormat),
}

/// A journal file's contents with its format version first.
#[derive(Serialize)]
struct Versioned<'a, T> {
    format_version: u32,
    #[serde(flatten)]
    body: &'a T,
}

/// Only the format version of a journal file (every other member ignored).
#[derive(Deserialize)]
struct FormatProbe {
    format_version: Option<u32>,
}

/// `value` as a journal file's JSON, with the format version.
fn to_json(value: &impl Serialize) -> io::Result<Vec<u8>> {
    let versioned = Versioned {
        format_version: JOURNAL_FORMAT,
        body: value,
    };
    serde_json::to_vec_pretty(&versioned).map_err(io::Error::other)
}

/// Parses a journal file: its format version first (missing: 1), so a newer layout is refused
/// before it could be misread.
fn from_json<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, ReadError> {
    let invalid = |e| io::Error::new(io::ErrorKind::InvalidData, e);
    let probe: FormatProbe = serde_json::from_slice(bytes).map_err(invalid)?;
    let found = probe.format_version.unwrap_or(1);
    if found > JOURNAL_FORMAT {
        let path = path.to_owned();
        return Err(NewerFormat { path, found }.into());
    }
    Ok(serde_json::from_slice(bytes).map_err(invalid)?)
}

/// The start marker: `pid` is `None` between "about to spawn" and "spawned".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRecord {
    /// The main process (it leads its own process group: `pgid == pid`).
    pub pid: Option<i32>,
    /// The process group.
    pub pgid: Option<i32>,
    /// Start time, epoch milliseconds.
    pub started_at_ms: i64,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks since boot), to tell the process from a later
    /// one that reuses its pid.
    pub proc_start_time: Option<u64>,
}

/// Writes `value` as `dir/name` atomically and durably: a synced temporary file renamed into
/// place, then the directory synced.
pub fn write_json(dir: &Path, name: &str, value: &impl Serialize) -> io::Result<()> {
    let json = to_json(value)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&json)?;
    f.sync_data()?;
    drop(f);
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Reads the journal file `path`; `None` if it does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, ReadError> {
    match fs::read(path) {
        Ok(bytes) => from_json(path, &bytes).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Makes a directory's entries durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Accepts `req`: creates its run directory and writes the request into it (data synced; the
/// directory entries are synced by [`mark_spawning`], before anything runs). Fails with
/// `AlreadyExists` if the directory exists (the invocation was accepted before).
pub fn accept(runs_dir: &Path, req: &RunRequest) -> io::Result<PathBuf> {
    let run_dir = runs_dir.join(req.command_id.as_str());
    match fs::DirBuilder::new().mode(0o700).create(&run_dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(runs_dir)?;
            fs::DirBuilder::new().mode(0o700).create(&run_dir)?;
        }
        r => r?,
    }
    let json = to_json(req)?;
    // The directory is new and nobody else writes in it: no temporary file is needed. A torn
    // request (power cut before the marker's syncs) has no marker, so it never ran: `scan`
    // drops it and the server sends the `Run` again.
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(run_dir.join(REQUEST_FILE))?;
    f.write_all(&json)?;
    f.sync_data()?;
    Ok(run_dir)
}

/// Size of the start marker file: the record padded with spaces, so the pid is filled in later by
/// one in-place write of the whole file (no temporary file, no rename, no new inode).
const MARKER_LEN: usize = 256;

fn marker_bytes(record: &StartRecord) -> io::Result<Vec<u8>> {
    let mut json = to_json(record)?;
    if json.len() >= MARKER_LEN {
        return Err(io::Error::other("start marker too long"));
    }
    json.resize(MARKER_LEN - 1, b' ');
    json.push(b'\n');
    Ok(json)
}

/// Writes the start marker before the spawn and makes it, the request and the run directory
/// durable: the marker's data, the run directory (the entries of request and marker) and the
/// directory of runs (the run directory's entry) are synced.
pub fn mark_spawning(run_dir: &Path, record: &StartRecord) -> io::Result<()> {
    let bytes = marker_bytes(record)?;
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(run_dir.join(STARTED_FILE))?;
    f.write_all_at(&bytes, 0)?;
    f.sync_data()?;
    drop(f);
    sync_dir(run_dir)?;
    match run_dir.parent() {
        Some(runs_dir) => sync_dir(runs_dir),
        None => Ok(()),
    }
}

/// Fills the pid into the start marker: one in-place write of the same length, not synced. The
/// pid matters after a crash of the agent, when the page cache survives; after a power cut the
/// process is gone anyway, and a torn marker still counts as started.
pub fn record_pid(run_dir: &Path, record: &StartRecord) -> io::Result<()> {
    let bytes = marker_bytes(record)?;
    let f = OpenOptions::new()
        .write(true)
        .open(run_dir.join(STARTED_FILE))?;
    f.write_all_at(&bytes, 0)
}

/// Field 22 of `/proc/<pid>/stat`: the process's start time in clock ticks after boot.
pub fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after `(comm)` start with field 3 (state): field 22 is the 20th of them.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// What an earlier agent process left in one run directory.
#[derive(Debug)]
pub enum Leftover {
    /// The invocation has a result: resend its output and result.
    Finished {
        /// Its directory.
        run_dir: PathBuf,
        /// Its result.
        result: ExecResult,
    },
    /// It was (or may have been) running when the agent stopped.
    Interrupted {
        /// Its directory.
        run_dir: PathBuf,
        /// Its start marker.
        started: StartRecord,
    },
    /// Accepted, never started: run it now.
    NotStarted {
        /// Its directory.
        run_dir: PathBuf,
        /// Its request.
        request: RunRequest,
    },
}

/// Reads every run directory under `runs_dir`. Directories of ids in `completed` (acknowledged,
/// removal interrupted) and ones without a request (acceptance interrupted) are removed. A file of
/// a newer journal format fails the whole scan, before anything is acted on.
pub fn scan(
    runs_dir: &Path,
    completed: &Completed,
) -> Result<Vec<(CommandId, Leftover)>, NewerFormat> {
    let mut found = Vec::new();
    let entries = match fs::read_dir(runs_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(e) => {
            tracing::error!(dir = %runs_dir.display(), error = %e, "cannot read the run directories");
            return Ok(found);
        }
    };
    for entry in entries.flatten() {
        let run_dir = entry.path();
        let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<CommandId>().ok())
        else {
            tracing::warn!(dir = %run_dir.display(), "not a run directory: ignored");
            continue;
        };
        if completed.contains(&id) {
            remove_run_dir(&run_dir);
            continue;
        }
        match read_leftover(&run_dir) {
            Ok(Some(l)) => found.push((id, l)),
            Ok(None) => {
                tracing::info!(command_id = %id, "removing a run directory without a request");
                remove_run_dir(&run_dir);
            }
            Err(ReadError::NewerFormat(e)) => return Err(e),
            Err(ReadError::Io(e)) => {
                tracing::error!(command_id = %id, error = %e, "unreadable run directory: left alone");
            }
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

fn read_leftover(run_dir: &Path) -> Result<Option<Leftover>, ReadError> {
    let run_dir = run_dir.to_owned();
    if let Some(result) = read_json(&run_dir.join(RESULT_FILE))? {
        return Ok(Some(Leftover::Finished { run_dir, result }));
    }
    // An unreadable marker (torn write) still means the command may have started.
    match read_json::<StartRecord>(&run_dir.join(STARTED_FILE)) {
        Ok(Some(started)) => return Ok(Some(Leftover::Interrupted { run_dir, started })),
        Ok(None) => {}
        Err(ReadError::NewerFormat(e)) => return Err(e.into()),
        Err(ReadError::Io(_)) => {
            let started = StartRecord::default();
            return Ok(Some(Leftover::Interrupted { run_dir, started }));
        }
    }
    // No marker: it never ran. A torn request (acceptance interrupted) is dropped like a
    // missing one; the server sends the `Run` again.
    match read_json(&run_dir.join(REQUEST_FILE)) {
        Ok(request) => Ok(request.map(|request| Leftover::NotStarted { run_dir, request })),
        Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::InvalidData => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes a run directory; a missing one is fine.
pub fn remove_run_dir(dir: &Path) {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove run directory");
        }
        _ => {}
    }
}

/// The ids whose result the server acknowledged: a late duplicate `Run` for one of them is
/// ignored. Bounded to the last [`COMPLETED_KEEP`]; the file is compacted when it has twice that.
#[derive(Debug)]
pub struct Completed {
    path: PathBuf,
    order: VecDeque<CommandId>,
    set: HashSet<CommandId>,
    lines: usize,
}

impl Completed {
    /// Loads `STATE_DIR/completed.log` (missing: empty; unparsable lines are skipped).
    pub fn load(state_dir: &Path) -> io::Result<Self> {
        let path = state_dir.join(COMPLETED_LOG);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let mut c = Completed {
            path,
            order: VecDeque::new(),
            set: HashSet::new(),
            lines: 0,
        };
        for line in text.lines() {
            c.lines += 1;
            if let Ok(id) = line.trim().parse::<CommandId>() {
                c.remember(id);
            }
        }
        Ok(c)
    }

    fn remember(&mut self, id: CommandId) {
        if self.set.insert(id.clone()) {
            self.order.push_back(id);
        }
        while self.order.len() > COMPLETED_KEEP {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    /// Whether `id`'s result was acknowledged.
    pub fn contains(&self, id: &CommandId) -> bool {
        self.set.contains(id)
    }

    /// Records `id` durably (appended and synced; compacted now and then).
    pub fn add(&mut self, id: &CommandId) -> io::Result<()> {
        self.remember(id.clone());
        if self.lines >= 2 * COMPLETED_KEEP {
            let mut text = String::new();
            for id in &self.order {
                text.push_str(id.as_str());
                text.push('\n');
            }
            let tmp = self.path.with_extension("log.tmp");
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            self.lines = self.order.len();
            return self.path.parent().map_or(Ok(()), sync_dir);
        }
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)?;
        f.write_all(format!("{}\n", id.as_str()).as_bytes())?;
        f.sync_data()?;
        self.lines += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completed_ids_survive_reloads_and_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Completed::load(dir.path()).unwrap();
        let ids: Vec<_> = (0..COMPLETED_KEEP as u128 + 5)
            .map(CommandId::from_random)
            .collect();
        for id in &ids[..3] {
            c.add(id).unwrap();
        }
        let c2 = Completed::load(dir.path()).unwrap();
        assert!(c2.contains(&ids[0]) && c2.contains(&ids[2]));
        assert!(!c2.contains(&ids[3]));
        for id in &ids[3..] {
            c.remember(id.clone());
        }
        assert!(!c.contains(&ids[0]), "the oldest are forgotten");
        assert!(c.contains(&ids[ids.len() - 1]));
    }

    fn request(id: &CommandId) -> RunRequest {
        RunRequest {
            command_id: id.clone(),
            script: "true".into(),
            working_dir: String::new(),
            execution_timeout_secs: 5,
            run_as: None,
            memory_limit_bytes: None,
            cpu_limit_percent: Some(50),
        }
    }

    fn format_of(path: &Path) -> Option<u64> {
        let v: serde_json::Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
        v["format_version"].as_u64()
    }

    #[test]
    fn new_files_carry_the_format_version_and_files_without_it_read_as_version_1() {
        let state = tempfile::tempdir().unwrap();
        let runs = state.path().join("runs");
        let completed = Completed::load(state.path()).unwrap();
        // New files: request, start marker (still its fixed size), result.
        let (a, b) = (CommandId::from_random(1), CommandId::from_random(2));
        let dir_a = accept(&runs, &request(&a)).unwrap();
        let marker = StartRecord {
            pid: Some(i32::MAX),
            pgid: Some(i32::MAX),
            started_at_ms: i64::MAX,
            proc_start_time: Some(u64::MAX),
        };
        mark_spawning(&dir_a, &marker).unwrap();
        let marker_file = dir_a.join(STARTED_FILE);
        assert_eq!(fs::metadata(&marker_file).unwrap().len(), MARKER_LEN as u64);
        for file in [REQUEST_FILE, STARTED_FILE] {
            assert_eq!(format_of(&dir_a.join(file)), Some(1), "{file}");
        }
        let result = ExecResult {
            outcome: fleetrun_proto::channel::Outcome::Exited,
            exit_code: 0,
            signal: None,
            started_at_ms: 1,
            finished_at_ms: 2,
            cpu_user_ms: 3,
            cpu_system_ms: 4,
            max_rss_kb: 5,
            stdout_bytes: 6,
            stderr_bytes: 7,
            message: String::new(),
            limits_applied: "none".into(),
        };
        write_json(&dir_a, RESULT_FILE, &result).unwrap();
        assert_eq!(format_of(&dir_a.join(RESULT_FILE)), Some(1));
        // A file from before the version was recorded: the bare request.
        let dir_b = runs.join(b.as_str());
        fs::create_dir_all(&dir_b).unwrap();
        let old = serde_json::to_vec_pretty(&request(&b)).unwrap();
        fs::write(dir_b.join(REQUEST_FILE), old).unwrap();

        let found = scan(&runs, &completed).unwrap();
        assert_eq!(found.len(), 2);
        match &found[0] {
            (id, Leftover::Finished { result: r, .. }) => assert_eq!((id, r), (&a, &result)),
            other => panic!("{other:?}"),
        }
        match &found[1] {
            (id, Leftover::NotStarted { request: r, .. }) => {
                assert_eq!((id, r), (&b, &request(&b)))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_newer_journal_format_is_refused_before_anything_is_acted_on() {
        let state = tempfile::tempdir().unwrap();
        let runs = state.path().join("runs");
        let completed = Completed::load(state.path()).unwrap();
        let (a, b) = (CommandId::from_random(1), CommandId::from_random(2));
        accept(&runs, &request(&a)).unwrap();
        // A newer agent's marker, in a layout this one does not know.
        let dir_b = accept(&runs, &request(&b)).unwrap();
        let newer = r#"{"format_version": 2, "spawned": {"pid": 7}}"#;
        fs::write(dir_b.join(STARTED_FILE), newer).unwrap();
        let e = scan(&runs, &completed).unwrap_err();
        assert_eq!((e.path.clone(), e.found), (dir_b.join(STARTED_FILE), 2));
        let text = e.to_string();
        assert!(
            text.contains("journal format version 2, newer than the version 1 this agent reads"),
            "{text}"
        );
        // Nothing was removed or rewritten.
        assert!(runs.join(a.as_str()).join(REQUEST_FILE).exists());
        assert_eq!(fs::read_to_string(dir_b.join(STARTED_FILE)).unwrap(), newer);
        // A torn marker is still read as "may have started", not as a newer format.
        fs::write(dir_b.join(STARTED_FILE), "{\"format_ver").unwrap();
        let found = scan(&runs, &completed).unwrap();
        assert!(
            matches!(found[1].1, Leftover::Interrupted { .. }),
            "{found:?}"
        );
    }

    #[test]
    fn proc_start_time_of_this_process() {
        let me = std::process::id() as i32;
        assert!(proc_start_time(me).is_some());
        assert_eq!(proc_start_time(me), proc_start_time(me));
    }
}
