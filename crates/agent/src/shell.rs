//! What a `Shell` stream runs (protocol version 4): its user's login shell on a new PTY, or
//! `SHELL -c COMMAND` on it. The child leads a new session with the PTY as its controlling
//! terminal (pty-process does `setsid` and `TIOCSCTTY` in the child), so the keys typed there
//! (Ctrl-C, Ctrl-Z) signal its foreground job, never the agent. `streams.rs` moves the bytes and
//! hangs it up; this module only starts it.

use crate::user::{self, RunAs};
use nix::unistd::{Uid, User};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

/// `PATH` for a shell of root (its profile may change it): the agent's own is not handed on.
const PATH_ROOT: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// `PATH` for a shell of another user.
const PATH_USER: &str = "/usr/local/bin:/usr/bin:/bin";
/// The shell when the user's is unknown or not a file.
const FALLBACK_SHELL: &str = "/bin/sh";

/// What a `Shell` stream asks for.
pub(crate) struct ShellSpec {
    pub command: Option<String>,
    pub run_as: Option<String>,
    pub term: String,
    pub rows: u16,
    pub cols: u16,
    pub env: Vec<(String, String)>,
}

/// Who the shell runs as.
struct Account {
    name: String,
    home: PathBuf,
    shell: PathBuf,
    uid: u32,
    gid: u32,
    /// Set when the agent is to switch to it in the child.
    run_as: Option<RunAs>,
}

impl Account {
    /// The run-as user, or the agent's own (from passwd, else `HOME` and `/bin/sh`).
    fn resolve(run_as: Option<&str>) -> Result<Account, String> {
        if let Some(spec) = run_as {
            let u = user::resolve(spec)?;
            return Ok(Account {
                name: u.name.clone(),
                home: u.home.clone(),
                shell: u.shell.clone(),
                uid: u.uid,
                gid: u.gid,
                run_as: Some(u),
            });
        }
        let uid = Uid::current();
        let gid = nix::unistd::Gid::current().as_raw();
        Ok(match User::from_uid(uid) {
            Ok(Some(u)) => Account {
                name: u.name,
                home: u.dir,
                shell: u.shell,
                uid: uid.as_raw(),
                gid,
                run_as: None,
            },
            _ => Account {
                name: std::env::var("USER").unwrap_or_else(|_| uid.to_string()),
                home: std::env::var_os("HOME").map(Into::into).unwrap_or_default(),
                shell: PathBuf::new(),
                uid: uid.as_raw(),
                gid,
                run_as: None,
            },
        })
    }

    /// The login shell from passwd when it is a file, else `/bin/sh`.
    fn shell(&self) -> PathBuf {
        if self.shell.is_absolute() && self.shell.is_file() {
            self.shell.clone()
        } else {
            PathBuf::from(FALLBACK_SHELL)
        }
    }
}

/// Starts the shell on a new PTY of `rows` x `cols`: its pid (the leader of its session and
/// process group, to be reaped by the caller) and the PTY's master. The error is the stream's
/// `StreamClose` message.
pub(crate) fn spawn(spec: ShellSpec) -> Result<(i32, pty_process::Pty), String> {
    let account = Account::resolve(spec.run_as.as_deref())?;
    let (pty, pts) = pty_process::open().map_err(|e| format!("cannot open a PTY: {e}"))?;
    pty.resize(pty_process::Size::new(spec.rows, spec.cols))
        .map_err(|e| format!("cannot size the PTY: {e}"))?;
    // A blocking Command spawns a std child (reaped by wait4, never by tokio's reaper), so the
    // slave moves over as a plain descriptor; the async half's copy is closed at once.
    let slave: OwnedFd = pts
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("cannot open a PTY: {e}"))?;
    drop(pts);
    let pts = slave;
    if account.run_as.is_some() {
        // The terminal is the user's, as login(1) and sshd leave it (tty(1), mesg, write).
        std::os::unix::fs::fchown(&pts, Some(account.uid), Some(account.gid))
            .map_err(|e| format!("cannot give the PTY to {}: {e}", account.name))?;
    }
    let shell = account.shell();
    let home = Some(account.home.as_path())
        .filter(|h| h.is_dir())
        .unwrap_or(Path::new("/"));
    let path = if account.uid == 0 {
        PATH_ROOT
    } else {
        PATH_USER
    };
    let mut cmd = pty_process::blocking::Command::new(&shell);
    cmd = match &spec.command {
        Some(command) => cmd.arg("-c").arg(command),
        // A login shell, as login(1) starts it: argv[0] is `-` and its name.
        None => {
            let name = shell
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "sh".into());
            cmd.arg0(format!("-{name}"))
        }
    };
    cmd = cmd
        .env_clear()
        .env("TERM", &spec.term)
        .env("HOME", &account.home)
        .env("USER", &account.name)
        .env("LOGNAME", &account.name)
        .env("SHELL", &shell)
        .env("PATH", path)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(home);
    // SAFETY: signal(2) is async-signal-safe. A disposition the agent inherited (`nohup` ignores
    // SIGHUP) would pass to the shell and make its jobs outlive a hang-up: the shell starts with
    // the defaults, as a login does.
    cmd = unsafe {
        cmd.pre_exec(|| {
            use nix::sys::signal::{SigHandler, Signal, signal};
            for s in [
                Signal::SIGHUP,
                Signal::SIGINT,
                Signal::SIGQUIT,
                Signal::SIGTERM,
            ] {
                signal(s, SigHandler::SigDfl).map_err(std::io::Error::from)?;
            }
            Ok(())
        })
    };
    if let Some(u) = account.run_as {
        // SAFETY: `enter` makes only async-signal-safe system calls on data prepared before
        // the fork (setgroups, setgid, setuid); it runs after pty-process's setsid and TIOCSCTTY.
        cmd = unsafe { cmd.pre_exec(move || u.enter()) };
    }
    // SAFETY: the descriptor is the PTY's slave, just opened by `pty_process::open`.
    let pts = unsafe { pty_process::blocking::Pts::from_fd(pts) };
    // The parent's copy of the slave is closed when `spawn` returns: the master then reads EIO
    // once the last process holding the terminal closes it.
    let child = cmd
        .spawn(pts)
        .map_err(|e| format!("cannot start {}: {e}", shell.display()))?;
    let pid = i32::try_from(child.id()).map_err(|_| "the process id does not fit a pid")?;
    // Reaped by the caller's wait4 (the std Child is never waited on).
    drop(child);
    Ok((pid, pty))
}
