//! Issue 12, SSM's output to S3: a command sent with OutputS3BucketName/OutputS3KeyPrefix (through
//! boto3, or `fleetrun send --output-s3-bucket`) has each invocation's full stdout and stderr
//! written to that bucket (moto's server from the harness's venv) at SSM's keys, and the output
//! URLs say where. A bucket that does not exist keeps the export queued, with its error shown,
//! until the bucket exists, and a restarted server takes the queue up again; a schema 2.2
//! document's output goes under its step's name; an invocation the server ends exports what was
//! stored. Bad bucket names, overlong prefixes and the server's own bucket are refused with SSM's
//! errors.

use crate::support::{Agent, S3Server, Server, python_venv, wait_until};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(90);

/// A server config file keeping the server's own objects in `fleet-objects` of the store: the
/// output buckets share its endpoint, credentials and path style; `allowed_buckets` lets output
/// go to the buckets these tests use (and no other).
fn config(dir: &Path, s3: &S3Server) -> std::path::PathBuf {
    let path = dir.join("server.toml");
    let text = format!(
        "allowed_buckets = [\"ssm-out\", \"late-out\", \"after-*\"]\n[object_store]\nurl = \"s3://fleet-objects/fleet\"\nendpoint = \"{}\"\nallow_http = true\npath_style = true\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\nregion = \"us-east-1\"\n",
        s3.url
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// boto3 against the server's SSM API: `send` sends the command and tries the hostile requests,
/// `get` prints GetCommandInvocation. One JSON line out.
const BOTO: &str = r#"
import json, os, sys
import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

ssm = boto3.client("ssm", endpoint_url=os.environ["FLEETRUN_ENDPOINT"], region_name="us-east-1",
                   config=Config(parameter_validation=False, retries={"max_attempts": 1}))
node = os.environ["NODE"]
if sys.argv[1] == "send":
    refused = {}
    for name, extra in [
        ("bad_name", {"OutputS3BucketName": "Bad_Bucket"}),
        ("dots", {"OutputS3BucketName": "a..b"}),
        ("short", {"OutputS3BucketName": "ab"}),
        ("long_prefix", {"OutputS3BucketName": "ssm-out", "OutputS3KeyPrefix": "p" * 501}),
        ("dot_prefix", {"OutputS3BucketName": "ssm-out", "OutputS3KeyPrefix": "a/../b"}),
        ("own_store", {"OutputS3BucketName": "fleet-objects", "OutputS3KeyPrefix": "fleet/files"}),
        ("not_allowed", {"OutputS3BucketName": "someone-elses"}),
    ]:
        try:
            ssm.send_command(InstanceIds=[node], DocumentName="AWS-RunShellScript",
                             Parameters={"commands": ["true"]}, **extra)
            refused[name] = "accepted"
        except ClientError as e:
            refused[name] = e.response["Error"]["Code"] + ": " + e.response["Error"]["Message"]
    cmd = ssm.send_command(InstanceIds=[node], DocumentName="AWS-RunShellScript",
                           Parameters={"commands": ["seq 1 1500000", "echo problem >&2"]},
                           OutputS3BucketName="ssm-out", OutputS3KeyPrefix="runs/daily/",
                           OutputS3Region="us-east-1")["Command"]
    print(json.dumps({"refused": refused, "command": cmd}, default=str))
else:
    cid = sys.argv[2]
    inv = ssm.get_command_invocation(CommandId=cid, InstanceId=node)
    listed = ssm.list_command_invocations(CommandId=cid, Details=True)["CommandInvocations"]
    cmds = ssm.list_commands(CommandId=cid)["Commands"]
    print(json.dumps({"get": inv, "list": listed, "commands": cmds}, default=str))
"#;

fn boto(server: &Server, key: &Value, node: &str, args: &[&str]) -> Value {
    let out = Command::new(python_venv().join("bin").join("python"))
        .arg("-c")
        .arg(BOTO)
        .args(args)
        .env("FLEETRUN_ENDPOINT", &server.url)
        .env("AWS_CA_BUNDLE", server.ca.as_ref().expect("TLS server"))
        .env("NODE", node)
        .env(
            "AWS_ACCESS_KEY_ID",
            key["access_key_id"].as_str().unwrap_or_default(),
        )
        .env(
            "AWS_SECRET_ACCESS_KEY",
            key["secret_access_key"].as_str().unwrap_or_default(),
        )
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "boto3 {args:?}: {}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.logs()
    );
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

#[test]
fn send_command_through_boto3_writes_the_output_at_ssm_keys() {
    let s3 = S3Server::start();
    s3.create_bucket("fleet-objects");
    s3.create_bucket("ssm-out");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), &s3);
    let server = Server::start_with(&["--config", cfg.to_str().expect("utf-8 path")]);
    let _agent = Agent::start(&server, "s3-node", &[]);
    let node = server.node_id("s3-node");
    let key = server
        .post_json("/v1/access-keys", &serde_json::json!({"name": "s3out"}))
        .json();

    let sent = boto(&server, &key, &node, &["send"]);
    let refused = &sent["refused"];
    let starts = |k: &str, code: &str| {
        let v = refused[k].as_str().unwrap_or_default();
        assert!(v.starts_with(code), "{k}: {v}");
    };
    starts(
        "bad_name",
        "InvalidParameters: \"Bad_Bucket\" is not a valid S3 bucket name",
    );
    starts(
        "dots",
        "InvalidParameters: \"a..b\" is not a valid S3 bucket name",
    );
    starts("short", "ValidationException: 1 validation error detected");
    starts(
        "long_prefix",
        "ValidationException: 1 validation error detected",
    );
    starts(
        "dot_prefix",
        "InvalidParameters: \"a/../b\" is not a valid S3 key prefix",
    );
    starts(
        "not_allowed",
        "AccessDeniedException: this server may not write output to bucket someone-elses: it is not in the server's allowed_buckets (--allowed-buckets)",
    );
    starts(
        "own_store",
        "InvalidParameters: s3://fleet-objects/fleet is where this server keeps its own objects",
    );
    let cmd = &sent["command"];
    assert_eq!(
        (
            cmd["OutputS3BucketName"].as_str(),
            cmd["OutputS3KeyPrefix"].as_str(),
            cmd["OutputS3Region"].as_str()
        ),
        (Some("ssm-out"), Some("runs/daily/"), Some("us-east-1")),
        "{cmd}"
    );
    let id = cmd["CommandId"].as_str().expect("CommandId").to_owned();
    let done = server.wait_terminal(&id, LIMIT);
    assert_eq!(done["status"], "Success", "{done}");

    let base = format!("runs/daily/{id}/{node}/awsrunShellScript/0.awsrunShellScript");
    let keys = wait_until("both pipes in the bucket", LIMIT, || {
        let keys = s3.keys("ssm-out", "runs/");
        (keys.len() == 2).then_some(keys)
    });
    let expected: Vec<u8> = (1..=1_500_000)
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        .into_bytes();
    assert_eq!(
        keys,
        vec![
            (format!("{base}/stderr"), 8),
            (format!("{base}/stdout"), expected.len() as u64),
        ]
    );
    // ~10.9 MB: a multipart upload of two parts, byte-exact.
    assert!(s3.get("ssm-out", &format!("{base}/stdout")) == expected);
    assert_eq!(s3.get("ssm-out", &format!("{base}/stderr")), b"problem\n");

    let shown = boto(&server, &key, &node, &["get", &id]);
    let url = |pipe: &str| format!("{}/ssm-out/{base}/{pipe}", s3.url);
    let get = &shown["get"];
    assert_eq!(get["StandardOutputUrl"], url("stdout"), "{get}");
    assert_eq!(get["StandardErrorUrl"], url("stderr"), "{get}");
    let inv = &shown["list"][0];
    assert_eq!(inv["StandardOutputUrl"], url("stdout"), "{inv}");
    assert_eq!(inv["TraceOutput"], "", "written: nothing pending");
    let plugin = &inv["CommandPlugins"][0];
    assert_eq!(plugin["Name"], "aws:runShellScript");
    assert_eq!(plugin["StandardErrorUrl"], url("stderr"), "{plugin}");
    assert_eq!(plugin["OutputS3BucketName"], "ssm-out");
    assert_eq!(plugin["OutputS3KeyPrefix"], "runs/daily/");
    let listed = &shown["commands"][0];
    assert_eq!(listed["OutputS3BucketName"], "ssm-out", "{listed}");
    assert!(server.logs().contains("output written to S3"));
}

/// The invocation of a command, as `GET /v1/commands/{id}` shows it.
fn invocation(server: &Server, id: &str) -> Value {
    server.command(id)["invocations"][0].clone()
}

#[test]
fn a_missing_bucket_keeps_the_export_queued_until_it_exists_also_across_a_restart() {
    let s3 = S3Server::start();
    s3.create_bucket("fleet-objects");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), &s3);
    let mut server = Server::start_with(&["--config", cfg.to_str().expect("utf-8 path")]);
    let _agent = Agent::start(&server, "late-node", &[]);
    let node = server.node_id("late-node");

    // Refused before any request, naming the flag.
    let bad = server.cli(&[
        "send",
        "--targets",
        "all",
        "--output-s3-bucket",
        "No_Such",
        "--",
        "true",
    ]);
    assert_ne!(bad.code(), Some(0));
    assert!(
        bad.one_line_error().contains("--output-s3-bucket")
            && bad.one_line_error().contains("not a valid S3 bucket name"),
        "{}",
        bad.one_line_error()
    );

    let id = server.send(
        &[
            "--targets",
            "all",
            "--output-s3-bucket",
            "late-out",
            "--output-s3-prefix",
            "p",
        ],
        "echo late",
    );
    let done = server.wait_terminal(&id, LIMIT);
    assert_eq!(done["status"], "Success", "{done}");
    assert_eq!(done["output_s3"]["bucket"], "late-out", "{done}");
    let pending = wait_until("the first attempt to fail", LIMIT, || {
        let p = invocation(&server, &id)["output_s3_pending"]
            .as_str()?
            .to_owned();
        p.contains("attempt 1 failed").then_some(p)
    });
    assert!(pending.contains("s3://late-out/p/"), "{pending}");
    assert_eq!(server.get_json("/v1/storage")["output_s3_queued"], 1);
    let shown = server.cli(&["command", &id]).ok().stdout_str();
    assert!(
        shown.contains("output to:    s3://late-out/p (1 not written yet)"),
        "{shown}"
    );

    // The bucket appears: the next retry writes it and the row goes.
    s3.create_bucket("late-out");
    let key = format!("p/{id}/{node}/awsrunShellScript/0.awsrunShellScript/stdout");
    wait_until("the retry to write the output", LIMIT, || {
        s3.keys("late-out", "p/")
            .iter()
            .any(|(k, _)| *k == key)
            .then_some(())
    });
    assert_eq!(s3.get("late-out", &key), b"late\n");
    wait_until("the row to go", LIMIT, || {
        invocation(&server, &id)["output_s3_pending"]
            .is_null()
            .then_some(())
    });
    assert_eq!(server.get_json("/v1/storage")["output_s3_queued"], 0);

    // A schema 2.2 document: the step directory is its (first) step's name, as SSM's.
    let doc = serde_json::json!({
        "schemaVersion": "2.2",
        "description": "Collects",
        "mainSteps": [{"action": "aws:runShellScript", "name": "collect.all",
                       "inputs": {"runCommand": ["echo two-two"]}}]
    });
    let path = server.scratch("docs").join("collect.json");
    std::fs::write(&path, doc.to_string()).expect("write doc");
    server
        .cli(&[
            "documents",
            "create",
            "Collect",
            "--file",
            path.to_str().expect("utf-8"),
        ])
        .ok();
    let id22 = server
        .cli(&[
            "send",
            "--targets",
            "all",
            "--document",
            "Collect",
            "--output-s3-bucket",
            "late-out",
        ])
        .ok()
        .stdout_str()
        .trim()
        .to_owned();
    server.wait_terminal(&id22, LIMIT);
    let key22 = format!("{id22}/{node}/awsrunShellScript/collect.all/stdout");
    wait_until("the 2.2 output in the bucket", LIMIT, || {
        s3.keys("late-out", &format!("{id22}/"))
            .iter()
            .any(|(k, _)| *k == key22)
            .then_some(())
    });
    assert_eq!(s3.get("late-out", &key22), b"two-two\n");

    // Queued at a stop, written by the next start.
    let id2 = server.send(
        &["--targets", "all", "--output-s3-bucket", "after-restart"],
        "echo again; echo err >&2",
    );
    server.wait_terminal(&id2, LIMIT);
    wait_until("the first attempt to fail", LIMIT, || {
        let p = invocation(&server, &id2)["output_s3_pending"]
            .as_str()?
            .to_owned();
        p.contains("attempt 1 failed").then_some(())
    });
    server.terminate(LIMIT);
    s3.create_bucket("after-restart");
    server.start_again();
    let base = format!("{id2}/{node}/awsrunShellScript/0.awsrunShellScript");
    wait_until("the restarted server to write the output", LIMIT, || {
        (s3.keys("after-restart", "").len() == 2).then_some(())
    });
    assert_eq!(
        s3.get("after-restart", &format!("{base}/stdout")),
        b"again\n"
    );
    assert_eq!(s3.get("after-restart", &format!("{base}/stderr")), b"err\n");

    // A saved script's run takes the same flags.
    let body = server.scratch("scripts").join("hello.sh");
    std::fs::write(&body, "echo from-a-script\n").expect("write body");
    server
        .cli(&[
            "scripts",
            "create",
            "hello",
            "--platform",
            "linux",
            "--file",
            body.to_str().expect("utf-8"),
        ])
        .ok();
    let ran = server
        .cli(&[
            "scripts",
            "run",
            "hello",
            "--targets",
            "all",
            "--output-s3-bucket",
            "after-restart",
            "--output-s3-prefix",
            "scripts",
            "--wait",
            "-o",
            "json",
        ])
        .ok()
        .json();
    let id4 = ran["command_id"].as_str().expect("command_id").to_owned();
    let key4 = format!("scripts/{id4}/{node}/awsrunShellScript/0.awsrunShellScript/stdout");
    wait_until("the script run's output in the bucket", LIMIT, || {
        s3.keys("after-restart", "scripts/")
            .iter()
            .any(|(k, _)| *k == key4)
            .then_some(())
    });
    assert_eq!(s3.get("after-restart", &key4), b"from-a-script\n");

    // An invocation the server ends (its node deregistered mid-run) exports what was stored.
    let id3 = server.send(
        &["--targets", "all", "--output-s3-bucket", "after-restart"],
        "echo partial; sleep 60",
    );
    wait_until("the first output stored", LIMIT, || {
        let inv = invocation(&server, &id3);
        (inv["stdout"] == "partial\n").then_some(())
    });
    server.cli(&["nodes", "deregister", &node]).ok();
    let done = server.wait_terminal(&id3, LIMIT);
    assert_eq!(done["status"], "Failed", "{done}");
    let key3 = format!("{id3}/{node}/awsrunShellScript/0.awsrunShellScript/stdout");
    wait_until("the output of the ended invocation", LIMIT, || {
        s3.keys("after-restart", &format!("{id3}/"))
            .iter()
            .any(|(k, _)| *k == key3)
            .then_some(())
    });
    assert_eq!(s3.get("after-restart", &key3), b"partial\n");
}
