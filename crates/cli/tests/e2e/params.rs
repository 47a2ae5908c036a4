//! Issue 5 (security), parameter store: `{{param:NAME}}` in a script is substituted only in what the
//! node receives; a secure value never shows up in an API answer, the audit trail, the server's log or
//! its data dir in clear.

use crate::support::{Agent, Server, run_input};
use serde_json::{Value, json};
use std::time::Duration;

const SECRET: &str = "s3cr3t-Value-42";

fn put_http(server: &Server, name: &str, body: Value) -> crate::support::Http {
    server
        .http(
            "PUT",
            &format!("/v1/params/{name}"),
            Some(&server.token),
            Some(("application/json", body.to_string().into_bytes())),
        )
        .expect("PUT param")
}

/// Every file under `dir`, read whole (SQLite file, WAL, objects, keys).
fn all_bytes(dir: &std::path::Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            all_bytes(&p, out);
        } else if let Ok(b) = std::fs::read(&p) {
            out.push((p.display().to_string(), b));
        }
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn a_secure_param_reaches_the_script_and_nothing_else() {
    let server = Server::start();
    let agent = Agent::start(&server, "par1", &[]);
    let node = server.node_id("par1");

    // Secure, from stdin (out of shell history); plain, from the command line.
    let put = run_input(
        server.cli_cmd(&["params", "put", "db_pass", "-", "--secure", "-o", "json"]),
        Some(format!("{SECRET}\n").as_bytes()),
        Duration::from_secs(30),
    )
    .ok()
    .json();
    assert_eq!(put["secure"], true, "{put}");
    assert_eq!(put["version"], 1);
    assert_eq!(put["updated_by"], "admin");
    assert!(put.get("value").is_none(), "{put}");
    let plain = server
        .cli(&["params", "put", "region", "eu-west-3", "-o", "json"])
        .ok()
        .json();
    assert_eq!(plain["value"], "eu-west-3");

    // The script compares the value reversed, so the secret itself is in no command text.
    let script = r#"[ "$(printf %s '{{param:db_pass}}' | rev)" = "24-eulaV-t3rc3s" ] && echo match; echo "{{ssm:region}}""#;
    let id = server.send(&["--node", &node], script);
    let cmd = server.wait_terminal(&id, Duration::from_secs(30));
    assert_eq!(cmd["status"], "Success", "{cmd}");
    assert_eq!(
        String::from_utf8_lossy(&server.output(&id, &node)),
        "match\neu-west-3\n"
    );
    // The stored command keeps the placeholder.
    assert!(cmd.to_string().contains("{{param:db_pass}}"), "{cmd}");
    // The node's journal holds the rendered request, owner-only.
    use std::os::unix::fs::PermissionsExt;
    let req = agent.run_dir(&id).join("request.json");
    if let Ok(meta) = std::fs::metadata(&req) {
        assert_eq!(meta.permissions().mode() & 0o077, 0, "{}", req.display());
    }

    // An unknown parameter: 400 naming it, nothing created.
    let before = server.get_json("/v1/commands").as_array().unwrap().len();
    let err = server
        .cli(&[
            "send",
            "--node",
            &node,
            "--",
            "echo {{param:nope_x}} {{param:region}}",
        ])
        .one_line_error();
    assert!(err.contains("nope_x") && !err.contains("region"), "{err}");
    assert_eq!(
        server.get_json("/v1/commands").as_array().unwrap().len(),
        before
    );

    // Clear 4xx errors for bad names and values.
    let r = put_http(&server, "bad%20name", json!({"value": "x"}));
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("InvalidParameterName"));
    let r = put_http(&server, "big", json!({"value": "x".repeat(4097)}));
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("ParameterValueTooLarge"));
    // A name with slashes, percent-encoded in the path.
    let r = put_http(&server, "%2Fprod%2Fdb", json!({"value": "v1"}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        server
            .cli(&["params", "get", "/prod/db", "-o", "json"])
            .ok()
            .json()["value"],
        "v1"
    );

    // Nothing in the data dir holds the value in clear (the database, its WAL, output objects).
    let mut files = Vec::new();
    all_bytes(&server.data_dir, &mut files);
    for (path, bytes) in &files {
        assert!(!contains(bytes, SECRET), "secret in clear in {path}");
    }

    // A script that prints the secret (stored as printed, like any output): masked in every output
    // view and in a live follow; the second copy sits after more than a segment (1 MiB) of output.
    // Values split across chunks are covered by the unit tests of params::MaskStream.
    let leak = server.send(
        &["--node", &node],
        "echo \"pw={{param:db_pass}}\"; head -c 1048550 /dev/zero | tr '\\0' x; echo '{{ssm-secure:db_pass}}'; sleep 1; echo \"{{param:db_pass}}\" >&2",
    );
    let follow = server
        .cli(&["output", &leak, &node, "--follow"])
        .ok()
        .stdout;
    server.wait_terminal(&leak, Duration::from_secs(60));
    let stored = server.output(&leak, &node);
    for out in [&follow, &stored] {
        assert_eq!(out.len(), "pw=****\n".len() + 1048550 + "****\n".len());
        assert!(out.starts_with(b"pw=****\nxxx") && out.ends_with(b"xxx****\n"));
    }
    let stderr = server.get(&format!(
        "/v1/commands/{leak}/invocations/{node}/output/stderr"
    ));
    assert_eq!(String::from_utf8_lossy(&stderr.body), "****\n");
    let invs = server.get_json(&format!("/v1/commands/{leak}/invocations"));
    assert!(
        invs[0]["stdout"]
            .as_str()
            .unwrap()
            .starts_with("pw=****\nxxx"),
        "{}",
        &invs.to_string()[..100]
    );
    assert_eq!(invs[0]["stderr"], "****\n");

    // Every answer the API gives, the audit trail included.
    let mut answers = vec![
        String::from_utf8_lossy(&follow).into_owned(),
        String::from_utf8_lossy(&stored).into_owned(),
        invs.to_string(),
        server.get_json(&format!("/v1/commands/{leak}")).to_string(),
        server
            .cli(&["params", "list", "-o", "json"])
            .ok()
            .stdout_str(),
        server.cli(&["params", "list"]).ok().stdout_str(),
        server
            .cli(&["params", "get", "db_pass", "-o", "json"])
            .ok()
            .stdout_str(),
    ];
    for path in [
        "/v1/params".to_owned(),
        "/v1/params/db_pass".to_owned(),
        "/v1/commands".to_owned(),
        format!("/v1/commands/{id}"),
        format!("/v1/commands/{id}/invocations"),
        format!("/v1/commands/{id}/invocations/{node}/output/stdout"),
        format!("/v1/commands/{id}/invocations/{node}/output/stderr"),
        "/v1/audit?limit=10000".to_owned(),
    ] {
        let r = server.get(&path);
        assert_eq!(r.status, 200, "GET {path}");
        answers.push(String::from_utf8_lossy(&r.body).into_owned());
    }
    for a in &answers {
        assert!(!a.contains(SECRET), "secret in an answer: {a}");
    }
    let audit = server.get_json("/v1/audit?action=params.put&limit=100");
    let rec = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["document"] == "db_pass")
        .unwrap_or_else(|| panic!("no params.put record: {audit}"));
    assert_eq!(rec["params"]["body"]["value"], "[REDACTED]", "{rec}");
    assert!(!server.all_logs().is_empty());
    assert!(
        !server.all_logs().contains(SECRET),
        "secret in the server log"
    );
    assert!(
        !agent.all_logs().contains(SECRET),
        "secret in the agent log"
    );

    // Delete: gone, and a send that needs it is refused.
    server.cli(&["params", "delete", "region"]).ok();
    let err = server.cli(&["params", "get", "region"]).one_line_error();
    assert!(err.contains("ParameterNotFound"), "{err}");
    let err = server
        .cli(&["send", "--node", &node, "--", "echo {{param:region}}"])
        .one_line_error();
    assert!(err.contains("region"), "{err}");
}

#[test]
fn a_configured_secrets_key_file_seals_params_and_must_exist() {
    let keys = tempfile::tempdir().expect("tempdir");
    let key = keys.path().join("fleetrun.key");
    std::fs::write(&key, [7u8; 32]).expect("write key");
    let server = Server::start_with(&["--secrets-key-file", key.to_str().unwrap()]);
    let _a = Agent::start(&server, "par2", &[]);
    let node = server.node_id("par2");
    server
        .cli(&["params", "put", "k", "kv-secret-9", "--secure"])
        .ok();
    let id = server.send(&["--node", &node], "printf %s '{{param:k}}' | wc -c");
    server.wait_terminal(&id, Duration::from_secs(30));
    assert_eq!(
        String::from_utf8_lossy(&server.output(&id, &node)).trim(),
        "11"
    );
    assert!(!server.data_dir.join("secrets.key").exists());

    // A configured key that is missing is an error, not a fresh key.
    let data = keys.path().join("data");
    let mut c = std::process::Command::new(crate::support::fleetrun_bin());
    c.args(["server", "--listen", "127.0.0.1:0", "--secrets-key-file"])
        .arg(keys.path().join("missing.key"))
        .arg("--data-dir")
        .arg(&data);
    let out = crate::support::run(c, Duration::from_secs(30));
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("missing.key"), "{}", out.stderr);
}
