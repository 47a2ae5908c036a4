//! Hostile input gets a 400 naming the limit, and the server stays up: deeply nested policies (they
//! overflowed the parser's stack and aborted the process), unbounded target expressions (500s from
//! SQLite, megabytes stored and re-expanded on every listing).

use crate::support::{Server, wait_until};
use serde_json::{Value, json};
use std::time::Duration;

const HEAD: &str = "permit(principal, action, resource) when { ";

/// The three texts of issue 9 that aborted the server.
fn deep_policies() -> Vec<(&'static str, String)> {
    vec![
        (
            "150 nested parentheses",
            format!("{HEAD}{}true{} }};", "(".repeat(150), ")".repeat(150)),
        ),
        (
            "2,000 nested if",
            format!(
                "{HEAD}{}true{} }};",
                "if true then ".repeat(2_000),
                " else true".repeat(2_000)
            ),
        ),
        (
            "8,000 nested [",
            format!(
                "{HEAD}{}1{} == [] }};",
                "[".repeat(8_000),
                "]".repeat(8_000)
            ),
        ),
    ]
}

fn assert_refused(server: &Server, what: &str, r: &crate::support::Http, code: &str, needle: &str) {
    assert_eq!(
        r.status,
        400,
        "{what}: {}",
        String::from_utf8_lossy(&r.body)
    );
    let body: Value = r.json();
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "{what}: {message}");
    assert_eq!(server.get("/v1/health").status, 200, "after {what}");
}

#[test]
fn deeply_nested_policies_are_refused_and_the_server_stays_up() {
    let mut server = Server::start();
    let r = server.post_json("/v1/users", &json!({"name": "plain", "role": "viewer"}));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    for (i, (what, policy)) in deep_policies().into_iter().enumerate() {
        let r = server.post_json(
            "/v1/users",
            &json!({"name": format!("deep{i}"), "role": "viewer", "policy": policy}),
        );
        assert_refused(&server, what, &r, "InvalidPolicy", "the limit is 32");
        let r = crate::support::http(
            server.ca.as_deref(),
            "PUT",
            &format!("{}/v1/users/plain", server.url),
            Some(&server.token),
            Some((
                "application/json",
                json!({ "policy": policy }).to_string().into_bytes(),
            )),
        )
        .expect("PUT /v1/users/plain");
        assert_refused(&server, what, &r, "InvalidPolicy", "the limit is 32");

        let file = server.scratch("policies").join(format!("deep{i}.cedar"));
        std::fs::write(&file, &policy).expect("write policy");
        let out = server.cli(&["policies", "validate", file.to_str().expect("path")]);
        assert_eq!(out.code(), Some(1), "{what}: {}", out.stderr);
        assert!(
            out.stderr.contains("the limit is 32"),
            "{what}: {}",
            out.stderr
        );
    }
    let huge = format!("// {}\n", "x".repeat(70_000));
    let r = server.post_json(
        "/v1/users",
        &json!({"name": "huge", "role": "viewer", "policy": huge}),
    );
    assert_refused(
        &server,
        "a 70 KB policy",
        &r,
        "InvalidPolicy",
        "the limit is 65536",
    );
    assert!(server.running(), "the server process is alive");
    wait_until("the server answers", Duration::from_secs(10), || {
        (server.get("/v1/health").status == 200).then_some(())
    });
}

#[test]
fn unbounded_target_expressions_are_refused_naming_the_limit() {
    let mut server = Server::start();
    let send = |targets: String| {
        server.post_json(
            "/v1/commands",
            &json!({"targets": targets, "commands": ["true"]}),
        )
    };
    let id = |n: usize| format!("mi-{n:017x}");
    let values = |n: usize| {
        (0..n)
            .map(|i| format!("v{i}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    for (what, targets, needle) in [
        (
            "1,001 tag terms",
            vec!["tag:e=p"; 1_001].join(" "),
            "the limit is 10",
        ),
        (
            "11 terms",
            ["tag:env=prod"; 11].join(" "),
            "the limit is 10",
        ),
        (
            "40,000 values in one term",
            format!("tag:env={}", values(40_000)),
            "the limit is 8192",
        ),
        (
            "51 values in one term",
            format!("tag:env={}", values(51)),
            "the limit is 50 per term",
        ),
        (
            "40,000 ids",
            format!("id:{}", (0..40_000).map(id).collect::<Vec<_>>().join(",")),
            "the limit is 8192",
        ),
        (
            "a 1 MB `all all ...`",
            "all ".repeat(256 * 1024),
            "the limit is 8192",
        ),
    ] {
        let r = send(targets);
        assert_refused(&server, what, &r, "InvalidTarget", needle);
    }
    // The largest accepted shapes resolve (no node matches them: a 400 saying so, not a 500).
    let ten_terms = (0..10)
        .map(|t| format!("tag:k{t}={}", values(50)))
        .collect::<Vec<_>>()
        .join(" ");
    assert!(ten_terms.len() <= 8192);
    let r = send(ten_terms);
    assert_refused(
        &server,
        "10 terms of 50 values",
        &r,
        "InvalidTarget",
        "no node matches",
    );
    let ids = format!("id:{}", (0..50).map(id).collect::<Vec<_>>().join(","));
    let r = send(ids);
    assert_refused(&server, "50 ids", &r, "InvalidTarget", "no node matches");
    assert!(server.running(), "the server process is alive");
}
