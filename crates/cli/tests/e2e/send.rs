//! Enrolment, the node list, and sending commands by id, by tag and to all.

use crate::support::{Agent, Server, invocations, run_input};
use std::time::Duration;

#[test]
fn enrol_with_cli_activation_and_list_nodes() {
    let server = Server::start();
    let created = server
        .cli(&[
            "activation",
            "create",
            "--tag",
            "env=test",
            "--limit",
            "2",
            "--expires",
            "1h",
            "--description",
            "e2e",
            "-o",
            "json",
        ])
        .ok()
        .json();
    let code = created["code"].as_str().expect("code").to_owned();
    assert!(!code.is_empty());
    assert_eq!(created["limit"], 2);
    assert_eq!(created["tags"]["env"], "test");

    let _agent = Agent::start_with_code(&server, "alpha", &[("role", "web")], &code);
    server.wait_online("alpha");

    let nodes = server.cli(&["nodes", "-o", "json"]).ok().json();
    let nodes = nodes.as_array().expect("array");
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    let n = &nodes[0];
    assert!(
        n["node_id"].as_str().is_some_and(|s| s.starts_with("mi-")),
        "{n}"
    );
    assert_eq!(n["name"], "alpha");
    assert_eq!(n["ping_status"], "Online");
    assert_eq!(
        n["tags"]["env"], "test",
        "activation tags reach the node: {n}"
    );
    assert_eq!(n["tags"]["role"], "web", "agent tags reach the node: {n}");

    let table = server.cli(&["nodes"]).ok().stdout_str();
    assert!(table.starts_with("NODE ID"), "{table}");
    assert!(
        table.contains("alpha") && table.contains("Online"),
        "{table}"
    );

    let list = server
        .cli(&["activation", "list", "-o", "json"])
        .ok()
        .json();
    let a = &list.as_array().expect("array")[0];
    assert_eq!(a["registrations"], 1);
    assert_eq!(a["code"], "", "codes are not listed: {a}");
    let table = server.cli(&["activation", "list"]).ok().stdout_str();
    assert!(table.contains("1/2"), "{table}");
}

#[test]
fn send_by_id_by_tag_and_to_all() {
    let server = Server::start();
    let web = Agent::start(&server, "web1", &[("role", "web")]);
    let _db = Agent::start(&server, "db1", &[("role", "db")]);
    let web_id = server.wait_online(&web.name)["node_id"]
        .as_str()
        .expect("id")
        .to_owned();

    // By id.
    let c = server
        .cli(&[
            "send",
            "--node",
            &web_id,
            "--wait",
            "-o",
            "json",
            "--",
            "echo",
            "hello-$((1+1))",
        ])
        .ok()
        .json();
    assert_eq!(c["status"], "Success", "{c}");
    let inv = invocations(&c);
    assert_eq!(inv.len(), 1);
    assert_eq!(inv[0]["node_id"], web_id.as_str());
    assert_eq!(inv[0]["status"], "Success");
    assert_eq!(inv[0]["exit_code"], 0);
    assert_eq!(inv[0]["stdout"], "hello-2\n");
    assert_eq!(c["parameters"]["commands"][0], "echo hello-$((1+1))");

    // By tag.
    let c = server
        .cli(&[
            "send",
            "--targets",
            "tag:role=db",
            "--wait",
            "-o",
            "json",
            "--",
            "hostname >/dev/null; echo db",
        ])
        .ok()
        .json();
    let inv = invocations(&c);
    assert_eq!(inv.len(), 1, "{c}");
    assert_eq!(inv[0]["node_name"], "db1");
    assert_eq!(inv[0]["stdout"], "db\n");

    // To all, with the table summary.
    let out = server
        .cli(&[
            "send",
            "--targets",
            "all",
            "--wait",
            "--comment",
            "both",
            "--",
            "echo",
            "hi",
        ])
        .ok();
    let table = out.stdout_str();
    assert!(table.contains("web1") && table.contains("db1"), "{table}");
    let ok_rows = table
        .lines()
        .filter(|l| (l.contains("web1") || l.contains("db1")) && l.contains("Success"))
        .count();
    assert_eq!(ok_rows, 2, "{table}");

    // Without --wait: the id only, then the listing commands.
    let out = server.cli(&["send", "--targets", "all", "--", "true"]).ok();
    let id = out.stdout_str().trim().to_owned();
    assert_eq!(id.len(), 36, "{id:?}");
    server.wait_terminal(&id, Duration::from_secs(20));

    let list = server.cli(&["commands", "-o", "json"]).ok().json();
    let list = list.as_array().expect("array");
    assert_eq!(list.len(), 4);
    assert_eq!(list[0]["command_id"], id.as_str(), "newest first");
    let list = server
        .cli(&["commands", "--limit", "2", "-o", "json"])
        .ok()
        .json();
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    // The next page starts after the last id of this one; a table says how to get it.
    let next = server
        .cli(&[
            "commands",
            "--limit",
            "2",
            "--before",
            list[1]["command_id"].as_str().unwrap_or_default(),
            "-o",
            "json",
        ])
        .ok()
        .json();
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|c| c["command_id"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let all = server.cli(&["commands", "-o", "json"]).ok().json();
    assert_eq!(ids(&next), ids(&all)[2..4].to_vec());
    let page = server.cli(&["commands", "--limit", "2"]).ok();
    assert!(
        page.stderr.contains(&format!(
            "--before {}",
            list[1]["command_id"].as_str().unwrap_or_default()
        )),
        "{}",
        page.stderr
    );
    let table = server.cli(&["commands"]).ok().stdout_str();
    assert!(
        table.starts_with("COMMAND ID") && table.contains(&id),
        "{table}"
    );

    let invs = server.cli(&["invocations", &id, "-o", "json"]).ok().json();
    assert_eq!(invs.as_array().map(Vec::len), Some(2));
    let table = server.cli(&["invocations", &id]).ok().stdout_str();
    assert!(
        table.contains("CPU USER ms") && table.contains("web1"),
        "{table}"
    );
    let show = server.cli(&["command", &id]).ok().stdout_str();
    assert!(show.contains(&id) && show.contains("Success"), "{show}");
    let show = server.cli(&["command", &id, "-o", "json"]).ok().json();
    assert_eq!(invocations(&show).len(), 2);
}

#[test]
fn non_zero_exit_is_failed_and_the_cli_exits_1() {
    let server = Server::start();
    let _a = Agent::start(&server, "a", &[]);
    let out = server.cli(&[
        "send",
        "--targets",
        "all",
        "--wait",
        "-o",
        "json",
        "--",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(out.code(), Some(1), "stderr: {}", out.stderr);
    let c = out.json();
    assert_eq!(c["status"], "Failed", "{c}");
    let inv = &invocations(&c)[0];
    assert_eq!(inv["status"], "Failed");
    assert_eq!(inv["exit_code"], 3);
    assert_eq!(inv["stdout"], "out\n");
    assert_eq!(inv["stderr"], "err\n");

    // A script file: its lines become the commands.
    let script = server.dir.path().join("script.sh");
    std::fs::write(&script, "x=41\necho $((x+1))\n").expect("write script");
    let c = server
        .cli(&[
            "send",
            "--targets",
            "all",
            "--wait",
            "-o",
            "json",
            "--file",
            script.to_str().expect("utf-8 path"),
        ])
        .ok()
        .json();
    assert_eq!(invocations(&c)[0]["stdout"], "42\n", "{c}");
    assert_eq!(
        c["parameters"]["commands"].as_array().map(Vec::len),
        Some(2)
    );

    // `--file -` reads the script from stdin.
    let out = run_input(
        server.cli_cmd(&[
            "send",
            "--targets",
            "all",
            "--wait",
            "-o",
            "json",
            "--file",
            "-",
        ]),
        Some(b"echo one\necho two\n"),
        Duration::from_secs(60),
    )
    .ok();
    assert_eq!(invocations(&out.json())[0]["stdout"], "one\ntwo\n");

    // `--working-dir` sets where the script runs.
    let wd = server.scratch("wd");
    let c = server
        .cli(&[
            "send",
            "--targets",
            "all",
            "--wait",
            "-o",
            "json",
            "--working-dir",
            wd.to_str().expect("utf-8"),
            "--",
            "pwd",
        ])
        .ok()
        .json();
    assert_eq!(invocations(&c)[0]["stdout"], format!("{}\n", wd.display()));
}
