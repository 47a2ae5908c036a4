//! Issue 11, `fleetrun shell NODE`: an interactive shell through the real server and agent, typed
//! into a real terminal (a tmux pane on a tmux server of its own) and read off its screen: state
//! across lines, Ctrl-C, resizes, vi, the exit status, the local terminal restored however the
//! session ends, nothing left on the node after a hang-up, `-t`/`-c`, node lookup by tag.

use crate::support::{Agent, Server, fleetrun_bin, marker, processes_with, run, signal};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

/// `s` quoted for sh.
fn quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// This machine's root `.bashrc` runs `pyenv init`, whose rehash takes a lock file; a login
/// shell killed while it holds it (any test that hangs one up early) leaves it behind, and every
/// later login waits 60 s for it. No rehash holds it for two minutes: one that old is stale.
fn clear_stale_pyenv_lock() {
    let root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pyenv")));
    let Some(lock) = root.map(|r| r.join("shims").join(".pyenv-shim")) else {
        return;
    };
    let stale = std::fs::metadata(&lock)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > Duration::from_secs(120));
    if stale {
        let _ = std::fs::remove_file(&lock);
    }
}

/// A tmux server on a socket of its own (`-S`, in the test's directory) with one 100 x 30 pane running `fleetrun shell ARGS`
/// inside a small sh script that records `stty -g` before and after and the CLI's exit status,
/// then keeps the pane open. Killed when dropped.
struct Pane {
    socket: String,
    dir: PathBuf,
}

impl Pane {
    fn start(server: &Server, name: &str, args: &[&str]) -> Pane {
        Self::start_with_env(server, name, args, &[])
    }

    /// [`Pane::start`], with `extra` (NAME=VALUE) in the CLI's environment.
    fn start_with_env(server: &Server, name: &str, args: &[&str], extra: &[&str]) -> Pane {
        clear_stale_pyenv_lock();
        let dir = server.scratch(&format!("pane-{name}"));
        let mut env: Vec<String> = extra.iter().map(|e| e.to_string()).collect();
        env.extend([
            format!("FLEETRUN_SERVER={}", quoted(&server.url)),
            format!("FLEETRUN_TOKEN={}", quoted(&server.token)),
            format!(
                "FLEETRUN_CONFIG={}",
                quoted(
                    &server
                        .dir
                        .path()
                        .join("cli-config.toml")
                        .display()
                        .to_string()
                )
            ),
        ]);
        if let Some(ca) = &server.ca {
            env.push(format!(
                "FLEETRUN_CA_CERT={}",
                quoted(&ca.display().to_string())
            ));
        }
        let cli: Vec<String> = std::iter::once(fleetrun_bin().display().to_string())
            .chain(["shell".to_owned()])
            .chain(args.iter().map(|a| a.to_string()))
            .map(|a| quoted(&a))
            .collect();
        let d = dir.display();
        let script = format!(
            "unset RUST_LOG FLEETRUN_CA_CERT\nexport {env}\nstty -g > {d}/stty.before\n\
             {cli}\nrc=$?\nstty -g > {d}/stty.after\necho \"rc=$rc\" > {d}/rc.tmp && mv {d}/rc.tmp {d}/rc\n\
             echo \"CLI exited rc=$rc\"\nexec sleep 600\n",
            env = env.join(" "),
            cli = cli.join(" "),
        );
        std::fs::write(dir.join("pane.sh"), script).expect("write the pane's script");
        // The tmux server's socket lives (and goes) with the test's directory.
        let socket = dir.join("tmux.sock").display().to_string();
        let pane = Pane { socket, dir };
        let script = pane.dir.join("pane.sh").display().to_string();
        pane.tmux(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "main",
            "-x",
            "100",
            "-y",
            "30",
            "sh",
            &script,
        ]);
        pane
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = run(
            {
                let mut c = Command::new("tmux");
                c.arg("-S").arg(&self.socket).args(args);
                c
            },
            Duration::from_secs(20),
        );
        assert_eq!(out.code(), Some(0), "tmux {args:?}: {}", out.stderr);
        out.stdout_str()
    }

    /// Types `text` literally, then Enter.
    fn line(&self, text: &str) {
        self.tmux(&["send-keys", "-t", "main", "-l", text]);
        self.key("Enter");
    }

    /// Presses a key by tmux's name for it (`C-c`, `Escape`, `Enter`).
    fn key(&self, name: &str) {
        self.tmux(&["send-keys", "-t", "main", name]);
    }

    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "main"])
    }

    /// Waits (bounded) until the screen shows `text`; the screen then.
    fn wait_for(&self, text: &str) -> String {
        self.wait_screen(text, |s| s.contains(text))
    }

    /// Waits (bounded) until `ok` holds for the screen, failing with the screen.
    fn wait_screen(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + LIMIT;
        let mut delay = Duration::from_millis(20);
        loop {
            let screen = self.screen();
            if ok(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what:?}; the screen:\n{screen}"
            );
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    /// Waits for the remote shell to read a line: types a computed echo and waits for its answer
    /// (the typed line shows `$((..))`, only the answer shows the number).
    fn ready(&self, tag: &str) {
        self.line(&format!("echo {tag}-$((40+2))"));
        self.wait_for(&format!("{tag}-42"));
    }

    /// The CLI's exit status, once the script recorded it.
    fn exit_status(&self) -> i32 {
        let path = self.dir.join("rc");
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Ok(s) = std::fs::read_to_string(&path) {
                return s
                    .trim()
                    .strip_prefix("rc=")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("bad rc file {s:?}"));
            }
            assert!(
                Instant::now() < deadline,
                "the CLI did not exit; the screen:\n{}",
                self.screen()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asserts the local terminal's settings after the CLI are those before it.
    fn assert_terminal_restored(&self) {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).expect(f);
        let (before, after) = (read("stty.before"), read("stty.after"));
        assert!(!before.trim().is_empty());
        assert_eq!(before, after, "stty -g differs after the CLI");
    }

    /// The CLI's pid: the child of the pane's script named like the fleetrun binary.
    fn cli_pid(&self) -> u32 {
        let script: u32 = self
            .tmux(&["display-message", "-p", "-t", "main", "#{pane_pid}"])
            .trim()
            .parse()
            .expect("pane pid");
        let bin = fleetrun_bin().display().to_string();
        children(script)
            .into_iter()
            .find(|&pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| c.starts_with(bin.as_bytes()))
                    .unwrap_or(false)
            })
            .expect("the CLI runs in the pane")
    }
}

impl Drop for Pane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the pane at the failure:\n{}", self.screen());
        }
        let _ = Command::new("tmux")
            .args(["-S", &self.socket, "kill-server"])
            .status();
    }
}

/// Pids whose parent is `parent`.
fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let (_, rest) = s.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// Waits (bounded) until no process has `mark` in its command line.
fn wait_gone(mark: &str) {
    crate::support::wait_until("the node's processes to end", LIMIT, || {
        processes_with(mark).is_empty().then_some(())
    });
}

/// The prompt appears; `cd` and an exported variable persist across lines; Ctrl-C interrupts
/// the foreground job and the shell stays; a resize of the local window is seen by `stty size`;
/// `exit 3` is the CLI's exit status 3; the local terminal is as it was.
#[test]
fn an_interactive_shell_keeps_state_takes_ctrl_c_and_resizes_and_exits_with_its_status() {
    let server = Server::start();
    let _agent = Agent::start(&server, "shell-a", &[]);
    let pane = Pane::start(&server, "a", &["shell-a"]);
    // A login shell's prompt (root's, as the tests run).
    pane.wait_screen("a prompt", |s| {
        s.lines()
            .any(|l| l.trim_end().ends_with('#') || l.trim_end().ends_with('$'))
    });
    pane.line("cd /tmp; export FLEETRUN_GREETING=hello-there");
    pane.line("echo \"at:$(pwd) greeting:$FLEETRUN_GREETING\"");
    pane.wait_for("at:/tmp greeting:hello-there");

    let mark = marker("shell_ctrl_c");
    pane.line(&format!("sh -c 'sleep 100; echo {mark}'"));
    crate::support::wait_until("the sleep to run", LIMIT, || {
        (!processes_with(&mark).is_empty()).then_some(())
    });
    pane.key("C-c");
    wait_gone(&mark);
    pane.ready("still-here");

    pane.tmux(&["resize-window", "-t", "main", "-x", "120", "-y", "40"]);
    pane.wait_screen("the pane to be resized", |_| {
        pane.tmux(&[
            "display-message",
            "-p",
            "-t",
            "main",
            "#{pane_width}x#{pane_height}",
        ])
        .trim()
            == "120x40"
    });
    pane.line("stty size | sed 's/ /x/'");
    pane.wait_for("40x120");

    pane.line("exit 3");
    assert_eq!(pane.exit_status(), 3);
    pane.assert_terminal_restored();
}

/// vi (vim here) runs full screen over the session: a file is created, typed into and saved.
#[test]
fn vi_edits_and_saves_a_file_on_the_node() {
    assert!(
        Path::new("/usr/bin/vi").exists(),
        "/usr/bin/vi is needed by this test (apt-get install vim)"
    );
    let server = Server::start();
    let _agent = Agent::start(&server, "shell-vi", &[]);
    let file = server.scratch("vi").join("notes.txt");
    let pane = Pane::start(&server, "vi", &["shell-vi"]);
    pane.ready("vi-ready");
    let command = format!("vi {}", file.display());
    pane.line(&command);
    // vim's empty buffer: tildes down the left side.
    pane.wait_screen("vi's screen", |s| {
        s.lines().filter(|l| l.starts_with('~')).count() > 5
    });
    pane.key("i");
    pane.tmux(&["send-keys", "-t", "main", "-l", "typed through fleetrun"]);
    pane.key("Enter");
    pane.tmux(&["send-keys", "-t", "main", "-l", "second line"]);
    pane.key("Escape");
    pane.line(":wq");
    crate::support::wait_until("vi to save the file", LIMIT, || {
        std::fs::read_to_string(&file)
            .ok()
            .filter(|s| s.ends_with('\n'))
    });
    // Back at the prompt (keys typed while vim exits are flushed by it, as on any terminal).
    pane.wait_screen("the prompt after vi", |s| {
        let lines: Vec<&str> = s.lines().collect();
        lines
            .iter()
            .position(|l| l.ends_with(&command))
            .is_some_and(|i| {
                lines
                    .get(i + 1)
                    .is_some_and(|l| l.trim_end().ends_with('#') || l.trim_end().ends_with('$'))
            })
    });
    pane.ready("vi-done");
    let saved = std::fs::read_to_string(&file).expect("vi saved the file");
    assert_eq!(saved, "typed through fleetrun\nsecond line\n");
    pane.line("exit");
    assert_eq!(pane.exit_status(), 0);
    pane.assert_terminal_restored();
}

/// SIGTERM to the CLI and the agent dying mid-session both end it with the local terminal
/// restored; the hang-up leaves no process of the session on the node.
#[test]
fn the_terminal_is_restored_after_sigterm_or_a_dead_agent_and_nothing_is_left() {
    let server = Server::start();
    let mut agent = Agent::start(&server, "shell-end", &[]);

    let pane = Pane::start(&server, "term", &["shell-end"]);
    pane.ready("term-ready");
    let mark = marker("shell_sigterm");
    pane.line(&format!(
        "sh -c 'sleep 100; echo {mark}' & sh -c 'sleep 101; echo {mark}'"
    ));
    crate::support::wait_until("both sleepers to run", LIMIT, || {
        (processes_with(&mark).len() >= 2).then_some(())
    });
    signal(pane.cli_pid(), libc::SIGTERM);
    assert_eq!(pane.exit_status(), 143);
    pane.assert_terminal_restored();
    wait_gone(&mark);
    drop(pane);

    let pane = Pane::start(&server, "dead-agent", &["shell-end"]);
    pane.ready("agent-ready");
    agent.kill();
    let rc = pane.exit_status();
    assert_ne!(rc, 0);
    let screen = pane.wait_for("CLI exited");
    assert!(screen.contains("agent disconnected"), "{screen}");
    pane.assert_terminal_restored();
}

/// A panic after raw mode began, with no destructor run (the debug-build test switch), still
/// leaves the terminal as it was: the panic hook restores it.
#[test]
fn a_panic_in_raw_mode_restores_the_terminal() {
    let server = Server::start();
    let _agent = Agent::start(&server, "shell-panic", &[]);
    let pane = Pane::start_with_env(
        &server,
        "panic",
        // A command, not a login shell: a login shell hung up while its rc files run can
        // leave them a lock that stalls the next logins (pyenv's rehash lock, here).
        &["shell-panic", "-t", "-c", "sleep 30"],
        &["FLEETRUN_TEST_PANIC_IN_RAW_MODE=1"],
    );
    assert_eq!(pane.exit_status(), 101);
    let screen = pane.wait_for("CLI exited");
    assert!(screen.contains("a test panic in raw mode"), "{screen}");
    pane.assert_terminal_restored();
}

/// `-t -c tty` gets a PTY and `-c tty` none; NODE may be a tag expression matching one node,
/// and one matching several is refused with the candidates.
#[test]
fn dash_t_gives_a_pty_and_nodes_are_found_by_tag() {
    let server = Server::start();
    let _web = Agent::start(&server, "shell-web", &[("role", "web"), ("env", "prod")]);
    let _web2 = Agent::start(&server, "shell-web2", &[("role", "web"), ("env", "dev")]);
    let mut cmd = server.cli_cmd(&["shell", "tag:role=web tag:env=prod", "-t", "-c", "tty"]);
    cmd.stdin(std::process::Stdio::null());
    let out = run(cmd, LIMIT);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stdout_str().starts_with("/dev/pts/"),
        "{}",
        out.stdout_str()
    );

    let mut cmd = server.cli_cmd(&["shell", "tag:env=dev", "-c", "tty; echo err >&2; exit 4"]);
    cmd.stdin(std::process::Stdio::null());
    let out = run(cmd, LIMIT);
    assert_eq!(out.code(), Some(4), "{}", out.stderr);
    assert_eq!(out.stdout_str(), "not a tty\n");
    assert!(out.stderr.contains("err"), "{}", out.stderr);

    let out = run(
        server.cli_cmd(&["shell", "tag:role=web", "-c", "true"]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr.contains("2 nodes match \"tag:role=web\""),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("shell-web (") && out.stderr.contains("shell-web2 ("),
        "{}",
        out.stderr
    );
    let out = run(
        server.cli_cmd(&["shell", "tag:role=db", "-c", "true"]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr.contains("no node matches \"tag:role=db\""),
        "{}",
        out.stderr
    );

    // No terminal and no command: refused, saying what to do.
    let mut cmd = server.cli_cmd(&["shell", "shell-web"]);
    cmd.stdin(std::process::Stdio::null());
    let out = run(cmd, LIMIT);
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr.contains("stdin is not a terminal"),
        "{}",
        out.stderr
    );

    // The sessions are recorded by kind.
    let listed = server.cli(&["sessions", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed.stdout_str()).expect("JSON");
    let kinds: Vec<&str> = listed
        .as_array()
        .expect("sessions")
        .iter()
        .filter_map(|s| s["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"shell") && kinds.contains(&"exec"),
        "{kinds:?}"
    );
}
