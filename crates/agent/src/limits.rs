//! Resource limits of one invocation (`memory_limit_bytes`, `cpu_limit_percent`): a cgroup v2
//! group when the unified hierarchy has the controllers, else cgroup v1 groups, else rlimits
//! (memory only: RLIMIT_AS; a CPU share cannot be an rlimit).
//!
//! Groups are `fleetrun/<command_id>` under each hierarchy, created and filled in the parent; the
//! child joins them itself before `exec` (it writes `0`, meaning itself, to `cgroup.procs`), so no
//! instruction of the command runs outside its limits. After the command, leftovers in the groups
//! are killed and the groups removed.

use fleetrun_proto::CommandId;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The CPU period used for quotas, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;
const MIB: u64 = 1024 * 1024;

/// Where an out-of-memory kill is counted.
#[derive(Debug)]
enum OomCounter {
    /// `memory.events` (`oom_kill N`).
    V2(PathBuf),
    /// `memory.oom_control` (`oom_kill N`) and `memory.failcnt`.
    V1(PathBuf),
}

/// The limits prepared for one invocation.
#[derive(Debug, Default)]
pub struct Limits {
    /// `cgroup2`, `cgroup1`, `rlimit` or `none`.
    pub mechanism: &'static str,
    /// What could not be applied as asked, for the result's message.
    pub notes: Vec<String>,
    memory_limit: Option<u64>,
    /// `cgroup.procs` files the child writes itself into.
    procs: Vec<CString>,
    /// Groups created, removed at the end.
    dirs: Vec<PathBuf>,
    rlimit_as: Option<u64>,
    oom: Option<OomCounter>,
}

/// `N MiB` (or bytes when not a whole number of MiB).
pub fn describe_bytes(n: u64) -> String {
    if n.is_multiple_of(MIB) {
        format!("{} MiB", n / MIB)
    } else {
        format!("{n} bytes")
    }
}

impl Limits {
    /// Creates and configures the groups for `id` under [`CGROUP_ROOT`].
    pub fn prepare(id: &CommandId, memory: Option<u64>, cpu_percent: Option<u32>) -> Self {
        Self::prepare_in(Path::new(CGROUP_ROOT), id, memory, cpu_percent)
    }

    /// Like [`Self::prepare`] with another mount point (for tests).
    pub fn prepare_in(
        root: &Path,
        id: &CommandId,
        memory: Option<u64>,
        cpu_percent: Option<u32>,
    ) -> Self {
        let mut l = Limits {
            mechanism: "none",
            memory_limit: memory,
            ..Limits::default()
        };
        let cpu_percent = match cpu_percent {
            Some(0) => {
                l.notes
                    .push("cpu limit not applied: 0 percent is not a limit".into());
                None
            }
            c => c,
        };
        if memory.is_none() && cpu_percent.is_none() {
            return l;
        }
        match l.try_v2(root, id, memory, cpu_percent) {
            Ok(true) => return l,
            Ok(false) => {}
            Err(e) => {
                l.remove_dirs();
                l.notes.push(format!("cgroup v2 unusable ({e})"));
            }
        }
        let mem_v1 = memory.and_then(|bytes| {
            l.try_v1(root, "memory", id, |dir| {
                fs::write(dir.join("memory.limit_in_bytes"), bytes.to_string())?;
                // Swap counts too where the kernel accounts it (may be off: then RAM only).
                let memsw = dir.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    let _ = fs::write(memsw, bytes.to_string());
                }
                Ok(())
            })
        });
        let cpu_v1 = cpu_percent.and_then(|pct| {
            ["cpu", "cpu,cpuacct"].into_iter().find_map(|h| {
                l.try_v1(root, h, id, |dir| {
                    fs::write(dir.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                    fs::write(dir.join("cpu.cfs_quota_us"), quota_us(pct).to_string())
                })
            })
        });
        if let Some(dir) = &mem_v1 {
            l.oom = Some(OomCounter::V1(dir.clone()));
        }
        if mem_v1.is_some() || cpu_v1.is_some() {
            l.mechanism = "cgroup1";
        }
        if let Some(bytes) = memory
            && mem_v1.is_none()
        {
            l.rlimit_as = Some(bytes);
            l.notes.push(format!(
                "memory limit applied as an address-space rlimit of {}: no cgroup available",
                describe_bytes(bytes)
            ));
            if l.mechanism == "none" {
                l.mechanism = "rlimit";
            }
        }
        if cpu_percent.is_some() && cpu_v1.is_none() {
            l.notes
                .push("cpu limit not applied: no cgroup available".into());
        }
        l
    }

    /// cgroup v2: `Ok(false)` when the unified hierarchy lacks a needed controller.
    fn try_v2(
        &mut self,
        root: &Path,
        id: &CommandId,
        memory: Option<u64>,
        cpu_percent: Option<u32>,
    ) -> io::Result<bool> {
        let Ok(controllers) = fs::read_to_string(root.join("cgroup.controllers")) else {
            return Ok(false);
        };
        let have: Vec<&str> = controllers.split_whitespace().collect();
        let mut need = Vec::new();
        if memory.is_some() {
            need.push("memory");
        }
        if cpu_percent.is_some() {
            need.push("cpu");
        }
        if !need.iter().all(|c| have.contains(c)) {
            return Ok(false);
        }
        let enable: String = need.iter().map(|c| format!("+{c} ")).collect();
        let base = root.join("fleetrun");
        ensure_dir(&base)?;
        fs::write(root.join("cgroup.subtree_control"), enable.trim_end())?;
        fs::write(base.join("cgroup.subtree_control"), enable.trim_end())?;
        let dir = base.join(id.as_str());
        ensure_dir(&dir)?;
        self.dirs.push(dir.clone());
        if let Some(bytes) = memory {
            fs::write(dir.join("memory.max"), bytes.to_string())?;
            let _ = fs::write(dir.join("memory.swap.max"), "0");
            self.oom = Some(OomCounter::V2(dir.join("memory.events")));
        }
        if let Some(pct) = cpu_percent {
            fs::write(
                dir.join("cpu.max"),
                format!("{} {CPU_PERIOD_US}", quota_us(pct)),
            )?;
        }
        self.procs.push(cstring(&dir.join("cgroup.procs"))?);
        self.mechanism = "cgroup2";
        Ok(true)
    }

    /// One cgroup v1 hierarchy: the group's directory if it could be set up.
    fn try_v1(
        &mut self,
        root: &Path,
        hierarchy: &str,
        id: &CommandId,
        configure: impl FnOnce(&Path) -> io::Result<()>,
    ) -> Option<PathBuf> {
        let top = root.join(hierarchy);
        if !top.join("cgroup.procs").exists() {
            return None;
        }
        let dir = top.join("fleetrun").join(id.as_str());
        let r = ensure_dir(&dir).and_then(|()| {
            self.dirs.push(dir.clone());
            configure(&dir)?;
            self.procs.push(cstring(&dir.join("cgroup.procs"))?);
            Ok(())
        });
        match r {
            Ok(()) => Some(dir),
            Err(e) => {
                if self.dirs.last() == Some(&dir) {
                    self.dirs.pop();
                    let _ = fs::remove_dir(&dir);
                }
                self.notes
                    .push(format!("cgroup v1 {hierarchy} unusable ({e})"));
                None
            }
        }
    }

    /// Called in the child between `fork` and `exec`: joins the groups and sets the rlimit. Only
    /// async-signal-safe calls (open, write, close, setrlimit) on data prepared before the fork.
    pub fn enter(&self) -> io::Result<()> {
        for path in &self.procs {
            // SAFETY: a valid NUL-terminated path; the fd is closed below.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: writes one byte from a static buffer to the fd opened above.
            let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
            let err = io::Error::last_os_error();
            // SAFETY: closes the fd opened above.
            unsafe { libc::close(fd) };
            if n != 1 {
                return Err(err);
            }
        }
        if let Some(bytes) = self.rlimit_as {
            let lim = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            // SAFETY: a valid rlimit struct.
            if unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Whether the kernel killed a process of the invocation for exceeding the memory limit.
    pub fn oom_killed(&self, signal: Option<i32>) -> bool {
        match &self.oom {
            Some(OomCounter::V2(events)) => counter(events, "oom_kill") > 0,
            Some(OomCounter::V1(dir)) => {
                counter(&dir.join("memory.oom_control"), "oom_kill") > 0
                    || (signal == Some(libc::SIGKILL) && read_u64(&dir.join("memory.failcnt")) > 0)
            }
            None => false,
        }
    }

    /// The message of an out-of-memory kill.
    pub fn oom_message(&self) -> String {
        format!(
            "killed: memory limit of {} exceeded",
            describe_bytes(self.memory_limit.unwrap_or(0))
        )
    }

    /// Kills what is left in the groups and removes them (blocking; bounded).
    pub fn cleanup(&self) {
        remove_groups(&self.dirs);
    }

    fn remove_dirs(&mut self) {
        for d in self.dirs.drain(..) {
            let _ = fs::remove_dir(d);
        }
        self.procs.clear();
        self.oom = None;
    }
}

/// Kills and removes whatever groups an earlier agent process left for `id` (blocking).
pub fn remove_leftover_groups(id: &CommandId) {
    let root = Path::new(CGROUP_ROOT);
    let dirs: Vec<PathBuf> = ["", "memory", "cpu", "cpu,cpuacct"]
        .iter()
        .map(|h| root.join(h).join("fleetrun").join(id.as_str()))
        .filter(|d| d.exists())
        .collect();
    remove_groups(&dirs);
}

fn remove_groups(dirs: &[PathBuf]) {
    for dir in dirs {
        // A group can be removed once empty; SIGKILL is asynchronous, so give it a moment.
        for attempt in 0..100 {
            for pid in fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            match fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if attempt == 99 => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove cgroup");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

fn quota_us(pct: u32) -> u64 {
    (u64::from(pct) * CPU_PERIOD_US / 100).max(1_000)
}

fn ensure_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// `key N` in a flat-keyed cgroup file; 0 if absent.
fn counter(path: &Path, key: &str) -> u64 {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        .unwrap_or(0)
}

fn read_u64(path: &Path) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_cgroups_memory_falls_back_to_rlimit_and_cpu_is_reported() {
        let root = tempfile::tempdir().unwrap();
        let id = CommandId::from_random(3);
        let l = Limits::prepare_in(root.path(), &id, Some(64 * MIB), Some(50));
        assert_eq!(l.mechanism, "rlimit");
        assert_eq!(l.rlimit_as, Some(64 * MIB));
        assert!(
            l.notes
                .contains(&"cpu limit not applied: no cgroup available".to_owned()),
            "{:?}",
            l.notes
        );
        let none = Limits::prepare_in(root.path(), &id, None, None);
        assert_eq!(none.mechanism, "none");
        assert!(none.notes.is_empty());
    }

    #[test]
    fn a_fake_v2_hierarchy_gets_the_limit_files() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let id = CommandId::from_random(4);
        let l = Limits::prepare_in(root.path(), &id, Some(64 * MIB), Some(150));
        assert_eq!(l.mechanism, "cgroup2", "{:?}", l.notes);
        let dir = root.path().join("fleetrun").join(id.as_str());
        assert_eq!(
            fs::read_to_string(dir.join("memory.max")).unwrap(),
            "67108864"
        );
        assert_eq!(
            fs::read_to_string(dir.join("cpu.max")).unwrap(),
            "150000 100000"
        );
        fs::write(dir.join("memory.events"), "oom 1\noom_kill 1\n").unwrap();
        assert!(l.oom_killed(Some(9)));
        assert_eq!(l.oom_message(), "killed: memory limit of 64 MiB exceeded");
    }
}
