//! Run-as and resource limits: `send --run-as`, `--memory-limit`, `--cpu-limit` end to end (the agent
//! runs as root here, as it must to switch users and create cgroups).

use crate::support::{Agent, Server, invocations};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn has(program: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Sends a script with flags and waits; returns the command JSON (exit status not checked).
fn send_wait(server: &Server, flags: &[&str], script: &str) -> serde_json::Value {
    let mut args = vec!["send", "--targets", "all", "--wait", "-o", "json"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", script]);
    server.cli(&args).json()
}

#[test]
fn run_as_switches_user_and_names_an_unknown_one() {
    let server = Server::start();
    let _a = Agent::start(&server, "a", &[]);
    if !is_root() {
        // Not skipped: an agent that is not root must refuse run-as and say why.
        let c = send_wait(&server, &["--run-as", "nobody"], "id -u");
        let inv = &invocations(&c)[0];
        assert_eq!(inv["status"], "Failed", "{c}");
        let msg = inv["message"].as_str().unwrap_or_default();
        assert!(msg.contains("needs the agent to run as root"), "{inv}");
        return;
    }
    let c = send_wait(&server, &["--run-as", "nobody"], "id -u; id -g");
    let inv = &invocations(&c)[0];
    assert_eq!(inv["status"], "Success", "{c}");
    let nobody_gid = std::process::Command::new("id")
        .args(["-g", "nobody"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    assert_eq!(inv["stdout"], format!("65534\n{nobody_gid}\n"), "{inv}");
    assert_eq!(c["run_as"], "nobody");
    let header = server
        .cli(&["command", c["command_id"].as_str().expect("id")])
        .ok()
        .stdout_str();
    assert!(header.contains("run as:       nobody"), "{header}");

    let c = send_wait(&server, &["--run-as", "no_such_user_x"], "id -u");
    let inv = &invocations(&c)[0];
    assert_eq!(inv["status"], "Failed", "{c}");
    let said = format!(
        "{} {} {}",
        inv["message"], inv["stderr"], inv["status_details"]
    );
    assert!(
        said.contains("no_such_user_x"),
        "the failure does not name the user: {inv}"
    );
    assert_eq!(inv["stdout"], "", "{inv}");
}

#[test]
fn memory_limit_kills_a_hog_and_says_so() {
    let server = Server::start();
    let _a = Agent::start(&server, "a", &[]);
    let hog = if has("python3") {
        "python3 -c 'b = bytearray(300 * 1024 * 1024); print(len(b))'"
    } else {
        // `tail -n 1` keeps its whole input when it has no newline.
        "head -c 300M /dev/zero | tail -n 1 | wc -c"
    };
    let c = send_wait(&server, &["--memory-limit", "64M"], hog);
    assert_eq!(c["memory_limit_mb"], 64);
    let inv = &invocations(&c)[0];
    eprintln!("memory limit applied with {}", inv["limits_applied"]);
    assert_eq!(inv["status"], "Failed", "{c}");
    assert_eq!(inv["status_details"], "Memory Limit Exceeded", "{inv}");
    let how = inv["limits_applied"].as_str().unwrap_or("");
    assert!(
        how == "cgroup1" || how == "cgroup2",
        "limits_applied {how:?}: {inv}"
    );
    let table = server
        .cli(&["invocations", c["command_id"].as_str().expect("id")])
        .ok()
        .stdout_str();
    assert!(table.contains("LIMITS") && table.contains(how), "{table}");
    let header = server
        .cli(&["command", c["command_id"].as_str().expect("id")])
        .ok()
        .stdout_str();
    assert!(header.contains("memory 64 MiB"), "{header}");
}

#[test]
fn cpu_limit_holds_a_busy_loop_to_its_share() {
    let server = Server::start();
    let _a = Agent::start(&server, "a", &[]);
    let spin = if has("python3") {
        "python3 -c 'import time\nt = time.time()\nwhile time.time() - t < 1.5: pass'"
    } else {
        "end=$(($(date +%s) + 2)); while [ $(date +%s) -lt $end ]; do :; done"
    };
    let c = send_wait(&server, &["--cpu-limit", "50%"], spin);
    assert_eq!(c["cpu_limit_percent"], 50);
    let inv = &invocations(&c)[0];
    assert_eq!(inv["status"], "Success", "{c}");
    let how = inv["limits_applied"].as_str().unwrap_or("");
    assert!(
        !how.is_empty() && how != "none",
        "limits_applied {how:?}: {inv}"
    );
    let cpu = inv["cpu_user_ms"].as_u64().unwrap_or(0) + inv["cpu_system_ms"].as_u64().unwrap_or(0);
    let wall = inv["wall_ms"].as_u64().expect("wall_ms");
    eprintln!("cpu limit 50% with {how}: cpu {cpu} ms over {wall} ms");
    assert!(wall >= 1_000, "{inv}");
    assert!(
        cpu as f64 <= 0.75 * wall as f64,
        "cpu {cpu} ms > 0.75 x wall {wall} ms"
    );
}
