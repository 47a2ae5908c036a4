//! `fleetrun dev`: server and agent in one process; the CLI then works from the written config alone,
//! and Ctrl-C stops it cleanly.

use crate::support::{fleetrun_bin, run, wait_until};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `fleetrun dev` and waits until it prints its hints; the process and what it printed.
fn start_dev(dir: &Path, config: &Path) -> (Kill, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut child = Command::new(fleetrun_bin())
        .args(["dev", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("FLEETRUN_CONFIG", config)
        .env_remove("FLEETRUN_SERVER")
        .env_remove("FLEETRUN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("dev.log")).expect("log"))
        .spawn()
        .expect("spawn fleetrun dev");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut child = Kill(child);
    let printed = Arc::new(Mutex::new(Vec::new()));
    let sink = printed.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().expect("lock").extend_from_slice(&buf[..n]);
        }
    });
    let text = wait_until("fleetrun dev to be ready", Duration::from_secs(20), || {
        if let Ok(Some(st)) = child.0.try_wait() {
            panic!(
                "fleetrun dev exited with {st}: {}",
                std::fs::read_to_string(dir.join("dev.log")).unwrap_or_default()
            );
        }
        let text = String::from_utf8_lossy(&printed.lock().expect("lock")).into_owned();
        text.contains("fleetrun send").then_some(text)
    });
    (child, text)
}

#[test]
fn dev_starts_everything_and_writes_the_cli_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    let (child, text) = start_dev(dir.path(), &config);
    assert!(text.contains("is Online"), "{text}");
    let written = std::fs::read_to_string(&config).expect("config written");
    // The dev server speaks TLS; the CLI trusts its CA through the config file.
    assert!(
        written.contains("token") && written.contains("ca_cert") && written.contains("https://"),
        "{written}"
    );

    // The CLI finds server and token in the config file alone.
    let mut c = Command::new(fleetrun_bin());
    c.args([
        "send",
        "--targets",
        "all",
        "--wait",
        "-o",
        "json",
        "--",
        "echo",
        "from-dev",
    ])
    .env("FLEETRUN_CONFIG", &config)
    .env_remove("FLEETRUN_SERVER")
    .env_remove("FLEETRUN_TOKEN");
    let out = run(c, Duration::from_secs(60)).ok();
    let cmd = out.json();
    assert_eq!(cmd["invocations"][0]["stdout"], "from-dev\n", "{cmd}");
    let node_name = cmd["invocations"][0]["node_name"].clone();
    assert_eq!(
        node_name
            .as_str()
            .map(|n| n.starts_with("dev-") || n == "local"),
        Some(true)
    );

    // Ctrl-C (SIGINT) shuts it down in order, exiting 0.
    let mut child = child;
    crate::support::signal(child.0.id(), libc::SIGINT);
    let status = wait_until(
        "fleetrun dev to exit on SIGINT",
        Duration::from_secs(30),
        || child.0.try_wait().expect("wait for fleetrun dev"),
    );
    assert_eq!(status.code(), Some(0), "exit status {status}");

    // A second start reuses the data dir: same node, no new activation needed.
    drop(child);
    let (_child, text) = start_dev(dir.path(), &config);
    assert!(text.contains("is Online"), "{text}");
    let mut c = Command::new(fleetrun_bin());
    c.args(["nodes", "-o", "json"])
        .env("FLEETRUN_CONFIG", &config)
        .env_remove("FLEETRUN_SERVER")
        .env_remove("FLEETRUN_TOKEN");
    let nodes = run(c, Duration::from_secs(30)).ok().json();
    let nodes = nodes.as_array().expect("array");
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0]["name"], node_name);
}
