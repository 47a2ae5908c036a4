//! Running a command as another user (`RunRequest.run_as`): the user is looked up and its groups
//! listed in the agent, and the child drops to it between `fork` and `exec`.

use nix::unistd::{Gid, Uid, User};
use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

/// A resolved run-as user.
#[derive(Clone, Debug)]
pub struct RunAs {
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
    /// Every group of the user (as `initgroups` would set them).
    groups: Vec<libc::gid_t>,
    /// The user name.
    pub name: String,
    /// The home directory.
    pub home: PathBuf,
    /// The login shell (from passwd; may be empty).
    pub shell: PathBuf,
}

/// Resolves `spec` (a user name or a numeric uid). The error is the result's message.
pub fn resolve(spec: &str) -> Result<RunAs, String> {
    let euid = Uid::effective();
    if !euid.is_root() {
        return Err(format!(
            "run-as needs the agent to run as root (it runs as uid {euid})"
        ));
    }
    let found = match spec.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(spec),
    };
    let user = match found {
        Ok(Some(u)) => u,
        Ok(None) => return Err(format!("no such user {spec}")),
        Err(e) => return Err(format!("cannot look up user {spec}: {e}")),
    };
    let groups = CString::new(user.name.as_bytes())
        .ok()
        .and_then(|name| nix::unistd::getgrouplist(&name, user.gid).ok())
        .unwrap_or_else(|| vec![user.gid]);
    Ok(RunAs {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        groups: groups.into_iter().map(Gid::as_raw).collect(),
        name: user.name,
        home: user.dir,
        shell: user.shell,
    })
}

impl RunAs {
    /// Called in the child between `fork` and `exec`: groups, then gid, then uid (async-signal-safe
    /// system calls on data prepared before the fork).
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: the pointer and length describe `self.groups`.
        if unsafe { libc::setgroups(self.groups.len(), self.groups.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: plain system calls.
        if unsafe { libc::setgid(self.gid) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        if unsafe { libc::setuid(self.uid) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Gives the user what it needs of the run directory: `work` (its cwd and script) becomes its
    /// own, and the directories above it down from the state directory become traversable
    /// (`--x` for others: nothing in them can be listed, their files stay 0600).
    pub fn grant(&self, run_dir: &Path, work: &Path, script: &Path) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let mut dir = Some(run_dir);
        for _ in 0..3 {
            let Some(d) = dir else { break };
            let mode = std::fs::metadata(d)?.permissions().mode();
            if mode & 0o011 != 0o011 {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o011))?;
            }
            dir = d.parent();
        }
        for p in [work, script] {
            std::os::unix::fs::chown(p, Some(self.uid), Some(self.gid))?;
        }
        Ok(())
    }
}
