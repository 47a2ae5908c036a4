//! Issue 11, session recordings: a session's recording downloads as asciicast v2 holding the
//! output the client saw, `sessions play` replays it to the same screen (tmux), an object store
//! that cannot be written refuses the session (or, configured so, lets it run unrecorded), a
//! recording outside one's scope is not found, and retention deletes it.

use crate::support::{Agent, AgentOpts, Server, fleetrun_bin, marker, run, wait_until};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

/// The newest session's record.
fn newest_session(server: &Server) -> Value {
    let listed = server.get_json("/v1/sessions?limit=1");
    listed[0].clone()
}

/// The lines of an asciicast file, parsed; each must be JSON.
fn parse_cast(bytes: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(bytes).expect("a recording is UTF-8");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The "o" data of a recording, concatenated.
fn output_of(lines: &[Value]) -> String {
    lines[1..]
        .iter()
        .filter(|l| l[1] == "o")
        .map(|l| l[2].as_str().expect("text data"))
        .collect()
}

#[test]
fn a_recording_downloads_as_asciicast_v2_holding_what_the_client_saw_and_plays_back() {
    let server = Server::start();
    let _agent = Agent::start(&server, "rec-a", &[]);
    // Several frames of output, multi-byte text, escapes, and a pause worth seeing in the timings.
    let script =
        "printf 'héllo wörld €\\n'; sleep 0.4; printf '\\033[1mbold\\033[0m\\n'; seq 1 20000";
    let live = run(
        server.cli_cmd(&["shell", "rec-a", "-t", "-c", script]),
        LIMIT,
    );
    assert_eq!(live.code(), Some(0), "{}", live.stderr);
    let seen = live.stdout_str();
    assert!(seen.len() > 100_000, "{}", seen.len());

    let s = newest_session(&server);
    let id = s["session_id"].as_str().expect("id").to_owned();
    assert_eq!(s["recording"], "complete", "{s}");
    let cast = server.cli(&["sessions", "recording", &id]).ok().stdout;
    assert_eq!(s["recording_bytes"], cast.len() as u64, "{s}");
    let lines = parse_cast(&cast);
    let h = &lines[0];
    assert_eq!(h["version"], 2, "{h}");
    assert_eq!(
        (h["width"].as_u64(), h["height"].as_u64()),
        (Some(80), Some(24)),
        "{h}"
    );
    assert!(h["timestamp"].as_i64().unwrap_or(0) > 1_600_000_000, "{h}");
    let title = h["title"].as_str().expect("title");
    assert!(
        title.starts_with("admin@") && title.contains("seq 1 20000"),
        "{title}"
    );
    assert_eq!(
        output_of(&lines),
        seen,
        "the recorded output is what the client saw"
    );
    let times: Vec<f64> = lines[1..]
        .iter()
        .map(|l| l[0].as_f64().expect("a time"))
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert!(
        times.windows(2).any(|w| w[1] - w[0] >= 0.3),
        "the pause shows: {:?}",
        &times[..times.len().min(5)]
    );
    // No input is recorded by default.
    assert!(lines[1..].iter().all(|l| l[1] == "o"));

    // Played back (fast), the same bytes come out.
    let played = run(
        server.cli_cmd(&["sessions", "play", &id, "--speed", "100"]),
        LIMIT,
    );
    assert_eq!(played.code(), Some(0), "{}", played.stderr);
    assert_eq!(played.stdout_str(), seen);
    let skipped = run(
        server.cli_cmd(&["sessions", "play", &id, "--skip-idle", "--max-idle", "0.01"]),
        LIMIT,
    );
    assert_eq!(skipped.stdout_str(), seen, "{}", skipped.stderr);

    // `sessions show` says there is one and how big.
    let table = server.cli(&["sessions", "show", &id]).ok().stdout_str();
    assert!(
        table.contains("RECORDING") && table.contains("KiB"),
        "{table}"
    );
    // Each download is in the trail: who read which session's recording.
    let reads = wait_until("the downloads to be audited", LIMIT, || {
        let r = server.get_json("/v1/audit?action=sessions.recording.read");
        let r = r.as_array().cloned().unwrap_or_default();
        (r.len() >= 3).then_some(r)
    });
    assert_eq!(reads[0]["principal"], "admin", "{}", reads[0]);
    assert_eq!(
        reads[0]["params"]["session_id"],
        id.as_str(),
        "{}",
        reads[0]
    );
    assert_eq!(reads[0]["node_ids"][0], s["node_id"], "{}", reads[0]);
}

/// A private tmux server, killed when dropped.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn new(dir: &Path) -> Tmux {
        Tmux {
            socket: dir.join("tmux.sock"),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S")
            .arg(&self.socket)
            .args(["-f", "/dev/null"])
            .args(args);
        c
    }

    /// Runs `script` in a new detached 80x24 session `name`; it signals `name` when done and the
    /// pane then stays as it was.
    fn start(&self, name: &str, script: &str) {
        let script = format!("{script}; tmux wait-for -S {name}; sleep 600");
        let out = run(
            self.cmd(&[
                "new-session",
                "-d",
                "-s",
                name,
                "-x",
                "80",
                "-y",
                "24",
                &script,
            ]),
            LIMIT,
        );
        assert_eq!(out.code(), Some(0), "{}", out.stderr);
    }

    /// Waits (bounded) until session `name`'s script has signalled, then the pane's screen with
    /// its attributes.
    fn screen_when_done(&self, name: &str) -> String {
        let out = run(self.cmd(&["wait-for", name]), LIMIT);
        assert_eq!(out.code(), Some(0), "{}", out.stderr);
        let out = run(self.cmd(&["capture-pane", "-p", "-e", "-t", name]), LIMIT);
        assert_eq!(out.code(), Some(0), "{}", out.stderr);
        out.stdout_str()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self
            .cmd(&["kill-server"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `sh` single quotes.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A shell command line running the CLI against `server` with `args`.
fn cli_line(server: &Server, args: &[&str]) -> String {
    let mut line = format!(
        "env -u RUST_LOG FLEETRUN_SERVER={} FLEETRUN_TOKEN={} FLEETRUN_CONFIG={}",
        quote(&server.url),
        quote(&server.token),
        quote(
            &server
                .dir
                .path()
                .join("cli-config.toml")
                .display()
                .to_string()
        ),
    );
    if let Some(ca) = &server.ca {
        line.push_str(&format!(
            " FLEETRUN_CA_CERT={}",
            quote(&ca.display().to_string())
        ));
    }
    line.push(' ');
    line.push_str(&quote(&fleetrun_bin().display().to_string()));
    for a in args {
        line.push(' ');
        line.push_str(&quote(a));
    }
    line
}

/// "A recording replays to the same screen": what a terminal shows after the live session and
/// after playing its recording are the same, cell for cell and attribute for attribute.
#[test]
fn a_recording_replays_to_the_same_screen() {
    let server = Server::start();
    let _agent = Agent::start(&server, "rec-screen", &[]);
    let tmux = Tmux::new(server.dir.path());
    let script = concat!(
        "printf '\\033[2J\\033[Htop línea\\n'; sleep 0.2; ",
        "printf '\\033[5;10H\\033[1;31mred bold\\033[0m'; ",
        "printf '\\033[8;1H%s\\n' \"$(seq -s ' ' 1 40)\"; ",
        "printf '\\033[12;40H\\033[7m€ end\\033[0m\\n'"
    );
    tmux.start(
        "live",
        &cli_line(&server, &["shell", "rec-screen", "-t", "-c", script]),
    );
    let live = tmux.screen_when_done("live");
    assert!(
        live.contains("red bold") && live.contains("€ end"),
        "{live}"
    );
    let id = newest_session(&server)["session_id"]
        .as_str()
        .expect("id")
        .to_owned();
    tmux.start(
        "play",
        &format!(
            "{} 2>/dev/null",
            cli_line(&server, &["sessions", "play", &id, "--speed", "10"])
        ),
    );
    let played = tmux.screen_when_done("play");
    assert_eq!(
        played, live,
        "the replay's screen differs from the live one"
    );

    // The file is not written to a terminal unless asked.
    tmux.start("tty", &cli_line(&server, &["sessions", "recording", &id]));
    let said = tmux.screen_when_done("tty");
    assert!(said.contains("stdout is a terminal"), "{said}");
}

#[test]
fn an_unwritable_object_store_refuses_the_session_when_failing_closed() {
    let server = Server::start();
    let _agent = Agent::start(&server, "rec-closed", &[]);
    // A file where the recordings' directory should be: nothing can be written under it (root
    // ignores modes, not this).
    std::fs::write(server.data_dir.join("objects/sessions"), b"in the way").expect("block");
    let mark = server.scratch("rec-closed").join("ran");
    let script = format!("touch {}", mark.display());
    let out = run(
        server.cli_cmd(&["shell", "rec-closed", "-t", "-c", &script]),
        LIMIT,
    );
    assert_ne!(out.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains("cannot start the session's recording"),
        "{}",
        out.stderr
    );
    assert!(!mark.exists(), "the command ran unrecorded");
    let refused = server.get_json("/v1/audit?action=exec.refused");
    assert!(
        refused[0]["result"]
            .as_str()
            .is_some_and(|r| r.contains("recording")),
        "{refused}"
    );
    // The attempt is a Failed record naming why, without a recording.
    let sessions = server.get_json("/v1/sessions");
    let s = &sessions.as_array().expect("sessions")[..];
    assert_eq!(s.len(), 1, "{sessions}");
    assert_eq!(
        (&s[0]["status"], &s[0]["recording"]),
        (&"Failed".into(), &"none".into()),
        "{sessions}"
    );
    assert!(
        s[0]["end_reason"]
            .as_str()
            .is_some_and(|r| r.contains("recording")),
        "{sessions}"
    );
}

#[test]
fn an_unwritable_object_store_lets_the_session_run_unrecorded_when_configured_to_continue() {
    let server = Server::start_with(&["--recording-failure", "continue"]);
    let _agent = Agent::start(&server, "rec-open", &[]);
    std::fs::write(server.data_dir.join("objects/sessions"), b"in the way").expect("block");
    let out = run(
        server.cli_cmd(&["shell", "rec-open", "-t", "-c", "echo ran"]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    // On a terminal, lines end CR LF.
    assert_eq!(out.stdout_str(), "ran\r\n");
    let s = newest_session(&server);
    assert_eq!(s["recording"], "failed", "{s}");
    let id = s["session_id"].as_str().expect("id");
    let e = server.cli(&["sessions", "recording", id]).one_line_error();
    assert!(
        e.contains("RecordingNotFound") && e.contains("could not be written"),
        "{e}"
    );
    assert!(
        server
            .logs()
            .contains("cannot start the session's recording"),
        "the failure is logged"
    );
}

/// A one-shot command on pipes (no `-t`) is not recorded: its output is often bulk or binary;
/// the same command on a terminal is.
#[test]
fn only_sessions_on_a_terminal_are_recorded() {
    let server = Server::start();
    let _agent = Agent::start(&server, "rec-pipes", &[]);
    let out = run(
        server.cli_cmd(&["exec", "rec-pipes", "--", "echo x"]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let s = newest_session(&server);
    assert_eq!(
        (s["kind"].as_str(), s["recording"].as_str()),
        (Some("exec"), Some("none")),
        "{s}"
    );
    let out = run(
        server.cli_cmd(&["shell", "rec-pipes", "-t", "-c", "echo x"]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let s = newest_session(&server);
    assert_eq!(s["recording"], "complete", "{s}");
}

#[test]
fn with_recording_off_a_session_has_none_and_says_so() {
    let server = Server::start_with(&["--session-recording", "off"]);
    let _agent = Agent::start(&server, "rec-off", &[]);
    let out = run(
        server.cli_cmd(&["shell", "rec-off", "-t", "-c", "echo x"]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let s = newest_session(&server);
    assert_eq!(s["recording"], "none", "{s}");
    let id = s["session_id"].as_str().expect("id");
    let r = server.get(&format!("/v1/sessions/{id}/recording"));
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "RecordingNotFound");
    assert!(!server.data_dir.join("objects/sessions").exists());
}

/// What a recording request answers: status, code, message.
fn answer(server: &Server, token: &str, id: &str) -> (u16, String, String) {
    let r = server
        .http(
            "GET",
            &format!("/v1/sessions/{id}/recording"),
            Some(token),
            None,
        )
        .expect("request");
    if r.status == 200 {
        return (200, String::new(), String::new());
    }
    let v = r.json();
    let s = |k: &str| v["error"][k].as_str().unwrap_or_default().to_owned();
    (r.status, s("code"), s("message"))
}

#[test]
fn hostile_recording_requests_get_clear_answers_and_one_outside_ones_scope_is_not_found() {
    let server = Server::start();
    let prod = AgentOpts {
        tags: vec![("env".into(), "prod".into())],
        ..AgentOpts::default()
    };
    let _agent = Agent::start_opts(&server, "rec-prod", prod);
    let out = run(
        server.cli_cmd(&["shell", "rec-prod", "-t", "-c", "echo secret"]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let id = newest_session(&server)["session_id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert_eq!(answer(&server, &server.token, &id).0, 200);

    // A user who may open shells on dev nodes only: the prod session's recording is not found,
    // exactly as one that does not exist.
    let policy = server.dir.path().join("dev.cedar");
    std::fs::write(
        &policy,
        "permit (principal, action in [Action::\"list\", Action::\"shell\"], resource is Node)\n\
         when { resource.hasTag(\"env\") && resource.getTag(\"env\") == \"dev\" };\n",
    )
    .expect("policy");
    let policy = policy.to_str().expect("utf-8 path");
    server
        .cli(&[
            "users", "create", "dev", "--role", "none", "--policy", policy,
        ])
        .ok();
    let token = server
        .cli(&["tokens", "create", "--user", "dev", "-o", "json"])
        .ok()
        .json()["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let (status, code, message) = answer(&server, &token, &id);
    assert_eq!(
        (status, code.as_str()),
        (404, "SessionNotFound"),
        "{message}"
    );
    let missing = "3f2504e0-4f89-41d3-9a0c-0305e82c3301";
    let (status, code, other) = answer(&server, &token, missing);
    assert_eq!((status, code.as_str()), (404, "SessionNotFound"));
    assert_eq!(message.replace(&id, "ID"), other.replace(missing, "ID"));

    // Odd ids are not found, never a fault.
    let long = "x".repeat(10_000);
    for bad in [
        "..%2F..%2Fetc%2Fpasswd",
        "%00",
        long.as_str(),
        "'%20OR%201=1",
    ] {
        let (status, code, _) = answer(&server, &server.token, bad);
        assert_eq!(
            (status, code.as_str()),
            (404, "SessionNotFound"),
            "{bad:.40}"
        );
    }

    // A running session's recording is refused until it ends.
    let mark = marker("rec_running");
    let mut child = server
        .cli_cmd(&[
            "shell",
            "rec-prod",
            "-t",
            "-c",
            &format!("sleep 100; echo {mark}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let running = wait_until("the session to run", LIMIT, || {
        let a = server.get_json("/v1/sessions?active=true");
        a[0]["session_id"].as_str().map(str::to_owned)
    });
    let (status, code, message) = answer(&server, &server.token, &running);
    assert_eq!(
        (status, code.as_str()),
        (409, "RecordingNotReady"),
        "{message}"
    );
    assert!(message.contains("still running"), "{message}");
    server.cli(&["sessions", "terminate", &running]).ok();
    wait_until("the CLI to exit", LIMIT, || child.try_wait().ok().flatten());
    // Ended by a terminate, its recording is complete.
    let s = server.get_json(&format!("/v1/sessions/{running}"));
    assert_eq!(s["recording"], "complete", "{s}");
    assert_eq!(answer(&server, &server.token, &running).0, 200);
    assert!(!server.all_logs().contains("panicked"));
}

#[test]
fn retention_deletes_a_recording_with_its_session() {
    let server = Server::start_with(&["--retention", "2s", "--purge-interval", "1s"]);
    let _agent = Agent::start(&server, "rec-purge", &[]);
    let out = run(
        server.cli_cmd(&["shell", "rec-purge", "-t", "-c", "echo old"]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let listed = server.get_json("/v1/sessions");
    let id = listed[0]["session_id"].as_str().expect("id").to_owned();
    let object = server
        .data_dir
        .join("objects/sessions")
        .join(format!("{id}.cast"));
    // Stored at the session's end, 2 s before it may be purged.
    assert!(object.exists(), "{}", object.display());
    wait_until(
        "the recording to be deleted",
        Duration::from_secs(20),
        || (!object.exists()).then_some(()),
    );
    wait_until(
        "the session record to be purged",
        Duration::from_secs(20),
        || {
            let r = server.get(&format!("/v1/sessions/{id}"));
            (r.status == 404).then_some(())
        },
    );
    assert!(!object.exists(), "the object is not left behind");
}

/// A recording whose upload cannot complete (something in the way of its object) is marked
/// `failed` and never served half; the session itself ended normally.
#[test]
fn a_recording_that_cannot_be_completed_is_failed_never_served_half() {
    let server = Server::start();
    let _agent = Agent::start(&server, "rec-end", &[]);
    let gate = server.scratch("rec-end").join("gate");
    let script = format!("echo started; {}", crate::support::wait_for_file(&gate));
    let mut child = server
        .cli_cmd(&["shell", "rec-end", "-t", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let id = wait_until("the session to run", LIMIT, || {
        let a = server.get_json("/v1/sessions?active=true");
        a[0]["session_id"].as_str().map(str::to_owned)
    });
    // A non-empty directory where the finished file is to be renamed to.
    let object = server
        .data_dir
        .join("objects/sessions")
        .join(format!("{id}.cast"));
    std::fs::create_dir_all(object.join("x")).expect("in the way");
    std::fs::write(&gate, b"").expect("open the gate");
    let status = wait_until("the CLI to exit", LIMIT, || child.try_wait().ok().flatten());
    assert_eq!(status.code(), Some(0), "the session itself ended normally");
    let s = server.get_json(&format!("/v1/sessions/{id}"));
    assert_eq!(
        (&s["recording"], &s["recording_bytes"]),
        (&"failed".into(), &0.into()),
        "{s}"
    );
    let (status, code, _) = answer(&server, &server.token, &id);
    assert_eq!((status, code.as_str()), (404, "RecordingNotFound"));
    let ends = server.get_json("/v1/audit?action=exec.end");
    let error = ends[0]["params"]["recording_error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.starts_with("recording failed: "), "{}", ends[0]);
}

/// A recording altered in the store is refused by `sessions play` with the line that is wrong,
/// and Ctrl-C (SIGINT) stops a playback at once, exit 130.
#[test]
fn play_names_a_bad_line_and_stops_on_ctrl_c() {
    let server = Server::start();
    let _agent = Agent::start(&server, "rec-play", &[]);
    let out = run(
        server.cli_cmd(&[
            "shell",
            "rec-play",
            "-t",
            "-c",
            "echo one; sleep 1; echo two",
        ]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let id = newest_session(&server)["session_id"]
        .as_str()
        .expect("id")
        .to_owned();
    // Played 100 times slower, "two" is 100 s away: SIGINT ends it long before.
    let mut child = server
        .cli_cmd(&["sessions", "play", &id, "--speed", "0.01"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 5];
    std::io::Read::read_exact(&mut stdout, &mut first).expect("the first line");
    assert_eq!(&first, b"one\r\n");
    crate::support::signal(child.id(), libc::SIGINT);
    let status = wait_until("play to stop", Duration::from_secs(10), || {
        child.try_wait().ok().flatten()
    });
    assert_eq!(status.code(), Some(130));
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut stdout, &mut rest).expect("the rest");
    assert!(rest.is_empty(), "nothing after the interrupt: {rest:?}");

    let object = server
        .data_dir
        .join("objects/sessions")
        .join(format!("{id}.cast"));
    let good = std::fs::read_to_string(&object).expect("the recording");
    let header = good.lines().next().expect("header").to_owned();
    // Line 2 is broken.
    let bad = format!("{header}\n[0.1, \"o\"]\n");
    std::fs::write(&object, bad).expect("tamper");
    let e = server.cli(&["sessions", "play", &id, "--speed", "100"]);
    assert_eq!(e.code(), Some(1), "{}", e.stderr);
    assert!(e.stderr.contains("line 2"), "{}", e.stderr);
    let far = format!("{header}\n[1e300, \"o\", \"late\"]\n");
    std::fs::write(&object, far).expect("tamper");
    let e = server.cli(&["sessions", "play", &id, "--speed", "0.5"]);
    assert!(e.stderr.contains("too far out to play"), "{}", e.stderr);
    std::fs::write(&object, "{\"version\":1}\n").expect("tamper");
    let e = server.cli(&["sessions", "play", &id]);
    assert!(e.stderr.contains("asciicast version 1"), "{}", e.stderr);
    assert!(!e.stderr.contains("panicked"), "{}", e.stderr);
}

/// With `--record-input` the bytes sent to the session are recorded as "i" events too (off by
/// default: the first test sees none).
#[test]
fn with_record_input_what_is_sent_is_recorded() {
    let server = Server::start_with(&["--record-input"]);
    let _agent = Agent::start(&server, "rec-input", &[]);
    let out = crate::support::run_input(
        server.cli_cmd(&[
            "shell",
            "rec-input",
            "-t",
            "-c",
            "read -r line; echo \"got $line\"",
        ]),
        Some(b"typed p4ssw0rd\n"),
        LIMIT,
    );
    // The terminal echoes what is typed, then the command answers.
    assert!(
        out.stdout_str().ends_with("got typed p4ssw0rd\r\n"),
        "{:?} {}",
        out.stdout_str(),
        out.stderr
    );
    let id = newest_session(&server)["session_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let lines = parse_cast(&server.cli(&["sessions", "recording", &id]).ok().stdout);
    let input: String = lines[1..]
        .iter()
        .filter(|l| l[1] == "i")
        .map(|l| l[2].as_str().expect("text"))
        .collect();
    assert_eq!(input, "typed p4ssw0rd\n");
    assert_eq!(output_of(&lines), out.stdout_str());
}
