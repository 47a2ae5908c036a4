//! The SSM-compatible API driven by the real AWS CLI (v1 and boto3 from PyPI, v2 from Debian's
//! `awscli` package), against a real server and real agents. The PyPI clients live in a venv the
//! harness creates on first use, AWS CLI v2 is installed with apt-get when missing and the test runs
//! as root (python3, the PyPI registry and AWS CLI v2 are required: the test fails, it does not
//! skip, when they are missing).
//!
//! The scenarios themselves are Python (tests/ssm/scenarios.py): that is where the clients are.

#[path = "support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::Command;
use support::{Agent, Server};

/// What the web team may do: everything on role=web nodes, nothing else.
const WEB_TEAM_POLICY: &str = r#"
permit (
    principal,
    action in [Action::"list", Action::"send-command", Action::"cancel", Action::"read-output"],
    resource is Node
) when { resource.hasTag("role") && resource.getTag("role") == "web" };
"#;

#[test]
fn the_aws_cli_and_boto3_run_commands_on_fleetrun() {
    let venv = support::python_venv();
    let aws_v2 = support::aws_cli_v2();
    let server = Server::start();
    let agents: Vec<Agent> = [("web-1", "web"), ("web-2", "web"), ("db-1", "db")]
        .iter()
        .map(|(name, role)| Agent::start(&server, name, &[("role", role), ("env", "test")]))
        .collect();
    let key = server.post_json("/v1/access-keys", &serde_json::json!({"name": "ssm-test"}));
    assert_eq!(
        key.status,
        201,
        "create access key: {}",
        String::from_utf8_lossy(&key.body)
    );
    let key = key.json();
    let nodes: serde_json::Map<String, serde_json::Value> = agents
        .iter()
        .map(|a| {
            (
                a.name.clone(),
                serde_json::Value::from(server.node_id(&a.name)),
            )
        })
        .collect();

    // The web team's user may only touch role=web nodes; its access key drives one scenario.
    let team = server.post_json(
        "/v1/users",
        &serde_json::json!({"name": "web-team", "role": "none", "policy": WEB_TEAM_POLICY}),
    );
    assert_eq!(team.status, 201, "{}", String::from_utf8_lossy(&team.body));
    let team_key = server.post_json(
        "/v1/access-keys",
        &serde_json::json!({"name": "web team", "user": "web-team"}),
    );
    assert_eq!(
        team_key.status,
        201,
        "{}",
        String::from_utf8_lossy(&team_key.body)
    );
    let team_key = team_key.json();

    // A viewer (reads everything, uses no parameter) for the Parameter Store's refusals.
    let viewer = server.post_json(
        "/v1/users",
        &serde_json::json!({"name": "param-viewer", "role": "viewer"}),
    );
    assert_eq!(
        viewer.status,
        201,
        "{}",
        String::from_utf8_lossy(&viewer.body)
    );
    let viewer_key = server.post_json(
        "/v1/access-keys",
        &serde_json::json!({"name": "viewer", "user": "param-viewer"}),
    );
    assert_eq!(
        viewer_key.status,
        201,
        "{}",
        String::from_utf8_lossy(&viewer_key.body)
    );
    let viewer_key = viewer_key.json();

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ssm/scenarios.py");
    let out = Command::new(venv.join("bin").join("python"))
        .arg(&script)
        .env("FLEETRUN_ENDPOINT", &server.url)
        // Both the AWS CLI and boto3 trust the server's own CA through this.
        .env("AWS_CA_BUNDLE", server.ca.as_ref().expect("TLS server"))
        .env("FLEETRUN_TOKEN", &server.token)
        .env(
            "FLEETRUN_NODES",
            serde_json::Value::Object(nodes).to_string(),
        )
        .env("FLEETRUN_SCRATCH", server.dir.path())
        .env("FLEETRUN_CLI", support::fleetrun_bin())
        .env("FLEETRUN_AGENT", support::agent_bin())
        .env("AWS_CLI", venv.join("bin").join("aws"))
        .env("AWS_CLI_V2", &aws_v2)
        .env(
            "AWS_ACCESS_KEY_ID",
            key["access_key_id"].as_str().unwrap_or_default(),
        )
        .env(
            "AWS_SECRET_ACCESS_KEY",
            key["secret_access_key"].as_str().unwrap_or_default(),
        )
        .env(
            "TEAM_KEY_ID",
            team_key["access_key_id"].as_str().unwrap_or_default(),
        )
        .env(
            "TEAM_SECRET",
            team_key["secret_access_key"].as_str().unwrap_or_default(),
        )
        .env(
            "VIEWER_KEY_ID",
            viewer_key["access_key_id"].as_str().unwrap_or_default(),
        )
        .env(
            "VIEWER_SECRET",
            viewer_key["secret_access_key"].as_str().unwrap_or_default(),
        )
        .env("AWS_DEFAULT_REGION", "eu-west-1")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env_remove("AWS_PROFILE")
        .env(
            "FLEETRUN_SSM_ONLY",
            std::env::var("FLEETRUN_SSM_ONLY").unwrap_or_default(),
        )
        .env_remove("AWS_ENDPOINT_URL")
        .output()
        .expect("run scenarios.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "SSM scenarios failed:\n{stdout}\n{stderr}\nserver log:\n{}",
        server.logs()
    );
    assert!(
        stdout.contains(" passed, 0 failed"),
        "no summary line:\n{stdout}"
    );
}
