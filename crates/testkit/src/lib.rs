//! The real servers fleetrun's tests need beside fleetrun itself, started by the tests on free
//! loopback ports in temp dirs: PostgreSQL ([`Postgres`]) and NATS ([`Nats`]). Nothing here is a
//! mock; what is missing on the machine is a clear failure naming how to get it, never a skip.
//!
//! Every server is a child that cannot outlive the test process: killed on drop, and also by the
//! kernel when the process dies without dropping it (`PR_SET_PDEATHSIG`, set from a thread that
//! lives as long as the process, since the signal follows the thread that forked, not the process).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod postgres;

pub use postgres::{Postgres, shared_postgres};

/// A free port below the kernel's ephemeral range, so that while a restarted server is down no
/// outgoing connection of another test takes it as a local port.
pub fn free_port() -> u16 {
    let (lo, _) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let lo = lo.clamp(12_000, 32_768);
    let span = u32::from(lo) - 10_000;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ (std::process::id() << 8);
    for _ in 0..200 {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let port = 10_000 + ((seed >> 8) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port found below {lo}");
}

/// The first of `names` found on `PATH` or in `extra_dirs`.
pub fn find_program(name: &str, extra_dirs: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra_dirs.iter().cloned())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Waits until `ready` says so, or panics naming `what` after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut ready: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some(v) = ready() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// Whether something accepts TCP connections on the loopback `port`.
pub fn listening(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// Spawns `cmd` from a thread that lives as long as the process, with `PR_SET_PDEATHSIG` set to
/// SIGKILL in the child, so the child dies with the test process even if nothing drops it.
fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: std::sync::OnceLock<Spawner> = std::sync::OnceLock::new();
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    struct Spawner(std::sync::Mutex<mpsc::Sender<Job>>);
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("testkit-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the spawner thread");
        Spawner(std::sync::Mutex::new(tx))
    });
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.stdin(Stdio::null());
    let (reply, answer) = mpsc::channel();
    spawner
        .0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

/// A NATS server (`nats-server`, core only, no JetStream) on a free loopback port, killed on drop.
/// [`Nats::stop`] and [`Nats::start_again`] take it down and back on the same port, as a broker
/// blip does.
pub struct Nats {
    port: u16,
    program: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Nats {
    /// Starts one; panics naming how to install `nats-server` when it is missing.
    pub fn start() -> Nats {
        let program = find_program("nats-server", &[PathBuf::from("/usr/sbin")]).unwrap_or_else(|| {
            panic!(
                "the tests need nats-server: install it with `apt-get install nats-server` (Debian) \
                 or from https://github.com/nats-io/nats-server/releases, and put it on PATH"
            )
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nats = Nats {
            port: free_port(),
            program,
            child: None,
            log: dir.path().join("nats.log"),
            _dir: dir,
        };
        nats.start_again();
        nats
    }

    /// Its client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops it (SIGKILL: a crash, not a goodbye) and waits for the port to close.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let port = self.port;
        wait_until("nats-server to stop", Duration::from_secs(10), || {
            (!listening(port)).then_some(())
        });
    }

    /// Starts it (again) on its port and waits until it accepts connections.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "nats-server is running already");
        let log = std::fs::File::create(&self.log).expect("nats log");
        let mut cmd = Command::new(&self.program);
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(log);
        let child = spawn_tied(cmd).expect("cannot start nats-server");
        self.child = Some(child);
        let port = self.port;
        wait_until("nats-server to listen", Duration::from_secs(20), || {
            listening(port).then_some(())
        });
    }

    /// What it logged.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Makes `dir` traversable by others (a server run as `nobody` must reach its data dir inside
/// a temp dir made 0700).
fn open_up(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
}
