//! Access keys for the SSM-compatible API, and Command documents: create, list, show, version, send
//! with parameters, set the default, delete.

use crate::support::{Agent, Server, invocations};
use std::path::PathBuf;

#[test]
fn access_key_create_shows_the_secret_once_and_list_never() {
    let server = Server::start();
    let key = server
        .cli(&["access-key", "create", "--name", "ci", "-o", "json"])
        .ok()
        .json();
    let id = key["access_key_id"].as_str().expect("access_key_id");
    let secret = key["secret_access_key"]
        .as_str()
        .expect("secret_access_key");
    assert!(id.starts_with("FRAK") && id.len() == 20, "{key}");
    assert_eq!(secret.len(), 40, "{key}");
    assert_eq!(key["name"], "ci");

    // The table shows both, and says how to use them.
    let out = server.cli(&["access-key", "create"]).ok();
    let table = out.stdout_str();
    assert!(
        table.starts_with("ACCESS KEY ID") && table.contains("SECRET ACCESS KEY"),
        "{table}"
    );
    assert!(
        out.stderr.contains("export AWS_ACCESS_KEY_ID=FRAK")
            && out.stderr.contains("AWS_SECRET_ACCESS_KEY=")
            && out
                .stderr
                .contains(&format!("--endpoint-url {}", server.url)),
        "{}",
        out.stderr
    );

    let list = server
        .cli(&["access-key", "list", "-o", "json"])
        .ok()
        .json();
    let list = list.as_array().expect("array");
    assert_eq!(list.len(), 2, "{list:?}");
    let listed = list
        .iter()
        .find(|k| k["access_key_id"] == id)
        .expect("the key is listed");
    assert_eq!(listed["secret_access_key"], "", "secrets are not listed");
    assert_eq!(listed["name"], "ci");
    let table = server.cli(&["access-key", "list"]).ok().stdout_str();
    assert!(table.contains(id) && table.contains("ci"), "{table}");
    assert!(!table.contains(secret), "{table}");
}

/// A schema 2.2 document: a required String parameter, a StringList with a default, two steps.
fn doc_v1() -> serde_json::Value {
    serde_json::json!({
        "schemaVersion": "2.2",
        "description": "Greets, then lists",
        "parameters": {
            "greeting": {"type": "String", "description": "What to say", "allowedPattern": "^[a-z-]+$"},
            "names": {"type": "StringList", "default": ["nobody"]}
        },
        "mainSteps": [
            {"action": "aws:runShellScript", "name": "greet",
             "inputs": {"runCommand": ["echo step1 {{ greeting }}"]}},
            {"action": "aws:runShellScript", "name": "list",
             "inputs": {"runCommand": ["echo step2 {{ names }}"]}}
        ]
    })
}

fn write_doc(server: &Server, name: &str, doc: &serde_json::Value) -> PathBuf {
    let path = server.scratch("docs").join(name);
    std::fs::write(&path, serde_json::to_string_pretty(doc).expect("json")).expect("write doc");
    path
}

#[test]
fn documents_lifecycle_and_sends_with_parameters() {
    let server = Server::start();
    let _agent = Agent::start(&server, "dev-1", &[("env", "dev")]);
    let v1 = write_doc(&server, "v1.json", &doc_v1());
    let v1 = v1.to_str().expect("utf-8 path");

    let d = server
        .cli(&[
            "documents",
            "create",
            "Greeter",
            "--file",
            v1,
            "--version-name",
            "first",
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(d["name"], "Greeter");
    assert_eq!(d["document_version"], "1");
    assert_eq!(d["version_name"], "first");
    assert_eq!(d["schema_version"], "2.2");
    let params: Vec<&str> = d["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(
        params.contains(&"greeting") && params.contains(&"names"),
        "{d}"
    );

    // Listed next to the built-in document; shown as the file's content.
    let list = server.cli(&["documents", "list", "-o", "json"]).ok().json();
    let names: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(names, ["AWS-RunShellScript", "Greeter"]);
    let table = server.cli(&["documents", "list"]).ok().stdout_str();
    assert!(table.starts_with("NAME"), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("Greeter"))
        .unwrap_or_else(|| panic!("no Greeter row: {table}"));
    assert!(
        row.contains("greeting,names?") && row.contains("Greets, then lists"),
        "{row}"
    );
    let shown = server
        .cli(&["documents", "show", "Greeter"])
        .ok()
        .stdout_str();
    let shown: serde_json::Value = serde_json::from_str(&shown).expect("show prints JSON");
    assert_eq!(shown, doc_v1());
    let shown = server
        .cli(&["documents", "show", "Greeter", "-o", "json"])
        .ok()
        .json();
    assert!(
        shown["content"]
            .as_str()
            .is_some_and(|c| c.contains("step1")),
        "{shown}"
    );

    // Sent by tag with parameters: both steps run, the values substituted.
    let c = server
        .cli(&[
            "send",
            "--targets",
            "tag:env=dev",
            "--document",
            "Greeter",
            "--parameter",
            "greeting=hello-doc",
            "--parameter",
            "names=ann",
            "--parameter",
            "names=bob",
            "--wait",
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(c["status"], "Success", "{c}");
    assert_eq!(c["document_name"], "Greeter");
    assert_eq!(c["document_version"], "1");
    assert_eq!(c["parameters"]["names"], serde_json::json!(["ann", "bob"]));
    let inv = invocations(&c);
    assert_eq!(inv.len(), 1, "{c}");
    assert_eq!(inv[0]["status"], "Success");
    assert_eq!(inv[0]["stdout"], "step1 hello-doc\nstep2 ann bob\n", "{c}");

    // The table shows the document and its parameters.
    let out = server
        .cli(&[
            "send",
            "--targets",
            "all",
            "--document",
            "Greeter",
            "--parameter",
            "greeting=hi",
            "--wait",
        ])
        .ok()
        .stdout_str();
    assert!(
        out.contains("document:     Greeter version 1")
            && out.contains("greeting=hi")
            && out.contains("step1 hi"),
        "{out}"
    );

    // A second version: the latest, not yet the default.
    let mut doc = doc_v1();
    doc["mainSteps"][0]["inputs"]["runCommand"] = serde_json::json!(["echo v2 {{ greeting }}"]);
    let v2 = write_doc(&server, "v2.json", &doc);
    let v2 = v2.to_str().expect("utf-8 path");
    let d = server
        .cli(&[
            "documents",
            "update",
            "Greeter",
            "--file",
            v2,
            "--version",
            "1",
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(d["document_version"], "2");
    assert_eq!(d["default_version"], "1");
    assert_eq!(d["latest_version"], "2");
    let stale = server.cli(&[
        "documents",
        "update",
        "Greeter",
        "--file",
        v1,
        "--version",
        "1",
    ]);
    let line = stale.one_line_error();
    assert!(line.contains("not the latest"), "{line}");
    let shown = server
        .cli(&["documents", "show", "Greeter", "--version", "$LATEST"])
        .ok()
        .stdout_str();
    assert!(shown.contains("echo v2"), "{shown}");
    let send = |extra: &[&str]| {
        let mut args = vec![
            "send",
            "--targets",
            "all",
            "--document",
            "Greeter",
            "--parameter",
            "greeting=x",
            "--wait",
            "-o",
            "json",
        ];
        args.extend_from_slice(extra);
        let c = server.cli(&args).ok().json();
        let stdout = invocations(&c)[0]["stdout"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        (
            c["document_version"].as_str().unwrap_or("").to_owned(),
            stdout,
        )
    };
    assert_eq!(send(&[]), ("1".into(), "step1 x\nstep2 nobody\n".into()));
    assert_eq!(
        send(&["--document-version", "2"]),
        ("2".into(), "v2 x\nstep2 nobody\n".into())
    );

    let d = server
        .cli(&["documents", "set-default", "Greeter", "2", "-o", "json"])
        .ok()
        .json();
    assert_eq!(d["default_version"], "2");
    let table = server
        .cli(&["documents", "set-default", "Greeter", "2"])
        .ok()
        .stdout_str();
    assert!(
        table.starts_with("NAME") && table.contains("Greeter"),
        "{table}"
    );
    assert_eq!(send(&[]).0, "2");
    assert_eq!(send(&["--document-version", "1"]).0, "1");

    // Delete: gone from the list, and sending it fails.
    let out = server
        .cli(&["documents", "delete", "Greeter"])
        .ok()
        .stdout_str();
    assert!(out.contains("Greeter"), "{out}");
    let table = server.cli(&["documents", "list"]).ok().stdout_str();
    assert!(!table.contains("Greeter"), "{table}");
    let out = server.cli(&[
        "send",
        "--targets",
        "all",
        "--document",
        "Greeter",
        "--parameter",
        "greeting=x",
    ]);
    let line = out.one_line_error();
    assert!(
        line.contains("Greeter") && line.contains("does not exist"),
        "{line}"
    );
    let line = server
        .cli(&["documents", "show", "Greeter"])
        .one_line_error();
    assert!(line.contains("does not exist"), "{line}");
}

/// A YAML file is taken as YAML by its extension (or by `--document-format`), shown as written,
/// run like any document; YAML that is not valid says so in one line.
#[test]
fn yaml_documents_from_files() {
    let server = Server::start();
    let _agent = Agent::start(&server, "y-1", &[]);
    let dir = server.scratch("docs");
    let yaml = "schemaVersion: '2.2'\ndescription: from YAML\nparameters:\n  who:\n    type: String\nmainSteps:\n  - action: aws:runShellScript\n    name: hello\n    inputs:\n      runCommand:\n        - echo hello {{ who }}\n";
    let file = dir.join("hello.yaml");
    std::fs::write(&file, yaml).expect("write");
    let d = server
        .cli(&[
            "documents",
            "create",
            "Hello",
            "--file",
            file.to_str().expect("utf-8"),
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(d["document_format"], "YAML", "{d}");
    assert_eq!(d["description"], "from YAML", "{d}");
    let shown = server
        .cli(&["documents", "show", "Hello"])
        .ok()
        .stdout_str();
    assert_eq!(shown, yaml);
    let c = server
        .cli(&[
            "send",
            "--targets",
            "all",
            "--document",
            "Hello",
            "--parameter",
            "who=yaml",
            "--wait",
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(invocations(&c)[0]["stdout"], "hello yaml\n", "{c}");
    // No extension: stdin with --document-format, as version 2.
    let v2 = yaml.replace("from YAML", "version two");
    let d = crate::support::run_input(
        server.cli_cmd(&[
            "documents",
            "update",
            "Hello",
            "--file",
            "-",
            "--document-format",
            "yaml",
            "-o",
            "json",
        ]),
        Some(v2.as_bytes()),
        std::time::Duration::from_secs(60),
    )
    .ok()
    .json();
    assert_eq!(
        (
            d["document_version"].as_str(),
            d["document_format"].as_str()
        ),
        (Some("2"), Some("YAML")),
        "{d}"
    );
    // Bad YAML: one line naming it.
    let bad = dir.join("bad.yml");
    std::fs::write(&bad, "schemaVersion: '2.2'\nmainSteps: [unclosed\n").expect("write");
    let line = server
        .cli(&[
            "documents",
            "create",
            "Bad",
            "--file",
            bad.to_str().expect("utf-8"),
        ])
        .one_line_error();
    assert!(line.contains("not valid YAML"), "{line}");
}

#[test]
fn bad_document_sends_and_files_are_one_line_errors() {
    let server = Server::start();
    let _agent = Agent::start(&server, "a", &[]);
    let v1 = write_doc(&server, "v1.json", &doc_v1());
    let v1 = v1.to_str().expect("utf-8 path");
    server
        .cli(&["documents", "create", "Greeter", "--file", v1])
        .ok();

    let base = ["send", "--targets", "all", "--document", "Greeter"];
    for (extra, needle) in [
        // Checked by the server against the document.
        (
            &["--parameter", "greeting=x", "--parameter", "nope=1"][..],
            "\"nope\" is not defined",
        ),
        (&["--parameter", "greeting=NOT ALLOWED"], "allowed pattern"),
        (&[], "\"greeting\" is required"),
        (
            &["--parameter", "greeting=x", "--document-version", "9"],
            "no version 9",
        ),
        // Checked by the CLI.
        (&["--parameter", "greeting"], "KEY=VALUE"),
        (
            &["--parameter", "greeting=x", "--", "uptime"],
            "a script after `--` is for AWS-RunShellScript only",
        ),
        (
            &["--parameter", "greeting=x", "--working-dir", "/tmp"],
            "--working-dir",
        ),
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let line = server.cli(&args).one_line_error();
        assert!(line.contains(needle), "{args:?}: {line}");
    }
    // Nothing was sent.
    let list = server.cli(&["commands", "-o", "json"]).ok().json();
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");

    let bad = server.scratch("docs").join("bad.json");
    std::fs::write(&bad, "{ not json").expect("write");
    let bad = bad.to_str().expect("utf-8 path");
    for args in [
        &["documents", "create", "Other", "--file", bad][..],
        &["documents", "update", "Greeter", "--file", bad],
    ] {
        let line = server.cli(args).one_line_error();
        assert!(line.contains("is not JSON"), "{args:?}: {line}");
    }
    for (args, needle) in [
        (
            &["documents", "create", "Greeter", "--file", v1][..],
            "already exists",
        ),
        (
            &["documents", "create", "AWS-Mine", "--file", v1],
            "reserved",
        ),
        (&["documents", "delete", "AWS-RunShellScript"], "built in"),
        (
            &["documents", "set-default", "Greeter", "7"],
            "no version 7",
        ),
        (
            &["documents", "show", "Greeter", "--version", "x"],
            "not a document version",
        ),
    ] {
        let line = server.cli(args).one_line_error();
        assert!(line.contains(needle), "{args:?}: {line}");
    }

    // Without --document nothing changed: the script runs with AWS-RunShellScript.
    let c = server
        .cli(&[
            "send",
            "--targets",
            "all",
            "--wait",
            "-o",
            "json",
            "--",
            "echo",
            "plain",
        ])
        .ok()
        .json();
    assert_eq!(c["document_name"], "AWS-RunShellScript");
    assert_eq!(invocations(&c)[0]["stdout"], "plain\n");
}
