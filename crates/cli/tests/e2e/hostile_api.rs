//! Hostile input and hostile clients on the API edges (issue 9): a signed SSM request whose body is
//! swapped, numbers that used to wrap, oversized tag keys, framework errors that were not JSON, a
//! lock-out of a NAT's valid credentials by its neighbours' failures; and `GET /v1/commands?before=`.

use crate::node_identity::{dial_channel, next_frame};
use crate::support::{Agent, RawAnswer, RawRequest, Server, raw_request};
use fleetrun_server::access::authn::sigv4;
use serde_json::{Value, json};
use std::time::{Duration, SystemTime};

/// One request with the given headers against the real server.
fn raw(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> RawAnswer {
    let mut req = RawRequest::new(method, path);
    req.headers = headers.to_vec();
    req.body = body;
    raw_request(server, req).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn bearer(server: &Server) -> (&'static str, String) {
    ("authorization", format!("Bearer {}", server.token))
}

/// An access key (id, secret) for the admin.
fn access_key(server: &Server) -> (String, String) {
    let r = server.post_json("/v1/access-keys", &json!({"name": "hostile"}));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let k = r.json();
    (
        k["access_key_id"].as_str().expect("id").to_owned(),
        k["secret_access_key"].as_str().expect("secret").to_owned(),
    )
}

fn amz_date() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace(['-', ':'], "")
}

/// An SSM call signed over `signed_body` (with an x-amz-content-sha256 header when `hash_header`),
/// sending `sent_body`.
fn ssm_call(
    server: &Server,
    key: &(String, String),
    op: &str,
    signed_body: &[u8],
    sent_body: &[u8],
    hash_header: bool,
) -> RawAnswer {
    let host = server
        .url
        .split_once("://")
        .map(|(_, h)| h.trim_end_matches('/'))
        .expect("url")
        .to_owned();
    let mut headers: Vec<(String, String)> = vec![
        ("host".into(), host),
        ("x-amz-date".into(), amz_date()),
        ("x-amz-target".into(), format!("AmazonSSM.{op}")),
    ];
    let mut names = vec!["host", "x-amz-date", "x-amz-target"];
    if hash_header {
        // The bodies here are JSON text; secrets::hash is hex SHA-256.
        let text = std::str::from_utf8(signed_body).expect("utf-8 body");
        headers.push((
            "x-amz-content-sha256".into(),
            fleetrun_server::access::secrets::hash(text),
        ));
        names.push("x-amz-content-sha256");
    }
    let req = sigv4::Request {
        method: "POST",
        path: "/",
        query: "",
        headers: &headers,
        body: signed_body,
    };
    let auth = sigv4::sign(&key.0, &key.1, "us-east-1", &req, &names).expect("sign");
    let mut send: Vec<(&str, String)> = headers
        .iter()
        .filter(|(n, _)| n != "host")
        .map(|(n, v)| (n.as_str(), v.clone()))
        .collect();
    send.push(("authorization", auth));
    send.push(("content-type", "application/x-amz-json-1.1".into()));
    raw(server, "POST", "/", &send, sent_body.to_vec())
}

fn assert_ssm_error(r: &RawAnswer, status: u16, code: &str) -> String {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.header("content-type").unwrap_or(""),
        "application/x-amz-json-1.1"
    );
    let v = r.json();
    assert_eq!(v["__type"], code, "{v}");
    v["message"].as_str().expect("message").to_owned()
}

fn assert_native_error(r: &RawAnswer, status: u16, code: &str) -> String {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("application/json"),
        "{}",
        r.header("content-type").unwrap_or("")
    );
    let v = r.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    v["error"]["message"].as_str().expect("message").to_owned()
}

// Item 1. Fails before the fix: the server took the payload hash from the header, so body B ran.
#[test]
fn a_signed_ssm_request_with_a_swapped_body_is_refused() {
    let server = Server::start();
    let key = access_key(&server);
    let list = br#"{"MaxResults": 5}"#;
    for hash_header in [false, true] {
        let r = ssm_call(&server, &key, "ListCommands", list, list, hash_header);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    let a = br#"{"DocumentName":"AWS-RunShellScript","Targets":[{"Key":"tag:env","Values":["none"]}],"Parameters":{"commands":["true"]}}"#;
    let b = br#"{"DocumentName":"AWS-RunShellScript","Targets":[{"Key":"InstanceIds","Values":["*"]}],"Parameters":{"commands":["echo owned"]}}"#;
    for hash_header in [true, false] {
        let r = ssm_call(&server, &key, "SendCommand", a, b, hash_header);
        let m = assert_ssm_error(&r, 400, "InvalidSignatureException");
        assert!(
            m.contains("x-amz-content-sha256") || m.contains("signature"),
            "{m}"
        );
    }
    // Nothing ran.
    let listed = server.get_json("/v1/commands");
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
}

// Item 9. Fails before the fix: the token wrapped to a negative offset (first page), seq to ok:true.
#[test]
fn numbers_past_i64_are_refused_not_wrapped() {
    let server = Server::start();
    let key = access_key(&server);
    let body = br#"{"NextToken": "fr1.ffffffffffffffff"}"#;
    let r = ssm_call(&server, &key, "ListCommands", body, body, false);
    assert_ssm_error(&r, 400, "InvalidNextToken");
    let body = br#"{"NextToken": "fr1.8000000000000000"}"#;
    let r = ssm_call(&server, &key, "ListCommandInvocations", body, body, false);
    assert_ssm_error(&r, 400, "InvalidNextToken");

    let r = raw(
        &server,
        "POST",
        "/v1/audit/verify",
        &[bearer(&server), ("content-type", "application/json".into())],
        br#"{"seq": 9223372036854775808, "hash": "00"}"#.to_vec(),
    );
    let m = assert_native_error(&r, 400, "InvalidParameters");
    assert!(
        m.contains("seq") && m.contains("9223372036854775807"),
        "{m}"
    );
}

// Item 10. Fails before the fix: a 10 KB tag key was accepted.
#[test]
fn oversized_ssm_target_keys_and_values_are_refused() {
    let server = Server::start();
    let key = access_key(&server);
    let send = |k: &str, v: &str| {
        let body = json!({
            "DocumentName": "AWS-RunShellScript",
            "Targets": [{"Key": k, "Values": [v]}],
            "Parameters": {"commands": ["true"]},
        })
        .to_string();
        ssm_call(
            &server,
            &key,
            "SendCommand",
            body.as_bytes(),
            body.as_bytes(),
            false,
        )
    };
    let long_key = format!("tag:{}", "k".repeat(10 * 1024));
    let m = assert_ssm_error(&send(&long_key, "v"), 400, "ValidationException");
    assert!(m.contains("163") && m.len() < 1000, "{m}");
    let m = assert_ssm_error(
        &send("tag:env", &"v".repeat(300)),
        400,
        "ValidationException",
    );
    assert!(m.contains("256"), "{m}");
    let m = assert_ssm_error(&send("tag:en\u{0}v", "v"), 400, "ValidationException");
    assert!(m.contains("control"), "{m}");
    let body = json!({"Filters": [{"Key": long_key, "Values": ["v"]}]}).to_string();
    let r = ssm_call(
        &server,
        &key,
        "DescribeInstanceInformation",
        body.as_bytes(),
        body.as_bytes(),
        false,
    );
    assert_ssm_error(&r, 400, "ValidationException");
}

// Item 11. Fails before the fix: empty 405s, text/plain path rejections and 413s.
#[test]
fn framework_errors_are_the_apis_json() {
    let server = Server::start();
    let r = raw(
        &server,
        "DELETE",
        "/v1/audit/verify",
        &[bearer(&server)],
        vec![],
    );
    let m = assert_native_error(&r, 405, "MethodNotAllowed");
    assert!(
        m.contains("DELETE") && m.contains("/v1/audit/verify"),
        "{m}"
    );
    let r = raw(&server, "GET", "/", &[], vec![]);
    assert_ssm_error(&r, 405, "UnknownOperationException");
    let r = raw(&server, "GET", "/v1/nodes/%ff", &[bearer(&server)], vec![]);
    assert_native_error(&r, 400, "InvalidRequest");
    let r = raw(&server, "GET", "/v1/agent/connect", &[], vec![]);
    assert!(r.status >= 400, "{}", r.status);
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("application/json"),
        "{}",
        r.header("content-type").unwrap_or("")
    );
    let big = vec![b' '; 3 * 1024 * 1024];
    let r = raw(
        &server,
        "POST",
        "/",
        &[("x-amz-target", "AmazonSSM.ListCommands".into())],
        big,
    );
    let m = assert_ssm_error(&r, 400, "ValidationException");
    assert!(m.contains("2097152"), "{m}");
}

// Item 12. Fails before the change: `before` was an unknown query member (400).
#[test]
fn commands_list_before_a_cursor() {
    let server = Server::start();
    let _agent = Agent::start(&server, "cursor-node", &[]);
    let node = server.wait_online("cursor-node")["node_id"]
        .as_str()
        .expect("node id")
        .to_owned();
    let ids: Vec<String> = (0..3)
        .map(|i| {
            let id = server.send(&["--node", &node], &format!("echo {i}"));
            // Distinct requested times, so the time cursor below is exact.
            std::thread::sleep(Duration::from_millis(5));
            id
        })
        .collect();
    let listed = |q: &str| -> Vec<String> {
        server
            .get_json(&format!("/v1/commands?{q}"))
            .as_array()
            .expect("array")
            .iter()
            .map(|c| c["command_id"].as_str().expect("id").to_owned())
            .collect()
    };
    assert_eq!(listed("limit=2"), vec![ids[2].clone(), ids[1].clone()]);
    assert_eq!(
        listed(&format!("limit=2&before={}", ids[1])),
        vec![ids[0].clone()]
    );
    assert_eq!(listed(&format!("before={}", ids[0])), Vec::<String>::new());
    let at = server.command(&ids[2])["requested_at"]
        .as_str()
        .expect("time")
        .to_owned();
    assert_eq!(
        listed(&format!("before={at}")),
        vec![ids[1].clone(), ids[0].clone()]
    );
    let r = raw(
        &server,
        "GET",
        "/v1/commands?before=yesterday",
        &[bearer(&server)],
        vec![],
    );
    let m = assert_native_error(&r, 400, "InvalidParameters");
    assert!(m.contains("before"), "{m}");
}

// Item 13. Fails before the change: 10 bad tokens locked the address, the valid token with it.
#[test]
fn a_valid_token_gets_in_after_a_neighbour_fails_and_the_guessed_one_stays_locked() {
    let server = Server::start();
    let bad = ("authorization", "Bearer frt_guessed".to_owned());
    fail_ten_times(&server, &bad);
    let r = raw(&server, "GET", "/v1/nodes", &[bearer(&server)], vec![]);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = raw(&server, "GET", "/v1/nodes", &[bad], vec![]);
    assert_native_error(&r, 429, "TooManyFailedAuthentications");
    // The refusals are audited.
    let audit = server.get_json("/v1/audit?principal=anonymous&limit=100");
    let refused = audit
        .as_array()
        .expect("array")
        .iter()
        .filter(|a| {
            a["result"]
                .as_str()
                .is_some_and(|r| r.starts_with("401") || r.starts_with("429"))
        })
        .count();
    assert!(refused >= 11, "{audit}");
}

/// Registers by hand over the agent channel with `info`; the server's answer.
fn raw_register(server: &Server, code: &str, info: fleetrun_proto::channel::NodeInfo) -> Value {
    use fleetrun_proto::auth::{self, NodeKey};
    use fleetrun_proto::channel::{AgentFrame, ServerFrame};
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut ws = dial_channel(server).await.expect("dial the agent channel");
        let ServerFrame::Challenge { nonce } = next_frame(&mut ws).await else {
            panic!("the server's first frame is not a Challenge");
        };
        let key = NodeKey::from_seed([7; 32]);
        let pk = key.public_key();
        let register = AgentFrame::Register {
            protocol_version: fleetrun_proto::version::PROTOCOL_VERSION,
            activation_code: code.to_owned(),
            public_key: pk.to_vec(),
            signature: key.sign(&auth::register_message(&nonce, &pk)),
            info,
            tags: Default::default(),
        };
        ws.send(Message::Binary(register.encode().into()))
            .await
            .expect("send Register");
        match next_frame(&mut ws).await {
            ServerFrame::Error { code, message } => json!({"error": code, "message": message}),
            ServerFrame::Registered { node_id } => json!({"registered": node_id.to_string()}),
            other => panic!("unexpected answer {other:?}"),
        }
    })
}

// Item 10. Fails before the fix: a NUL in a node name was registered and stored.
#[test]
fn a_register_frame_with_a_control_character_in_the_name_is_refused() {
    use fleetrun_proto::channel::NodeInfo;
    let server = Server::start();
    let code = server.activation_code(&[], 2);
    let info = |name: &str| NodeInfo {
        name: name.into(),
        hostname: "h".into(),
        ..NodeInfo::default()
    };
    let answer = raw_register(&server, &code, info("web\u{0}1"));
    assert_eq!(answer["error"], "BadNodeInfo", "{answer}");
    let m = answer["message"].as_str().expect("message");
    assert!(m.contains("control character U+0000"), "{m}");
    assert!(server.nodes().is_empty());
    // The same registration with a printable name goes through: only the name was wrong.
    let answer = raw_register(&server, &code, info("web-1"));
    assert!(answer["registered"].is_string(), "{answer}");
}

/// The `Retry-After` of an answer, in seconds.
fn retry_after(r: &RawAnswer) -> u64 {
    r.header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric Retry-After: {:?}", r.headers))
}

/// The audit records of anonymous callers whose result is `result`.
fn anonymous_results(server: &Server, result: &str) -> usize {
    let audit = server.get_json("/v1/audit?principal=anonymous&limit=1000");
    audit
        .as_array()
        .expect("array")
        .iter()
        .filter(|a| a["result"] == result)
        .count()
}

// Issue 10, point 1. Fails before the change: the brute-force 429 was built by hand, without the
// error code the audit record takes (recorded as a bare "429").
#[test]
fn the_brute_force_429_names_its_code_in_body_header_and_audit() {
    let server = Server::start();
    let bad = ("authorization", "Bearer frt_guessed_again".to_owned());
    fail_ten_times(&server, &bad);
    let r = raw(&server, "GET", "/v1/nodes", &[bad], vec![]);
    let m = assert_native_error(&r, 429, "TooManyFailedAuthentications");
    let secs = retry_after(&r);
    assert!((1..=60).contains(&secs), "Retry-After {secs}");
    assert!(m.contains(&format!("retry in {secs} s")), "{m}");
    assert_eq!(
        anonymous_results(&server, "429 TooManyFailedAuthentications"),
        1
    );
    assert_eq!(anonymous_results(&server, "429"), 0);
}

// Issue 10, point 3: one gate counts a refused credential the same on both APIs. 10 bad SigV4
// signatures with one access key lock that key as 10 bad tokens lock a token, and the throttle is
// answered in each API's shape, with Retry-After, and audited with its code.
#[test]
fn both_apis_count_a_bad_credential_the_same() {
    let server = Server::start();
    let (id, _) = access_key(&server);
    let wrong = (id, "not-the-secret".to_owned());
    let body = br#"{}"#;
    for i in 0..10 {
        let r = ssm_call(
            &server,
            &wrong,
            "DescribeInstanceInformation",
            body,
            body,
            false,
        );
        assert_eq!(r.status, 400, "attempt {i}");
        assert_ssm_error(&r, 400, "InvalidSignatureException");
    }
    let r = ssm_call(
        &server,
        &wrong,
        "DescribeInstanceInformation",
        body,
        body,
        false,
    );
    let m = assert_ssm_error(&r, 400, "ThrottlingException");
    let secs = retry_after(&r);
    assert!((1..=60).contains(&secs), "Retry-After {secs}");
    assert_eq!(
        m,
        format!(
            "Rate exceeded: too many failed authentications from this address or with this access key; retry in {secs} s"
        )
    );
    assert!(r.header("x-amzn-requestid").is_some(), "no request id");
    assert_eq!(
        anonymous_results(&server, "400 InvalidSignatureException"),
        10
    );
    assert_eq!(anonymous_results(&server, "400 ThrottlingException"), 1);

    // The same count on the native API: the 11th bad token is the first refused unread.
    let bad = ("authorization", "Bearer frt_counted".to_owned());
    fail_ten_times(&server, &bad);
    let r = raw(&server, "GET", "/v1/nodes", &[bad], vec![]);
    assert_native_error(&r, 429, "TooManyFailedAuthentications");
    assert!((1..=60).contains(&retry_after(&r)));
}

/// Ten refused requests with the bad bearer `bad` (the guard's per-credential limit).
fn fail_ten_times(server: &Server, bad: &(&'static str, String)) {
    for _ in 0..10 {
        let r = raw(
            server,
            "GET",
            "/v1/nodes",
            std::slice::from_ref(bad),
            vec![],
        );
        assert_native_error(&r, 401, "Unauthorized");
    }
}
