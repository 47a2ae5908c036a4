//! The `fleetrun-agent` binary's argument handling: bad input gives a one-line error and exit 1.

use std::process::Command;

fn agent(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetrun-agent"))
        .args(args)
        .env_remove("FLEETRUN_SERVER")
        .env_remove("FLEETRUN_STATE_DIR")
        .env_remove("FLEETRUN_ACTIVATION_CODE")
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(out.stdout.is_empty());
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_error(code: i32, stderr: &str, needle: &str) {
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("fleetrun-agent: "), "{stderr}");
    assert!(stderr.contains(needle), "{stderr}");
}

#[test]
fn bad_tag_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    let (code, err) = agent(&[
        "--server",
        "https://127.0.0.1:9",
        "--state-dir",
        state,
        "--tag",
        "novalue",
    ]);
    assert_one_line_error(code, &err, "must be KEY=VALUE");
    let (code, err) = agent(&[
        "--server",
        "https://127.0.0.1:9",
        "--state-dir",
        state,
        "--tag",
        "a b=c",
    ]);
    assert_one_line_error(code, &err, "invalid --tag");
}

#[test]
fn missing_identity_without_activation_code_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (code, err) = agent(&[
        "--server",
        "https://127.0.0.1:9",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_one_line_error(code, &err, "no identity in");
    assert!(err.contains("no --activation-code given"), "{err}");
}

#[test]
fn plain_http_and_bad_urls_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    let (code, err) = agent(&[
        "--server",
        "http://example.com",
        "--state-dir",
        state,
        "--activation-code",
        "x",
    ]);
    assert_one_line_error(code, &err, "--insecure-http");
    let (code, err) = agent(&[
        "--server",
        "example.com",
        "--state-dir",
        state,
        "--activation-code",
        "x",
    ]);
    assert_one_line_error(code, &err, "must start with https://");
}

#[test]
fn missing_required_arguments_fail() {
    let (code, err) = agent(&[]);
    assert_ne!(code, 0);
    assert!(err.contains("--server"), "{err}");
}

/// A run directory written by a newer agent (journal format 2) stops the agent at start-up, before
/// it connects or acts on any run, with one line naming the file and both versions.
#[test]
fn a_journal_of_a_newer_format_is_refused_at_start_up() {
    use fleetrun_agent::identity::{self, Identity};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    identity::ensure_state_dir(&state).unwrap();
    let node = fleetrun_proto::NodeId::from_random(1);
    let id = Identity::new(node, identity::generate_key(), 1_700_000_000_000);
    identity::save(&state, &id).unwrap();
    let run = fleetrun_proto::CommandId::from_random(1);
    let run_dir = state.join("runs").join(run.as_str());
    std::fs::create_dir_all(&run_dir).unwrap();
    let request = run_dir.join("request.json");
    std::fs::write(&request, r#"{"format_version": 2, "request": {}}"#).unwrap();
    let (code, err) = agent(&[
        // Nothing listens there: the refusal comes before any dial.
        "--server",
        "https://127.0.0.1:9",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_one_line_error(
        code,
        &err,
        "journal format version 2, newer than the version 1",
    );
    assert!(err.contains(&request.display().to_string()), "{err}");
    assert!(request.exists(), "the run directory is left as it was");
}
