//! Issue 9 (hardening), the write path under hostile load: refused requests and reads never wait for
//! the database writer, and a refused request's body is audited as a digest, not kept whole.

use crate::support::{RawRequest, Server, raw_request};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Bytes of a body above which a refused request is recorded as its length and SHA-256 (the
/// server's `audit::BODY_INLINE_MAX`).
const BODY_INLINE_MAX: usize = 4 * 1024;

/// One request as the admin with its own timeout: `Err` when no answer came in time.
fn request(
    server: &Server,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), String> {
    let mut req = RawRequest::new(method, path);
    req.headers = vec![("authorization", format!("Bearer {}", server.token))];
    if let Some(b) = body {
        req.headers
            .push(("content-type", "application/json".into()));
        req.body = b;
    }
    req.timeout = timeout;
    raw_request(server, req).map(|a| (a.status, a.body))
}

#[test]
fn big_refused_bodies_are_audited_as_a_digest_not_kept_whole() {
    // SQLite, whatever the run's database: the test weighs the database files.
    let server = Server::start_sqlite();
    // Sends refused with 400 (no node matches; malformed JSON), each body ~1 MiB.
    let filler = "x".repeat(1024 * 1024);
    let denied = json!({"targets": "all", "commands": [filler]}).to_string();
    let malformed = format!("{{\"targets\": \"all\", \"commands\": [\"{filler}\"], \"bogus\": ");
    for i in 0..4 {
        let body = if i % 2 == 0 { &denied } else { &malformed };
        let (status, resp) = request(
            &server,
            "POST",
            "/v1/commands",
            Some(body.clone().into_bytes()),
            Duration::from_secs(30),
        )
        .expect("POST /v1/commands");
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&resp));
    }
    // A small body keeps its script, as before (refused or not).
    let small = server.post_json(
        "/v1/commands",
        &json!({"targets": "all", "commands": ["echo kept-script-marker"]}),
    );
    assert!(
        small.status < 500,
        "{}",
        String::from_utf8_lossy(&small.body)
    );

    let records = server.get_json("/v1/audit?action=commands.send&limit=100");
    let records = records.as_array().expect("records");
    // (Messages show record sizes, never whole records: before the fix each held a 1 MiB body.)
    let sizes: Vec<usize> = records.iter().map(|r| r.to_string().len()).collect();
    let refused: Vec<&Value> = records
        .iter()
        .filter(|r| r["result"].as_str().is_some_and(|s| s.starts_with("400")))
        .filter(|r| r["params"]["body_bytes"].as_u64().unwrap_or(0) > 1024 * 1024)
        .collect();
    assert_eq!(refused.len(), 4, "record sizes {sizes:?}");
    for r in &refused {
        let size = r.to_string().len();
        assert!(size < BODY_INLINE_MAX, "a refused record is {size} bytes");
        assert_eq!(
            r["params"]["body_sha256"].as_str().map(str::len),
            Some(64),
            "record sizes {sizes:?}"
        );
        assert!(r["params"].get("body").is_none(), "record sizes {sizes:?}");
    }
    // The database did not grow by the bodies either (4 MiB sent).
    let db_bytes: u64 = ["fleetrun.db", "fleetrun.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(server.data_dir.join(f)).ok())
        .map(|m| m.len())
        .sum();
    assert!(
        db_bytes < 3 * 1024 * 1024,
        "database files are {db_bytes} bytes"
    );
    assert!(
        records
            .iter()
            .any(|r| r["params"].to_string().contains("kept-script-marker")),
        "record sizes {sizes:?}"
    );
}

#[test]
fn refused_requests_and_reads_are_answered_while_the_writer_is_blocked() {
    // SQLite, whatever the run's database: the test holds the SQLite file's write lock.
    let server = Server::start_sqlite();
    // Hold SQLite's write lock from outside: the server's writer cannot commit until it is released.
    let db = server.data_dir.join("fleetrun.db");
    let mut lock = Command::new("sqlite3")
        .arg("-cmd")
        .arg(".timeout 10000")
        .arg(&db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sqlite3 (install the sqlite3 CLI)");
    let mut stdin = lock.stdin.take().expect("stdin");
    writeln!(stdin, "BEGIN IMMEDIATE;\n.print locked").expect("write to sqlite3");
    stdin.flush().expect("flush");
    let mut line = String::new();
    BufReader::new(lock.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read sqlite3");
    assert_eq!(line.trim(), "locked");

    // Answered well within the writer's busy timeout (10 s): nothing of these waits for a commit.
    let quick = Duration::from_secs(5);
    let (status, body) = request(
        &server,
        "POST",
        "/v1/commands",
        Some(b"{\"targets\": \"all\", \"commands\": ".to_vec()),
        quick,
    )
    .expect("a malformed POST is answered while the writer is blocked");
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let err: Value = serde_json::from_slice(&body).expect("JSON error");
    assert_eq!(err["error"]["code"], "InvalidRequest", "{err}");
    let (status, _) = request(&server, "GET", "/v1/commands", None, quick)
        .expect("a read is answered while the writer is blocked");
    assert_eq!(status, 200);
    let mut c = server.cli_cmd(&["nodes"]);
    c.env("FLEETRUN_TOKEN", "frt_wrong-token-xyz");
    let refused = crate::support::run(c, quick + Duration::from_secs(5));
    assert!(
        refused.one_line_error().contains("Unauthorized"),
        "{}",
        refused.stderr
    );

    // Released: the queued records are committed, and the listing shows them.
    drop(stdin);
    let _ = lock.wait();
    let records = server.get_json("/v1/audit?limit=100");
    let records = records.as_array().expect("records");
    assert!(
        records
            .iter()
            .any(|r| r["action"] == "commands.send" && r["result"] == "400 InvalidRequest"),
        "{records:?}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["action"] == "nodes.list" && r["result"] == "401 Unauthorized"),
        "{records:?}"
    );
    let v = server.cli(&["audit", "verify"]).ok().stdout_str();
    assert!(v.contains("audit chain intact"), "{v}");
}
