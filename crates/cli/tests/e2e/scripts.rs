//! Issue 12, saved scripts: create, list, show, update keeping every version, delete; bad input
//! refused with a message naming what is wrong; a viewer reads but cannot write; `scripts run` on
//! real agents by tag and `scripts results`. A real server, real agents, the real CLI.

use crate::support::{Server, run};
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

fn body_file(server: &Server, name: &str, text: &str) -> PathBuf {
    let path = server.scratch("scripts").join(name);
    std::fs::write(&path, text).expect("write body");
    path
}

#[test]
fn scripts_create_list_show_update_keeps_versions_and_delete() {
    let server = Server::start();
    let v1 = body_file(
        &server,
        "v1.sh",
        "tar xzf \"${INPUT}\"\n./collect > \"${OUTPUT}\"\n",
    );
    let v1s = v1.to_str().expect("path");
    let created = server
        .cli(&[
            "scripts",
            "create",
            "collect-logs",
            "--description",
            "Collects logs",
            "--platform",
            "linux",
            "--input",
            "s3://ir-tools/collector.tar.gz",
            "--output-path",
            "result/logs.tar",
            "--file",
            v1s,
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(created["version"], 1, "{created}");
    assert_eq!(created["latest_version"], 1);
    assert_eq!(created["platform"], "linux");
    assert_eq!(created["input"], "s3://ir-tools/collector.tar.gz");
    assert_eq!(created["output"], "result/logs.tar");
    assert_eq!(created["created_by"], "admin");
    assert_eq!(created["sha256"].as_str().map(str::len), Some(64));

    // The same name again: a conflict naming the way to add a version.
    let again = server.cli(&[
        "scripts",
        "create",
        "collect-logs",
        "--platform",
        "linux",
        "--file",
        v1s,
    ]);
    let line = again.one_line_error();
    assert!(line.contains("exists"), "{line}");

    // An update replaces what it names and keeps the rest; version 1 stays as it was.
    let v2 = body_file(&server, "v2.sh", "echo v2 > \"${OUTPUT}\"\n");
    let updated = server
        .cli(&[
            "scripts",
            "update",
            "collect-logs",
            "--file",
            v2.to_str().expect("path"),
            "--input",
            "inputs/collector.tar.gz",
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(updated["version"], 2, "{updated}");
    assert_eq!(updated["input"], "inputs/collector.tar.gz");
    assert_eq!(updated["output"], "result/logs.tar", "kept from version 1");
    assert_eq!(updated["description"], "Collects logs");

    let latest = server.cli(&["scripts", "show", "collect-logs"]).ok();
    assert_eq!(latest.stdout_str(), "echo v2 > \"${OUTPUT}\"\n");
    let first = server
        .cli(&[
            "scripts",
            "show",
            "collect-logs",
            "--version",
            "1",
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(first["version"], 1);
    assert_eq!(first["latest_version"], 2);
    assert_eq!(first["input"], "s3://ir-tools/collector.tar.gz");
    assert_eq!(
        first["body"],
        "tar xzf \"${INPUT}\"\n./collect > \"${OUTPUT}\"\n"
    );
    let missing = server.cli(&["scripts", "show", "collect-logs", "--version", "9"]);
    assert!(
        missing.one_line_error().contains("no version 9"),
        "{}",
        missing.stderr
    );

    // Listing: latest versions, no bodies, by name, in pages.
    let b = body_file(&server, "b.sh", "uptime\n");
    server
        .cli(&[
            "scripts",
            "create",
            "a-first",
            "--platform",
            "linux",
            "--file",
            b.to_str().expect("path"),
        ])
        .ok();
    let list = server.cli(&["scripts", "list", "-o", "json"]).ok().json();
    let names: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["a-first", "collect-logs"]);
    assert_eq!(list[1]["version"], 2);
    assert!(list[1].get("body").is_none(), "{list}");
    let page = server
        .cli(&[
            "scripts", "list", "--after", "a-first", "--limit", "1", "-o", "json",
        ])
        .ok()
        .json();
    assert_eq!(page.as_array().map(Vec::len), Some(1));
    assert_eq!(page[0]["name"], "collect-logs");
    let table = server.cli(&["scripts", "list"]).ok().stdout_str();
    assert!(
        table.starts_with("NAME") && table.contains("collect-logs") && table.contains("linux"),
        "{table}"
    );

    // Every change is in the audit trail, naming the script.
    for action in ["scripts.create", "scripts.update"] {
        let recs = server.get_json(&format!("/v1/audit?action={action}"));
        assert!(
            recs.as_array().is_some_and(|r| !r.is_empty()),
            "{action}: {recs}"
        );
    }

    // Delete takes every version.
    let out = server.cli(&["scripts", "delete", "collect-logs"]).ok();
    assert!(out.stdout_str().contains("deleted"));
    for v in ["1", "2"] {
        let r = server.get(&format!("/v1/scripts/collect-logs?version={v}"));
        assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["error"]["code"], "ScriptNotFound");
    }
    let gone = server.cli(&["scripts", "delete", "collect-logs"]);
    assert!(
        gone.one_line_error()
            .contains("no script named collect-logs")
    );
    let recs = server.get_json("/v1/audit?action=scripts.delete");
    assert!(recs.as_array().is_some_and(|r| r.len() == 2), "{recs}");
}

#[test]
fn scripts_bad_input_is_refused_with_what_is_wrong() {
    let server = Server::start();
    let ok = body_file(&server, "ok.sh", "echo ok\n");
    let oks = ok.to_str().expect("path");
    let cases: &[(&[&str], &str)] = &[
        (
            &["bad name!", "--platform", "linux"],
            "not allowed (letters, digits",
        ),
        (&["w", "--platform", "windows"], "allowed: linux"),
        (
            &["o", "--platform", "linux", "--output-path", "../etc/x"],
            "`..`",
        ),
        (
            &["o", "--platform", "linux", "--output-path", "/tmp/x"],
            "absolute",
        ),
        (
            &["u", "--platform", "linux", "--input", "ftp://h/x"],
            "input: bad URI",
        ),
        (
            &["u", "--platform", "linux", "--input", "s3://Bad_Bucket/k"],
            "bucket",
        ),
        (
            &["u", "--platform", "linux", "--input", "s3://bucket"],
            "no key",
        ),
    ];
    for (args, want) in cases {
        let mut a = vec!["scripts", "create"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--file", oks]);
        let out = server.cli(&a);
        let line = out.one_line_error();
        assert!(line.contains(want), "{args:?}: {line}");
        assert!(line.contains("InvalidScript"), "{args:?}: {line}");
    }
    let long = "d".repeat(1025);
    let out = server.cli(&[
        "scripts",
        "create",
        "d",
        "--platform",
        "linux",
        "--description",
        &long,
        "--file",
        oks,
    ]);
    assert!(out.one_line_error().contains("description: at most 1024"));

    // A body over 64 KiB: the CLI refuses before sending, the API on its own.
    let big = "x".repeat(64 * 1024 + 1);
    let path = body_file(&server, "big.sh", &big);
    let out = server.cli(&[
        "scripts",
        "create",
        "big",
        "--platform",
        "linux",
        "--file",
        path.to_str().expect("path"),
    ]);
    assert!(
        out.one_line_error().contains("over 65536 bytes"),
        "{}",
        out.stderr
    );
    let body = json!({"name": "big", "platform": "linux", "body": big});
    let r = server.post_json("/v1/scripts", &body);
    assert_eq!(r.status, 400);
    let e = r.json();
    assert_eq!(e["error"]["code"], "InvalidScript", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("body: at most 65536 bytes")),
        "{e}"
    );
    // Unknown members and a bad version are refused too, never a 500.
    let r = server.post_json(
        "/v1/scripts",
        &json!({"name": "x", "platform": "linux", "body": "true", "shell": "zsh"}),
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    for q in [
        "?version=0",
        "?version=x",
        "?version=99999999999999999999",
        "?v=1",
    ] {
        let r = server.get(&format!("/v1/scripts/x{q}"));
        assert_eq!(r.status, 400, "{q}: {}", String::from_utf8_lossy(&r.body));
    }
    let r = server.get("/v1/scripts?limit=0");
    assert_eq!(r.status, 400);
    // Hostile names in the path and bodies that are not a script: 400 naming the problem.
    let long = format!("/v1/scripts/{}", "n".repeat(129));
    for path in [long.as_str(), "/v1/scripts/..%2Fetc", "/v1/scripts/a%00b"] {
        let r = server.get(path);
        assert_eq!(
            r.status,
            400,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["error"]["code"], "InvalidScript", "{path}");
    }
    let r = server
        .http(
            "POST",
            "/v1/scripts",
            Some(&server.token),
            Some(("application/json", b"{\"name\": ".to_vec())),
        )
        .expect("answer");
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let r = server.post_json(
        "/v1/scripts",
        &json!({"name": "nul", "platform": "linux", "body": "true", "output": "a\u{0}b"}),
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    // Nothing was stored.
    let list = server.get_json("/v1/scripts");
    assert_eq!(list, json!([]));
    // An update's members are checked as a create's.
    server
        .cli(&[
            "scripts",
            "create",
            "s",
            "--platform",
            "linux",
            "--file",
            oks,
        ])
        .ok();
    let out = server.cli(&["scripts", "update", "s", "--output-path", "a/../../b"]);
    assert!(out.one_line_error().contains("`..`"), "{}", out.stderr);
    let out = server.cli(&["scripts", "update", "s"]);
    assert!(out.one_line_error().contains("nothing to change"));
    let latest = server.get_json("/v1/scripts/s");
    assert_eq!(
        latest["latest_version"], 1,
        "refused updates add no version"
    );
}

#[test]
fn scripts_viewer_reads_but_cannot_write() {
    let server = Server::start();
    let ok = body_file(&server, "ok.sh", "echo ok\n");
    let oks = ok.to_str().expect("path");
    server
        .cli(&[
            "scripts",
            "create",
            "s",
            "--platform",
            "linux",
            "--file",
            oks,
        ])
        .ok();
    server
        .cli(&["users", "create", "vic", "--role", "viewer"])
        .ok();
    let t = server
        .cli(&["tokens", "create", "--user", "vic", "-o", "json"])
        .ok()
        .json();
    let token = t["token"].as_str().unwrap_or_default().to_owned();
    let as_vic = |args: &[&str]| {
        let mut c = server.cli_cmd(args);
        c.env("FLEETRUN_TOKEN", &token);
        run(c, Duration::from_secs(30))
    };
    let out = as_vic(&[
        "scripts",
        "create",
        "t",
        "--platform",
        "linux",
        "--file",
        oks,
    ]);
    let line = out.one_line_error();
    assert!(
        line.contains("AccessDenied") && line.contains("manage-scripts"),
        "{line}"
    );
    let r = server
        .http(
            "POST",
            "/v1/scripts",
            Some(&token),
            Some((
                "application/json",
                br#"{"name":"t","platform":"linux","body":"true"}"#.to_vec(),
            )),
        )
        .expect("answer");
    assert_eq!(r.status, 403);
    for (method, path) in [("PUT", "/v1/scripts/s"), ("DELETE", "/v1/scripts/s")] {
        let r = server
            .http(
                method,
                path,
                Some(&token),
                Some(("application/json", br#"{"body":"false"}"#.to_vec())),
            )
            .expect("answer");
        assert_eq!(r.status, 403, "{method} {path}");
    }
    // Reading is allowed.
    assert_eq!(
        as_vic(&["scripts", "show", "s"]).ok().stdout_str(),
        "echo ok\n"
    );
    let list = as_vic(&["scripts", "list", "-o", "json"]).ok().json();
    assert_eq!(list[0]["name"], "s");
    assert_eq!(server.get_json("/v1/scripts/s")["latest_version"], 1);
    let refused = server.get_json("/v1/audit?action=scripts.create&principal=vic");
    assert_eq!(refused[0]["result"], "403 AccessDenied", "{refused}");
}

/// `scripts run` on real agents by tag: the version asked runs as a command (`--wait` shows each
/// node's outcome, the output is the command's), and `scripts results` names the version.
#[test]
fn scripts_run_runs_a_version_on_nodes_by_tag_and_results_name_it() {
    use crate::support::{Agent, invocations};
    let server = Server::start();
    let _web1 = Agent::start(&server, "web1", &[("role", "web")]);
    let _web2 = Agent::start(&server, "web2", &[("role", "web")]);
    let _db = Agent::start(&server, "db1", &[("role", "db")]);
    let v1 = body_file(&server, "hello1.sh", "echo \"v1 on $(hostname)\"\n");
    let v2 = body_file(&server, "hello2.sh", "echo v2\nexit 3\n");
    let (v1s, v2s) = (v1.to_str().expect("path"), v2.to_str().expect("path"));
    server
        .cli(&[
            "scripts",
            "create",
            "hello",
            "--platform",
            "linux",
            "--file",
            v1s,
        ])
        .ok();
    server
        .cli(&["scripts", "update", "hello", "--file", v2s])
        .ok();

    let done = server
        .cli(&[
            "scripts",
            "run",
            "hello",
            "--version",
            "1",
            "--targets",
            "tag:role=web",
            "--max-concurrency",
            "1",
            "--wait",
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(done["status"], "Success", "{done}");
    let invs = invocations(&done);
    assert_eq!(invs.len(), 2, "the two web nodes only: {done}");
    for inv in &invs {
        assert_eq!(inv["status"], "Success", "{inv}");
        let out = inv["stdout"].as_str().unwrap_or_default();
        assert!(out.starts_with("v1 on "), "version 1 ran: {out:?}");
    }
    let id = done["command_id"].as_str().expect("command id");
    let ran = server
        .cli(&["scripts", "results", id, "-o", "json"])
        .ok()
        .json();
    assert_eq!(ran["name"], "hello");
    assert_eq!(ran["version"], 1);
    assert_eq!(
        server.cli(&["scripts", "results", id]).ok().stdout_str(),
        format!("command {id} ran script hello version 1\n")
    );

    // The latest version by default; its failure is the run's exit status.
    let failed = server.cli(&[
        "scripts",
        "run",
        "hello",
        "--targets",
        "tag:role=db",
        "--wait",
    ]);
    assert_eq!(failed.code(), Some(1), "{}", failed.stdout_str());
    // Bad input is refused before anything is sent, naming the flag.
    let bad = server.cli(&["scripts", "run", "hello"]);
    assert!(
        bad.one_line_error()
            .contains("--node NODE_ID or --targets EXPR"),
        "{}",
        bad.one_line_error()
    );
    let bad = server.cli(&[
        "scripts",
        "run",
        "hello",
        "--targets",
        "all",
        "--max-errors",
        "x",
    ]);
    assert!(
        bad.one_line_error().contains("--max-errors"),
        "{}",
        bad.one_line_error()
    );
    let missing = server.cli(&["scripts", "run", "nope", "--targets", "all"]);
    assert!(
        missing.one_line_error().contains("no script named nope"),
        "{}",
        missing.one_line_error()
    );
    let audit = server.get_json("/v1/audit?action=scripts.run");
    assert!(
        audit.as_array().is_some_and(|a| a.len() >= 2),
        "every run is audited: {audit}"
    );
}
