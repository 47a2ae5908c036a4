//! A PostgreSQL cluster of the tests' own: `initdb` into a temp dir, then `postgres` on a free
//! loopback port (TCP only, trust auth for user `postgres`, no fsync: nothing outlives the
//! machine).
//! PostgreSQL refuses to run as root, so as root it runs as `nobody` (`setpriv`).

use super::{find_program, free_port, listening, open_up, spawn_tied, wait_until};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// What a machine without PostgreSQL's server programs is told.
const INSTALL: &str = "the tests need PostgreSQL's server programs (initdb, postgres, psql): \
    install them with `apt-get install postgresql` (Debian; they land in /usr/lib/postgresql/N/bin) \
    or put a PostgreSQL 13 or later on PATH";

/// The uid and gid the server runs as when the tests run as root.
const NOBODY: u32 = 65534;

/// A running cluster; stopped (fast shutdown) on drop.
pub struct Postgres {
    port: u16,
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    databases: AtomicU32,
    _dir: tempfile::TempDir,
}

/// One cluster for the whole test binary, started on first use, each test taking a fresh
/// database of it ([`Postgres::create_database`]). Never dropped: the kernel stops it with the
/// process.
pub fn shared_postgres() -> &'static Postgres {
    static SHARED: OnceLock<Postgres> = OnceLock::new();
    SHARED.get_or_init(Postgres::start)
}

/// The directory holding `initdb`, `postgres` and `psql`.
fn bin_dir() -> PathBuf {
    let mut dirs = vec![PathBuf::from("/usr/local/bin")];
    // Debian's, newest first.
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        versions.reverse();
        dirs.extend(versions);
    }
    let initdb = find_program("initdb", &dirs).unwrap_or_else(|| panic!("{INSTALL}"));
    // Through a link (/usr/local/bin/initdb -> .../15/bin/initdb) to where its siblings are.
    let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
    let bin = real.parent().map(Path::to_path_buf).unwrap_or_default();
    for sibling in ["postgres", "psql"] {
        assert!(
            bin.join(sibling).is_file(),
            "{INSTALL} ({} has no {sibling})",
            bin.display()
        );
    }
    bin
}

/// A temp dir for a cluster, named after this process: a cluster that is never dropped (the
/// shared one) leaves its dir behind, so the dirs of processes that are gone are removed first.
fn cluster_dir() -> tempfile::TempDir {
    let parent = std::env::temp_dir().join("fleetrun-testkit");
    std::fs::create_dir_all(&parent).expect("testkit temp dir");
    open_up(&parent);
    if let Ok(entries) = std::fs::read_dir(&parent) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix("pg-").and_then(|r| r.split('-').next());
            if let Some(pid) = pid
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    tempfile::Builder::new()
        .prefix(&format!("pg-{}-", std::process::id()))
        .tempdir_in(&parent)
        .expect("temp dir")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `program` run as the server's user: itself, or `nobody` when we are root.
fn as_server_user(program: &Path) -> Command {
    if !is_root() {
        return Command::new(program);
    }
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid",
        &NOBODY.to_string(),
        "--regid",
        &NOBODY.to_string(),
        "--clear-groups",
        // Set again after the uid changes (which clears it).
        "--pdeathsig",
        "INT",
        "--",
    ])
    .arg(program);
    cmd
}

impl Postgres {
    /// Makes and starts a cluster; panics naming what is missing.
    pub fn start() -> Postgres {
        let bin = bin_dir();
        let dir = cluster_dir();
        open_up(dir.path());
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("data dir");
        if is_root() {
            let id = Some(nix::unistd::Uid::from_raw(NOBODY));
            let gid = Some(nix::unistd::Gid::from_raw(NOBODY));
            nix::unistd::chown(&data, id, gid).expect("chown the data dir to nobody");
        }
        let out = as_server_user(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .unwrap_or_else(|e| panic!("cannot run initdb: {e}; {INSTALL}"));
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Postgres {
            port: free_port(),
            bin,
            data,
            log: dir.path().join("postgres.log"),
            child: None,
            databases: AtomicU32::new(0),
            _dir: dir,
        };
        pg.start_again();
        pg
    }

    /// Starts the server (again) on its port, and waits until it answers queries.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "postgres is running already");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("postgres log");
        let mut cmd = as_server_user(&self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "unix_socket_directories="])
            // No fsync (the OS keeps what a killed server wrote), but commits wait for the WAL
            // write, so a crash of the server loses nothing it acknowledged.
            .args(["-c", "fsync=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=300"])
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(spawn_tied(cmd).expect("cannot start postgres"));
        let (port, log) = (self.port, self.log.clone());
        wait_until(
            "postgres to accept queries",
            Duration::from_secs(60),
            || {
                if let Some(child) = &mut self.child
                    && let Ok(Some(status)) = child.try_wait()
                {
                    panic!(
                        "postgres exited ({status}): {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                (listening(port) && self.try_psql("postgres", "SELECT 1").is_ok()).then_some(())
            },
        );
    }

    /// Stops the server: `fast` is a fast shutdown (SIGINT), else a crash (SIGKILL). Waits for
    /// its port to close.
    pub fn stop(&mut self, fast: bool) {
        if let Some(mut child) = self.child.take() {
            let signal = if fast {
                nix::sys::signal::Signal::SIGINT
            } else {
                nix::sys::signal::Signal::SIGKILL
            };
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
            }
            let _ = child.wait();
        }
        let port = self.port;
        wait_until("postgres to stop", Duration::from_secs(30), || {
            (!listening(port)).then_some(())
        });
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of `database`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A new, empty database of its own for one test: its URL.
    pub fn create_database(&self) -> String {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("t{}_{n}", std::process::id());
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// Runs `sql` in `database` with psql; its output (unaligned, tuples only). Panics on failure.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        self.try_psql(database, sql)
            .unwrap_or_else(|e| panic!("psql {sql:?} failed: {e}"))
    }

    fn try_psql(&self, database: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args([
                "-d",
                database,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// What the server logged.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // No waiting on the port here: a panic in a drop while unwinding would abort.
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let pid = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            }
            let _ = child.wait();
        }
    }
}
