//! Issue 12, saved scripts with an input and an output file, on real agents: the input is put
//! into each node's private temp dir, the output shipped into the object store under the command
//! and node, and the dir removed whatever the outcome (success, failure, timeout, cancel).

use crate::support::{Agent, Server, free_port, invocations, wait_until};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn write(server: &Server, name: &str, bytes: &[u8]) -> PathBuf {
    let path = server.scratch("script-files").join(name);
    std::fs::write(&path, bytes).expect("write");
    path
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// Creates script `name` with `body`, `input` and `output`.
fn create(server: &Server, name: &str, body: &str, input: Option<&str>, output: &str) {
    let file = write(server, &format!("{name}.sh"), body.as_bytes());
    let mut args = vec![
        "scripts",
        "create",
        name,
        "--platform",
        "linux",
        "--output-path",
        output,
        "--file",
        file.to_str().expect("path"),
    ];
    if let Some(i) = input {
        args.extend(["--input", i]);
    }
    server.cli(&args).ok();
}

/// Runs a script on every node and waits: the command as JSON.
fn run_wait(server: &Server, name: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "scripts",
        "run",
        name,
        "--targets",
        "all",
        "--wait",
        "-o",
        "json",
    ];
    args.extend(extra);
    server.cli(&args).json()
}

fn dir_of(cmd: &str, node: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/fleetrun-script-{cmd}-{node}"))
}

/// Waits (boundedly) until the run's temp dir is gone from the node's filesystem.
fn wait_removed(dir: &Path) {
    wait_until(
        &format!("{} to be removed", dir.display()),
        Duration::from_secs(20),
        || (!dir.exists()).then_some(()),
    );
}

fn message(inv: &Value) -> String {
    inv["message"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn a_script_with_input_and_output_runs_on_three_nodes_ships_results_and_cleans_up() {
    let server = Server::start();
    let agents: Vec<Agent> = ["sf1", "sf2", "sf3"]
        .iter()
        .map(|n| Agent::start(&server, n, &[]))
        .collect();
    // Several object-store parts and many stream windows.
    let input: Vec<u8> = (0..9 * 1024 * 1024 + 77).map(|i| (i % 251) as u8).collect();
    let input_file = write(&server, "data.bin", &input);
    server
        .cli(&[
            "objects",
            "put",
            input_file.to_str().expect("path"),
            "inputs/data.bin",
        ])
        .ok();
    create(
        &server,
        "digest",
        "d=$(dirname \"$INPUT\")\n\
         sha256sum \"${INPUT}\" | cut -d' ' -f1 > \"$OUTPUT\"\n\
         basename \"$d\" >> \"$OUTPUT\"\n\
         echo \"mode=$(stat -c %a \"$d\") input=$(basename \"$INPUT\")\"\n",
        Some("inputs/data.bin"),
        "out/digest.txt",
    );
    let done = run_wait(&server, "digest", &[]);
    assert_eq!(done["status"], "Success", "{done}");
    let cmd = done["command_id"].as_str().expect("command id").to_owned();
    for inv in invocations(&done) {
        let out = inv["stdout"].as_str().unwrap_or_default();
        assert_eq!(out, "mode=700 input=data.bin\n", "{inv}");
    }

    let ran = server
        .cli(&["scripts", "results", &cmd, "-o", "json"])
        .ok()
        .json();
    let results = ran["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), 3, "{ran}");
    let want_sha = sha256_hex(&input);
    for (i, r) in results.iter().enumerate() {
        let node = r["node_id"].as_str().expect("node");
        let key = r["key"].as_str().expect("key");
        assert_eq!(key, format!("results/{cmd}/{node}/digest.txt"));
        let dest = server.scratch("script-files").join(format!("result-{i}"));
        server
            .cli(&["objects", "get", key, dest.to_str().expect("path")])
            .ok();
        let got = std::fs::read(&dest).expect("downloaded");
        let want = format!("{want_sha}\nfleetrun-script-{cmd}-{node}\n");
        assert_eq!(String::from_utf8_lossy(&got), want);
        assert_eq!(r["size"], got.len() as u64, "{r}");
        assert_eq!(r["sha256"], sha256_hex(&got), "{r}");
        wait_removed(&dir_of(&cmd, node));
    }
    let table = server.cli(&["scripts", "results", &cmd]).ok().stdout_str();
    assert!(
        table.contains("KEY") && table.contains("digest.txt"),
        "{table}"
    );
    drop(agents);
}

/// A missing output, a symlink, a directory and a file over the limit: Failed, saying which,
/// and the dir removed all the same.
#[test]
fn bad_outputs_fail_clearly_and_the_dir_is_removed() {
    let server = Server::start_with(&["--script-output-max", "100"]);
    let _a = Agent::start(&server, "bad-out", &[]);
    let node = server.node_id("bad-out");
    let cases = [
        ("none", "true", "the script wrote no output file at"),
        (
            "link",
            "ln -s /etc/hostname \"$OUTPUT\"",
            "is a symbolic link",
        ),
        ("dir", "mkdir \"$OUTPUT\"", "is a directory"),
        (
            "big",
            "head -c 1000 /dev/zero > \"$OUTPUT\"",
            "is 1000 bytes, more than the 100",
        ),
    ];
    for (name, body, want) in cases {
        create(&server, name, body, None, "result.bin");
        let done = run_wait(&server, name, &[]);
        assert_eq!(done["status"], "Failed", "{name}: {done}");
        let inv = &invocations(&done)[0];
        assert_eq!(inv["status"], "Failed", "{name}: {inv}");
        assert!(message(inv).contains(want), "{name}: {inv}");
        let cmd = done["command_id"].as_str().expect("id");
        let ran = server
            .cli(&["scripts", "results", cmd, "-o", "json"])
            .ok()
            .json();
        assert_eq!(ran["results"], serde_json::json!([]), "{name}: {ran}");
        wait_removed(&dir_of(cmd, &node));
    }
    // An input that is not there: the run ends Failed naming it, nothing runs.
    create(
        &server,
        "no-input",
        "cp \"$INPUT\" \"$OUTPUT\"",
        Some("inputs/never-put.bin"),
        "r",
    );
    let done = run_wait(&server, "no-input", &[]);
    assert_eq!(done["status"], "Failed", "{done}");
    let inv = &invocations(&done)[0];
    assert!(
        message(inv).contains("ScriptInputUnavailable")
            && message(inv).contains("inputs/never-put.bin"),
        "{inv}"
    );
}

#[test]
fn a_timed_out_and_a_cancelled_script_still_clean_up() {
    let server = Server::start();
    let _a = Agent::start(&server, "tc", &[]);
    let node = server.node_id("tc");
    create(&server, "slow", "sleep 30", None, "r.txt");
    let done = run_wait(&server, "slow", &["--execution-timeout", "2"]);
    assert_eq!(done["status"], "TimedOut", "{done}");
    let cmd = done["command_id"].as_str().expect("id");
    wait_removed(&dir_of(cmd, &node));

    create(
        &server,
        "stuck",
        "touch \"$OUTPUT.started\"; sleep 60",
        None,
        "r.txt",
    );
    let cmd = server
        .cli(&["scripts", "run", "stuck", "--targets", "all"])
        .ok()
        .stdout_str()
        .trim()
        .to_owned();
    let dir = dir_of(&cmd, &node);
    let started = dir.join("r.txt.started");
    wait_until("the script to start", Duration::from_secs(20), || {
        started.exists().then_some(())
    });
    server.cli(&["cancel", &cmd]).ok();
    let c = server.wait_terminal(&cmd, Duration::from_secs(20));
    assert_eq!(c["status"], "Cancelled", "{c}");
    wait_removed(&dir);
}

/// A TLS server (openssl's, a real process) serving a directory, for an https:// input.
struct HttpsFiles {
    child: Child,
    port: u16,
}

impl Drop for HttpsFiles {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves `dir` over HTTPS for `localhost` with a certificate of a fresh CA: the server and the
/// CA's PEM file.
fn https_files(dir: &Path) -> (HttpsFiles, PathBuf) {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "script inputs test CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("sans");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer).expect("cert");
    let ca_pem = dir.join("ca.pem");
    std::fs::write(&ca_pem, ca_cert.pem()).expect("ca");
    std::fs::write(dir.join("cert.pem"), cert.pem()).expect("cert");
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("key");
    let port = free_port("127.0.0.1");
    let child = Command::new("openssl")
        .args([
            "s_server", "-quiet", "-WWW", "-cert", "cert.pem", "-key", "key.pem",
        ])
        .args(["-accept", &format!("127.0.0.1:{port}")])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    wait_until(
        "the HTTPS server to listen",
        Duration::from_secs(10),
        || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        },
    );
    (HttpsFiles { child, port }, ca_pem)
}

#[test]
fn an_https_input_is_fetched_once_and_reaches_every_node() {
    let served = tempfile::tempdir().expect("tmp");
    let input = b"an artifact from an internal HTTPS server\n".repeat(1000);
    std::fs::write(served.path().join("tool.bin"), &input).expect("input");
    let (https, ca) = https_files(served.path());
    let server = Server::start_with(&["--script-input-ca", ca.to_str().expect("path")]);
    let _a = Agent::start(&server, "h1", &[]);
    let _b = Agent::start(&server, "h2", &[]);
    let url = format!("https://localhost:{}/tool.bin", https.port);
    create(
        &server,
        "fetched",
        "sha256sum \"$INPUT\" | cut -d' ' -f1 > \"$OUTPUT\"",
        Some(&url),
        "sum.txt",
    );
    let done = run_wait(&server, "fetched", &[]);
    assert_eq!(done["status"], "Success", "{done}");
    let cmd = done["command_id"].as_str().expect("id");
    let ran = server
        .cli(&["scripts", "results", cmd, "-o", "json"])
        .ok()
        .json();
    let results = ran["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), 2, "{ran}");
    let want = format!("{}\n", sha256_hex(&input));
    for r in &results {
        assert_eq!(r["sha256"], sha256_hex(want.as_bytes()), "{r}");
    }
}

/// A server killed while a script runs: after its restart the result is still shipped and the
/// dir removed; an agent killed while one runs: the invocation ends Terminated and the dir goes
/// once the agent is back.
#[test]
fn restarts_mid_run_still_ship_and_clean_up() {
    let mut server = Server::start();
    let mut a = Agent::start(&server, "rs", &[]);
    let node = server.node_id("rs");
    let release = server.scratch("script-files").join("release");
    let body = format!(
        "touch \"$OUTPUT.started\"\n{}\necho shipped > \"$OUTPUT\"\n",
        crate::support::wait_for_file(&release)
    );
    create(&server, "waits", &body, None, "r.txt");
    let start = |server: &Server| {
        server
            .cli(&["scripts", "run", "waits", "--targets", "all"])
            .ok()
            .stdout_str()
            .trim()
            .to_owned()
    };
    let cmd = start(&server);
    let started = dir_of(&cmd, &node).join("r.txt.started");
    wait_until("the script to start", Duration::from_secs(20), || {
        started.exists().then_some(())
    });
    server.restart();
    std::fs::write(&release, b"go").expect("release");
    let c = server.wait_terminal(&cmd, Duration::from_secs(60));
    assert_eq!(c["status"], "Success", "{c}");
    let ran = server
        .cli(&["scripts", "results", &cmd, "-o", "json"])
        .ok()
        .json();
    assert_eq!(ran["results"][0]["size"], 8, "{ran}");
    wait_removed(&dir_of(&cmd, &node));

    std::fs::remove_file(&release).expect("re-arm");
    let cmd = start(&server);
    let started = dir_of(&cmd, &node).join("r.txt.started");
    wait_until("the script to start", Duration::from_secs(20), || {
        started.exists().then_some(())
    });
    a.kill();
    a.restart();
    let c = server.wait_terminal(&cmd, Duration::from_secs(60));
    let inv = &invocations(&c)[0];
    assert_eq!(inv["status_details"], "Terminated", "{c}");
    wait_removed(&dir_of(&cmd, &node));
}
