//! Issue 5 (security), principals and policies: users with roles and Cedar policies, per-user tokens,
//! and a team limited to `env=dev` nodes that can neither send to, cancel on, nor read the output of an
//! `env=prod` node; a mixed send is refused whole; every refusal is in the audit trail.

use crate::support::{Agent, Http, Server, run, run_input};
use serde_json::{Value, json};
use std::time::Duration;

/// What a team limited to its `env=dev` nodes may do (the README's example).
const DEV_TEAM_POLICY: &str = r#"
// The dev team runs, cancels and reads commands on dev nodes only.
permit (
    principal,
    action in [Action::"list", Action::"send-command", Action::"cancel", Action::"read-output",
               Action::"shell", Action::"cp"],
    resource is Node
) when { resource.hasTag("env") && resource.getTag("env") == "dev" };

// ...and uses the parameters under dev/ in its scripts, no others.
permit (principal, action == Action::"use-param", resource is Parameter)
when { resource.name like "dev/*" };
"#;

pub(crate) fn call(
    server: &Server,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Http {
    let body = body.map(|b| ("application/json", b.to_string().into_bytes()));
    server
        .http(method, path, Some(token), body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

pub(crate) fn error_of(r: &Http) -> (u16, String, String) {
    let v = r.json();
    (
        r.status,
        v["error"]["code"].as_str().unwrap_or_default().to_owned(),
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// Creates a user with the CLI and returns a token for it (`tokens create --user NAME -o json`).
pub(crate) fn user_with_token(
    server: &Server,
    name: &str,
    role: &str,
    policy: Option<&str>,
) -> String {
    let mut args = vec!["users", "create", name, "--role", role];
    let file = server.dir.path().join(format!("{name}.cedar"));
    if let Some(p) = policy {
        std::fs::write(&file, p).expect("write policy");
        args.extend_from_slice(&["--policy", file.to_str().expect("utf-8 path")]);
    }
    server.cli(&args).ok();
    let t = server
        .cli(&["tokens", "create", "--user", name, "-o", "json"])
        .ok()
        .json();
    assert_eq!(t["user"], name, "{t}");
    t["token"].as_str().expect("token in -o json").to_owned()
}

fn send_body(node_ids: &[&str], script: &str) -> Value {
    json!({ "node_ids": node_ids, "commands": [script] })
}

fn commands_count(server: &Server) -> usize {
    server
        .get_json("/v1/commands?limit=1000")
        .as_array()
        .map_or(0, Vec::len)
}

#[test]
fn a_team_limited_to_dev_nodes_cannot_touch_prod_and_every_refusal_is_audited() {
    let server = Server::start();
    let _dev = Agent::start(&server, "authz-dev", &[("env", "dev")]);
    let _prod = Agent::start(&server, "authz-prod", &[("env", "prod")]);
    let (dev, prod) = (server.node_id("authz-dev"), server.node_id("authz-prod"));
    let team = user_with_token(&server, "devteam", "none", Some(DEV_TEAM_POLICY));

    // Only its own nodes are listed.
    let nodes = call(&server, &team, "GET", "/v1/nodes", None).json();
    let names: Vec<&str> = nodes
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(names, vec!["authz-dev"]);

    // Sending to its node works, and it reads the output.
    let r = call(
        &server,
        &team,
        "POST",
        "/v1/commands",
        Some(send_body(&[&dev], "echo dev-ok")),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let dev_cmd = r.json()["command_id"].as_str().expect("id").to_owned();
    server.wait_terminal(&dev_cmd, Duration::from_secs(30));
    let out = call(
        &server,
        &team,
        "GET",
        &format!("/v1/commands/{dev_cmd}/invocations/{dev}/output/stdout"),
        None,
    );
    assert_eq!(
        (out.status, out.body.as_slice()),
        (200, b"dev-ok\n".as_slice())
    );

    // Parameters: its own (dev/...) work in its scripts; another team's secret is refused, naming
    // it, even on its own node (a script could print any value it is given).
    server
        .cli(&["params", "put", "dev/token", "dev-value"])
        .ok();
    server
        .cli(&["params", "put", "prod/db_pass", "prod-secret", "--secure"])
        .ok();
    let r = call(
        &server,
        &team,
        "POST",
        "/v1/commands",
        Some(send_body(&[&dev], "echo {{param:prod/db_pass}}")),
    );
    let (status, code, message) = error_of(&r);
    assert_eq!((status, code.as_str()), (403, "AccessDenied"), "{message}");
    assert!(
        message.contains("use-param") && message.contains("prod/db_pass"),
        "{message}"
    );
    let r = call(
        &server,
        &team,
        "POST",
        "/v1/commands",
        Some(send_body(&[&dev], "echo {{param:dev/token}}")),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let param_cmd = r.json()["command_id"].as_str().expect("id").to_owned();
    server.wait_terminal(&param_cmd, Duration::from_secs(30));
    assert_eq!(server.output(&param_cmd, &dev), b"dev-value\n");

    // A send to prod, or to a mix, is refused whole, naming the prod node and only it.
    let before = commands_count(&server);
    for targets in [vec![prod.as_str()], vec![dev.as_str(), prod.as_str()]] {
        let r = call(
            &server,
            &team,
            "POST",
            "/v1/commands",
            Some(send_body(&targets, "echo no")),
        );
        let (status, code, message) = error_of(&r);
        assert_eq!((status, code.as_str()), (403, "AccessDenied"), "{message}");
        assert!(message.contains(prod.as_str()), "{message}");
        assert!(!message.contains(dev.as_str()), "{message}");
    }
    let by_tag = call(
        &server,
        &team,
        "POST",
        "/v1/commands",
        Some(json!({"targets": "tag-key:env", "commands": ["echo no"]})),
    );
    assert_eq!(error_of(&by_tag).0, 403);
    assert_eq!(
        commands_count(&server),
        before,
        "a refused send created a command"
    );

    // The CLI says the same in one line, and exits 1.
    let mut c = server.cli_cmd(&["send", "--targets", "tag:env=prod", "--", "echo no"]);
    c.env("FLEETRUN_TOKEN", &team);
    let cli = run(c, Duration::from_secs(30));
    assert_eq!(cli.code(), Some(1), "{}", cli.stderr);
    assert!(
        cli.one_line_error().contains("AccessDenied"),
        "{}",
        cli.stderr
    );
    assert!(cli.stderr.contains(prod.as_str()), "{}", cli.stderr);

    // An admin's command on prod (long enough to cancel) and one on both nodes.
    let prod_cmd = server.send(&["--node", &prod], "sleep 30");
    let both_cmd = server.send(&["--node", &dev, "--node", &prod], "echo both");
    server.wait_terminal(&both_cmd, Duration::from_secs(30));

    // Its output, invocations and the command itself are out of reach...
    for path in [
        format!("/v1/commands/{prod_cmd}/invocations/{prod}/output/stdout"),
        format!("/v1/commands/{prod_cmd}/invocations/{prod}/output/stdout?follow=true"),
        format!("/v1/commands/{both_cmd}/invocations/{prod}/output/stdout"),
        format!("/v1/commands/{prod_cmd}"),
        format!("/v1/commands/{prod_cmd}/invocations"),
        format!("/v1/commands/{prod_cmd}/watch"),
        format!("/v1/nodes/{prod}"),
    ] {
        let r = call(&server, &team, "GET", &path, None);
        assert_eq!(error_of(&r).0, 403, "GET {path}");
    }
    // ...a mixed command shows only the team's invocation...
    let invs = call(
        &server,
        &team,
        "GET",
        &format!("/v1/commands/{both_cmd}/invocations"),
        None,
    )
    .json();
    let inv_nodes: Vec<&str> = invs
        .as_array()
        .expect("invocations")
        .iter()
        .filter_map(|i| i["node_id"].as_str())
        .collect();
    assert_eq!(inv_nodes, vec![dev.as_str()]);
    // ...and listings leave the prod-only command out.
    let listed = call(&server, &team, "GET", "/v1/commands", None).json();
    let ids: Vec<&str> = listed
        .as_array()
        .expect("commands")
        .iter()
        .filter_map(|c| c["command_id"].as_str())
        .collect();
    assert!(
        ids.contains(&dev_cmd.as_str()) && ids.contains(&both_cmd.as_str()),
        "{ids:?}"
    );
    assert!(!ids.contains(&prod_cmd.as_str()), "{ids:?}");

    // A dev node that joins later is the team's at once (cached scopes follow the fleet).
    let _dev2 = Agent::start(&server, "authz-dev-2", &[("env", "dev")]);
    let dev2 = server.node_id("authz-dev-2");
    let later = server.send(&["--node", &dev2], "echo later");
    let listed = call(&server, &team, "GET", "/v1/commands", None).json();
    assert!(
        listed
            .as_array()
            .expect("commands")
            .iter()
            .any(|c| c["command_id"] == later.as_str()),
        "{listed}"
    );

    // Cancel on prod is refused and the command keeps running; on its own node it may.
    let r = call(
        &server,
        &team,
        "POST",
        &format!("/v1/commands/{prod_cmd}/cancel"),
        Some(json!({})),
    );
    assert_eq!(error_of(&r).0, 403);
    assert_eq!(server.command(&prod_cmd)["status"], "InProgress");
    server.cli(&["cancel", &prod_cmd]).ok();
    server.wait_terminal(&prod_cmd, Duration::from_secs(30));

    // Team-wide management is refused too.
    for (method, path, body) in [
        ("GET", "/v1/audit", None),
        ("POST", "/v1/activations", Some(json!({}))),
        ("DELETE", &*format!("/v1/nodes/{dev}"), None),
        (
            "POST",
            "/v1/users",
            Some(json!({"name": "x", "role": "admin"})),
        ),
    ] {
        let r = call(&server, &team, method, path, body);
        assert_eq!(error_of(&r).0, 403, "{method} {path}");
    }

    // Every refusal is in the audit trail under the team's name.
    let records = server
        .cli(&[
            "audit",
            "--principal",
            "devteam",
            "--limit",
            "1000",
            "-o",
            "json",
        ])
        .ok()
        .json();
    let denied: Vec<(String, String)> = records
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["result"] == "403 AccessDenied")
        .map(|r| {
            (
                r["action"].as_str().unwrap_or_default().to_owned(),
                r["node_ids"].to_string(),
            )
        })
        .collect();
    for action in [
        "commands.send",
        "commands.cancel",
        "commands.output",
        "commands.get",
        "commands.invocations",
        "activations.create",
        "users.create",
    ] {
        assert!(
            denied.iter().any(|(a, _)| a == action),
            "no refused {action} in {denied:?}"
        );
    }
    assert!(
        denied
            .iter()
            .any(|(a, nodes)| a == "commands.send" && nodes.contains(prod.as_str())),
        "{denied:?}"
    );
}

#[test]
fn roles_tokens_and_users_behave_and_nothing_is_allowed_by_default() {
    let server = Server::start();
    let _a = Agent::start(&server, "roles-1", &[("env", "dev")]);
    let node = server.node_id("roles-1");

    // A viewer reads but cannot send.
    let viewer = user_with_token(&server, "vera", "viewer", None);
    let r = call(
        &server,
        &viewer,
        "POST",
        "/v1/commands",
        Some(send_body(&[&node], "echo x")),
    );
    let (status, code, message) = error_of(&r);
    assert_eq!((status, code.as_str()), (403, "AccessDenied"));
    assert!(
        message.contains("vera") && message.contains("send-command"),
        "{message}"
    );
    let id = server.send(&["--node", &node], "echo viewable");
    server.wait_terminal(&id, Duration::from_secs(30));
    let out = call(
        &server,
        &viewer,
        "GET",
        &format!("/v1/commands/{id}/invocations/{node}/output/stdout"),
        None,
    );
    assert_eq!(out.body, b"viewable\n");

    // An operator sends; it may not manage users or read the audit trail.
    let op = user_with_token(&server, "otto", "operator", None);
    let r = call(
        &server,
        &op,
        "POST",
        "/v1/commands",
        Some(send_body(&[&node], "echo op")),
    );
    assert_eq!(r.status, 201);
    assert_eq!(
        error_of(&call(&server, &op, "GET", "/v1/users", None)).0,
        403
    );
    assert_eq!(
        error_of(&call(&server, &op, "GET", "/v1/audit", None)).0,
        403
    );

    // A user with no role and no policy may do nothing but ask who it is.
    let nobody = user_with_token(&server, "nobody", "none", None);
    let me = call(&server, &nobody, "GET", "/v1/whoami", None).json();
    assert_eq!(
        (me["user"].as_str(), me["role"].as_str()),
        (Some("nobody"), Some("none"))
    );
    assert_eq!(
        call(&server, &nobody, "GET", "/v1/nodes", None).json(),
        json!([])
    );
    assert_eq!(
        call(&server, &nobody, "GET", "/v1/commands", None).json(),
        json!([])
    );
    for (method, path) in [
        ("GET", format!("/v1/commands/{id}")),
        ("GET", "/v1/storage".to_owned()),
        ("GET", "/v1/activations".to_owned()),
    ] {
        assert_eq!(
            error_of(&call(&server, &nobody, method, &path, None)).0,
            403,
            "{path}"
        );
    }

    // Its own tokens are its own business; another user's are not.
    let mine = call(
        &server,
        &nobody,
        "POST",
        "/v1/tokens",
        Some(json!({"name": "second"})),
    );
    assert_eq!(mine.status, 201);
    let theirs = call(
        &server,
        &nobody,
        "POST",
        "/v1/tokens",
        Some(json!({"user": "admin"})),
    );
    assert_eq!(error_of(&theirs).0, 403);
    let listed = call(&server, &nobody, "GET", "/v1/tokens", None).json();
    assert!(
        listed
            .as_array()
            .expect("tokens")
            .iter()
            .all(|t| t["user"] == "nobody" && t.get("token").is_none()),
        "{listed}"
    );

    // A revoked token stops working at once; so do a deleted user's.
    let second = mine.json();
    let (tid, tsecret) = (
        second["id"].as_str().expect("id"),
        second["token"].as_str().expect("token"),
    );
    server.cli(&["tokens", "delete", tid]).ok();
    assert_eq!(
        call(&server, tsecret, "GET", "/v1/whoami", None).status,
        401
    );
    server.cli(&["users", "delete", "vera"]).ok();
    assert_eq!(
        call(&server, &viewer, "GET", "/v1/whoami", None).status,
        401
    );

    // Role changes take effect on the next request.
    server
        .cli(&["users", "update", "nobody", "--role", "operator"])
        .ok();
    let r = call(
        &server,
        &nobody,
        "POST",
        "/v1/commands",
        Some(send_body(&[&node], "echo promoted")),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));

    // The last admin can be neither deleted nor demoted.
    let out = server.cli(&["users", "delete", "admin"]);
    assert_eq!(out.code(), Some(1));
    assert!(
        out.one_line_error().contains("last admin"),
        "{}",
        out.stderr
    );
    let out = server.cli(&["users", "update", "admin", "--role", "viewer"]);
    assert!(
        out.one_line_error().contains("last admin"),
        "{}",
        out.stderr
    );

    // Expired tokens do not work.
    let t = call(
        &server,
        &op,
        "POST",
        "/v1/tokens",
        Some(json!({"expires_in_secs": 1})),
    )
    .json();
    let short = t["token"].as_str().expect("token").to_owned();
    crate::support::wait_until("the 1 s token to expire", Duration::from_secs(10), || {
        (call(&server, &short, "GET", "/v1/whoami", None).status == 401).then_some(())
    });
}

#[test]
fn policies_are_validated_before_they_are_stored() {
    let server = Server::start();
    let good = server.dir.path().join("good.cedar");
    std::fs::write(&good, DEV_TEAM_POLICY).expect("write");
    let out = server.cli(&["policies", "validate", good.to_str().expect("path")]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stdout_str().contains("2 policies, valid"),
        "{}",
        out.stdout_str()
    );

    let bad = server.dir.path().join("bad.cedar");
    std::fs::write(
        &bad,
        r#"permit (principal, action == Action::"sned-command", resource);"#,
    )
    .expect("write");
    let out = server.cli(&["policies", "validate", bad.to_str().expect("path")]);
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("sned-command"), "{}", out.stderr);

    // The server refuses it too, naming the problem; nothing is created.
    let r = server.post_json(
        "/v1/users",
        &json!({"name": "typo", "role": "none", "policy": "permit (principal, action == Action::\"sned-command\", resource);"}),
    );
    let (status, code, message) = error_of(&r);
    assert_eq!((status, code.as_str()), (400, "InvalidPolicy"), "{message}");
    assert!(message.contains("sned-command"), "{message}");
    assert_eq!(server.get("/v1/users/typo").status, 404);

    // `login` checks the token and saves it; the CLI then works without --token.
    let t = server.cli(&["tokens", "create", "-o", "json"]).ok().json();
    let mut c = server.cli_cmd(&["login", "--token-stdin"]);
    c.env_remove("FLEETRUN_TOKEN");
    let token = format!("{}\n", t["token"].as_str().expect("token"));
    let out = run_input(c, Some(token.as_bytes()), Duration::from_secs(30));
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let mut c = server.cli_cmd(&["whoami", "-o", "json"]);
    c.env_remove("FLEETRUN_TOKEN");
    let me = run(c, Duration::from_secs(30)).ok().json();
    assert_eq!(me["user"], "admin");
}

#[test]
fn each_principal_has_its_own_request_rate_limit() {
    // 1 request/s with bursts of 4: a tight loop of 30 is over it (even if a loaded machine makes
    // the loop take 15 s); another user is not affected.
    let server = Server::start_with(&["--rate-limit", "1"]);
    let busy = user_with_token(&server, "busy", "viewer", None);
    let statuses: Vec<u16> = (0..30)
        .map(|_| call(&server, &busy, "GET", "/v1/whoami", None).status)
        .collect();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(statuses[0] == 200 && limited >= 10, "{statuses:?}");
    let r = call(&server, &busy, "GET", "/v1/whoami", None);
    let (status, code, message) = error_of(&r);
    assert_eq!(
        (status, code.as_str()),
        (429, "TooManyRequests"),
        "{message}"
    );
    assert!(message.contains("busy"), "{message}");
    assert_eq!(
        call(&server, &server.token, "GET", "/v1/whoami", None).status,
        200
    );
    let records = server
        .cli(&[
            "audit",
            "--principal",
            "busy",
            "--limit",
            "100",
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert!(
        records
            .as_array()
            .expect("records")
            .iter()
            .any(|r| r["result"] == "429 TooManyRequests"),
        "{records}"
    );
}
