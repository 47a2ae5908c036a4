//! Bad input gets one clear line and a non-zero exit, from the CLI and from the raw API (4xx JSON).

use crate::support::{Agent, Http, Server, fleetrun_bin, http, run};
use serde_json::json;
use std::process::Command;
use std::time::Duration;

const UNKNOWN_CMD: &str = "0b5c1a8e-9d0f-4a6e-8f3e-2c1d0e9f8a7b";
const UNKNOWN_NODE: &str = "mi-00000000000000000";

#[test]
fn cli_rejects_bad_arguments_with_one_line() {
    let server = Server::start();
    for (args, needle) in [
        (
            &["send", "--targets", "color:red", "--", "true"][..],
            "unknown target term",
        ),
        (
            &["send", "--targets", "tag:env", "--", "true"],
            "tag:KEY=VALUE",
        ),
        (
            &[
                "send",
                "--targets",
                "all",
                "--max-concurrency",
                "101%",
                "--",
                "true",
            ],
            "max-concurrency",
        ),
        (
            &[
                "send",
                "--targets",
                "all",
                "--max-errors",
                "-1",
                "--",
                "true",
            ],
            "max-errors",
        ),
        (
            &[
                "send",
                "--targets",
                "all",
                "--execution-timeout",
                "999999",
                "--",
                "true",
            ],
            "--execution-timeout",
        ),
        (
            &["send", "--node", "mi-123", "--", "true"],
            "invalid node id",
        ),
        (&["send", "--", "true"], "--targets"),
        (&["command", "not-a-uuid"], "invalid command id"),
        (&["output", UNKNOWN_CMD, "i-123"], "invalid node id"),
        (&["activation", "create", "--tag", "novalue"], "KEY=VALUE"),
        (&["activation", "create", "--expires", "soon"], "--expires"),
    ] {
        let out = server.cli(args);
        let line = out.one_line_error();
        assert!(line.contains(needle), "{args:?}: {line}");
    }
}

// The CLI runs the server's own send checks (fleetrun_proto::send) before any request: it refuses
// what the server refuses, with the server's message. Before, the CLI took a run-as of 256 chars of
// anything, any working directory, and a NUL in the script.
#[test]
fn cli_refuses_what_the_server_refuses_with_the_same_message() {
    let server = Server::start();
    let nul_script = server.scratch("nul").join("script.sh");
    std::fs::write(&nul_script, b"echo a\0b\n").expect("write script");
    let nul_path = nul_script.display().to_string();
    let long_prefix = "p".repeat(501);
    for (args, body, flag) in [
        (
            &["--run-as", "a b", "--", "true"][..],
            json!({"targets": "all", "commands": ["true"], "run_as": "a b"}),
            "--run-as: ",
        ),
        (
            &["--working-dir", "tmp", "--", "true"],
            json!({"targets": "all", "commands": ["true"], "working_directory": "tmp"}),
            "--working-dir: ",
        ),
        (
            &["--file", &nul_path],
            json!({"targets": "all", "commands": ["echo a\0b"]}),
            "",
        ),
        (
            &["--output-s3-bucket", "Bad_Bucket", "--", "true"],
            json!({"targets": "all", "commands": ["true"], "output_s3_bucket": "Bad_Bucket"}),
            "--output-s3-bucket: ",
        ),
        (
            &[
                "--output-s3-bucket",
                "out",
                "--output-s3-prefix",
                &long_prefix,
                "--",
                "true",
            ],
            json!({"targets": "all", "commands": ["true"], "output_s3_bucket": "out", "output_s3_prefix": long_prefix}),
            "--output-s3-prefix: ",
        ),
    ] {
        let api = server.post_json("/v1/commands", &body);
        assert_eq!(api.status, 400, "{body}: {}", api.json());
        let api = api.json();
        assert_eq!(api["error"]["code"], "InvalidParameters", "{api}");
        let message = api["error"]["message"].as_str().expect("message");

        // A server that cannot be reached: only a refusal made before any request gets this far.
        let mut cli = server.cli_cmd(&["send", "--targets", "all"]);
        cli.args(args).env("FLEETRUN_SERVER", "https://127.0.0.1:1");
        let line = run(cli, Duration::from_secs(30)).one_line_error();
        assert_eq!(line, format!("error: {flag}{message}"), "{args:?}");
    }
}

#[test]
fn server_side_errors_are_one_line_with_their_code() {
    let server = Server::start();
    for args in [
        &["command", UNKNOWN_CMD][..],
        &["invocations", UNKNOWN_CMD],
        &["output", UNKNOWN_CMD, UNKNOWN_NODE],
        &["cancel", UNKNOWN_CMD],
        &["send", "--node", UNKNOWN_NODE, "--", "true"],
    ] {
        let out = server.cli(args);
        let line = out.one_line_error();
        assert!(
            line.ends_with(')'),
            "{args:?}: expected `error: MESSAGE (CODE)`, got {line}"
        );
    }
    // A tag that matches no node: the server may refuse it or record a command that ran nowhere; either
    // way `--wait` must not report success.
    let out = server.cli(&[
        "send",
        "--targets",
        "tag:env=none",
        "--wait",
        "-o",
        "json",
        "--",
        "true",
    ]);
    assert_ne!(out.code(), Some(0), "stdout: {}", out.stdout_str());
}

#[test]
fn missing_or_wrong_credentials() {
    let server = Server::start();
    let no_config = server.dir.path().join("absent.toml");

    let mut c = server.cli_cmd(&["nodes"]);
    c.env_remove("FLEETRUN_TOKEN")
        .env("FLEETRUN_CONFIG", &no_config);
    let line = run(c, Duration::from_secs(30)).one_line_error();
    assert!(
        line.contains("--token") && line.contains("fleetrun dev"),
        "{line}"
    );

    let mut c = server.cli_cmd(&["nodes"]);
    c.env_remove("FLEETRUN_SERVER")
        .env("FLEETRUN_CONFIG", &no_config);
    let line = run(c, Duration::from_secs(30)).one_line_error();
    assert!(line.contains("--server"), "{line}");

    let line = server.cli(&["nodes", "--token", "wrong"]).one_line_error();
    assert!(line.contains("Unauthorized"), "{line}");

    // The config file fills in what flags and env leave out; flags win over it.
    let cfg = server.dir.path().join("cfg.toml");
    std::fs::write(
        &cfg,
        format!(
            "server = \"{}\"\ntoken = \"{}\"\n",
            server.url, server.token
        ),
    )
    .expect("write config");
    let mut c = server.cli_cmd(&["nodes", "-o", "json"]);
    c.env_remove("FLEETRUN_TOKEN")
        .env_remove("FLEETRUN_SERVER")
        .env("FLEETRUN_CONFIG", &cfg);
    run(c, Duration::from_secs(30)).ok();
    let mut c = server.cli_cmd(&["nodes", "--token", "wrong"]);
    c.env_remove("FLEETRUN_TOKEN").env("FLEETRUN_CONFIG", &cfg);
    run(c, Duration::from_secs(30)).one_line_error();

    // Nobody listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let line = server
        .cli(&["nodes", "--server", &format!("http://127.0.0.1:{port}")])
        .one_line_error();
    assert!(line.contains("cannot reach server at"), "{line}");
}

#[test]
fn usage_errors_exit_2() {
    let out = run(
        {
            let mut c = Command::new(fleetrun_bin());
            c.args(["send", "--bogus"]);
            c
        },
        Duration::from_secs(30),
    );
    assert_eq!(out.code(), Some(2), "{}", out.stderr);
    let out = run(
        {
            let mut c = Command::new(fleetrun_bin());
            c.args(["send", "--targets", "all", "echo"]);
            c
        },
        Duration::from_secs(30),
    );
    assert_eq!(
        out.code(),
        Some(2),
        "words must follow `--`: {}",
        out.stderr
    );
}

#[test]
fn agent_with_a_bad_activation_code_exits_with_a_message() {
    let server = Server::start();
    let mut a = Agent::start_with_code(&server, "bad", &[], "not-a-real-code");
    let (status, stderr) = a.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    assert!(stderr.to_lowercase().contains("activation"), "{stderr}");
    assert!(server.nodes().is_empty());
}

/// Any 4xx: axum answers 422 when a body is JSON but not of the expected shape, 400 when it is not JSON.
const ANY_4XX: u16 = 0;

#[test]
fn raw_api_answers_4xx_json() {
    let server = Server::start();
    let url = |p: &str| format!("{}{p}", server.url);
    let t = Some(server.token.as_str());
    let check = |what: &str, r: Http, want: u16| {
        let ok = if want == ANY_4XX {
            (400..500).contains(&r.status)
        } else {
            r.status == want
        };
        let text = String::from_utf8_lossy(&r.body);
        assert!(ok, "{what}: expected {want}, got {} {text}", r.status);
        let body = r.json();
        assert!(body["error"]["code"].is_string(), "{what}: {body}");
        assert!(body["error"]["message"].is_string(), "{what}: {body}");
    };
    let post = |path: &str, body: Vec<u8>| {
        http(
            server.ca.as_deref(),
            "POST",
            &url(path),
            t,
            Some(("application/json", body)),
        )
        .expect("POST")
    };
    let get = |path: &str, token: Option<&str>| {
        http(server.ca.as_deref(), "GET", &url(path), token, None).expect("GET")
    };

    let h = get("/v1/health", None);
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");

    check("no token", get("/v1/nodes", None), 401);
    check("wrong token", get("/v1/nodes", Some("nope")), 401);
    check(
        "malformed JSON",
        post("/v1/commands", b"{".to_vec()),
        ANY_4XX,
    );
    for (what, path, body, want) in [
        (
            "unknown field",
            "/v1/commands",
            json!({"commands": ["true"], "targets": "all", "bogus": 1}),
            ANY_4XX,
        ),
        (
            "wrong type",
            "/v1/activations",
            json!({"limit": "ten"}),
            ANY_4XX,
        ),
        (
            "missing commands",
            "/v1/commands",
            json!({"targets": "all"}),
            ANY_4XX,
        ),
        (
            "bad target expression",
            "/v1/commands",
            json!({"commands": ["true"], "targets": "color:red"}),
            400,
        ),
        (
            "bad rate",
            "/v1/commands",
            json!({"commands": ["true"], "targets": "all", "max_concurrency": "101%"}),
            400,
        ),
        (
            "execution timeout too large",
            "/v1/commands",
            json!({"commands": ["true"], "targets": "all", "execution_timeout_secs": 999_999}),
            400,
        ),
        (
            "no targets",
            "/v1/commands",
            json!({"commands": ["true"]}),
            400,
        ),
        (
            "bad node id",
            "/v1/commands",
            json!({"commands": ["true"], "node_ids": ["mi-1"]}),
            ANY_4XX,
        ),
    ] {
        check(what, post(path, body.to_string().into_bytes()), want);
    }
    check(
        "unknown command",
        get(&format!("/v1/commands/{UNKNOWN_CMD}"), t),
        404,
    );
    check(
        "unknown command's invocations",
        get(&format!("/v1/commands/{UNKNOWN_CMD}/invocations"), t),
        404,
    );
    check(
        "unknown node",
        get(&format!("/v1/nodes/{UNKNOWN_NODE}"), t),
        404,
    );
    check(
        "malformed command id",
        get("/v1/commands/not-a-uuid", t),
        ANY_4XX,
    );
    check("bad limit", get("/v1/commands?limit=abc", t), ANY_4XX);
}
