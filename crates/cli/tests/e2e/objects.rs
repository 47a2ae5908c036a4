//! Issue 12, `fleetrun objects put|get|ls|rm` against a real server: streamed uploads checked by
//! SHA-256 on both sides, replacement only once complete, a cut upload leaving nothing behind,
//! one upload per key at a time, bad keys and missing permissions refused and audited.

use crate::support::{Server, http, noise, wait_until};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn sha256sum(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn objects_go_up_and_down_byte_exact_and_are_replaced_whole() {
    let server = Server::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // 20 MiB: more than two multipart parts.
    let first = dir.path().join("tool.bin");
    std::fs::write(&first, noise(20 * 1024 * 1024, 7)).expect("write");
    let sum = sha256sum(&first);
    let out = server
        .cli(&[
            "objects",
            "put",
            first.to_str().unwrap_or_default(),
            "inputs/tool.bin",
        ])
        .ok();
    assert!(out.stdout_str().starts_with(&sum), "{}", out.stdout_str());

    let list = server
        .cli(&["objects", "ls", "inputs/", "-o", "json"])
        .ok()
        .json();
    assert_eq!(list[0]["key"], "inputs/tool.bin", "{list}");
    assert_eq!(list[0]["size"], 20 * 1024 * 1024);
    assert_eq!(list[0]["sha256"], sum.as_str());
    assert_eq!(list[0]["created_by"], "admin");

    let back = dir.path().join("back.bin");
    server
        .cli(&[
            "objects",
            "get",
            "inputs/tool.bin",
            back.to_str().unwrap_or_default(),
        ])
        .ok();
    assert_eq!(sha256sum(&back), sum);
    assert!(!dir.path().join("back.bin.fleetrun-part").exists());
    let stdout = server.cli(&["objects", "get", "inputs/tool.bin", "-"]).ok();
    assert!(stdout.stdout == std::fs::read(&first).unwrap_or_default());

    // Replaced by a smaller one.
    let second = dir.path().join("v2.bin");
    std::fs::write(&second, noise(1000, 9)).expect("write");
    server
        .cli(&[
            "objects",
            "put",
            second.to_str().unwrap_or_default(),
            "inputs/tool.bin",
        ])
        .ok();
    let stdout = server.cli(&["objects", "get", "inputs/tool.bin", "-"]).ok();
    assert_eq!(stdout.stdout, noise(1000, 9));

    // The trail has the upload's summary, not its bytes.
    let rec = server.get_json("/v1/audit?action=objects.put");
    let rec = rec
        .as_array()
        .and_then(|a| a.first())
        .cloned()
        .unwrap_or_default();
    assert_eq!(rec["params"]["body"]["size"], 1000, "{rec}");
    assert_eq!(rec["params"]["body"]["key"], "inputs/tool.bin", "{rec}");

    server.cli(&["objects", "rm", "inputs/tool.bin"]).ok();
    let gone = server.cli(&["objects", "get", "inputs/tool.bin", "-"]);
    assert_eq!(gone.code(), Some(1));
    assert!(
        gone.stderr.contains("no object inputs/tool.bin"),
        "{}",
        gone.stderr
    );
    let list = server.cli(&["objects", "ls", "-o", "json"]).ok().json();
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
}

/// A raw HTTP/1.1 PUT on a plain-HTTP server: the head and `body`, then what the caller does next.
fn start_put(server: &Server, key: &str, length: usize, body: &[u8]) -> TcpStream {
    let addr = server.url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let head = format!(
        "PUT /v1/objects/{key} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Length: {length}\r\nContent-Type: application/octet-stream\r\n\r\n",
        server.token
    );
    s.write_all(head.as_bytes()).expect("head");
    s.write_all(body).expect("body");
    s
}

fn answer(mut s: TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // Up to the end of the head and a little more (the JSON body is short).
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[test]
fn hostile_uploads_leave_nothing_half_written() {
    let server = Server::start_with(&["--insecure-http"]);
    let put = |key: &str, body: &[u8]| {
        http(
            None,
            "PUT",
            &format!("{}/v1/objects/{key}", server.url),
            Some(&server.token),
            Some(("application/octet-stream", body.to_vec())),
        )
        .expect("answer")
    };
    assert_eq!(put("keep", b"old bytes").status, 201);

    // Bad keys: a clear 400 naming what is wrong.
    for bad in ["a//b", "a%20b", "%C3%A4", "a%3Fb"] {
        let r = put(bad, b"x");
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, 400, "{bad}: {text}");
        assert!(text.contains("InvalidObjectKey"), "{bad}: {text}");
    }

    // A dot-dot segment (sent raw: an HTTP client would fold it away).
    let a = answer(start_put(&server, "a/../b", 1, b"x"));
    assert!(
        a.starts_with("HTTP/1.1 400") && a.contains("InvalidObjectKey"),
        "{a}"
    );

    // A second upload to a key while one is in progress is refused; the first completes.
    let first = start_put(&server, "keep", 20, b"new by");
    wait_until(
        "the first upload to hold its key",
        Duration::from_secs(20),
        || {
            let r = put("keep", b"intruder");
            (r.status == 409).then_some(())
        },
    );
    let mut first = first;
    first.write_all(b"tes, whole!!").expect("rest");
    first.write_all(b"xx").expect("rest");
    let a = answer(first);
    assert!(a.starts_with("HTTP/1.1 201"), "{a}");
    let get = |key: &str| {
        http(
            None,
            "GET",
            &format!("{}/v1/objects/{key}", server.url),
            Some(&server.token),
            None,
        )
        .expect("answer")
    };
    assert_eq!(get("keep").body, b"new bytes, whole!!xx");

    // An upload cut off mid-body replaces nothing and records nothing.
    let cut = start_put(&server, "keep", 1_000_000, &noise(300_000, 3));
    drop(cut);
    let cut = start_put(&server, "fresh", 1_000_000, &noise(300_000, 4));
    drop(cut);
    // Once the server has given up on both, the old object is there and no new one is.
    wait_until(
        "the cut uploads to be let go",
        Duration::from_secs(20),
        || (put("keep", b"probe-free").status != 409).then_some(()),
    );
    assert_eq!(get("keep").body, b"probe-free");
    assert_eq!(get("fresh").status, 404);
    let objects_dir = server.data_dir.join("objects").join("files");
    let leftovers: Vec<_> = walk(&objects_dir)
        .into_iter()
        .filter(|p| !p.ends_with("keep"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Without write-objects: refused, and the refusal is in the trail.
    server
        .cli(&["users", "create", "vic", "--role", "viewer"])
        .ok();
    let t = server
        .cli(&["tokens", "create", "--user", "vic", "-o", "json"])
        .ok()
        .json();
    let token = t["token"].as_str().unwrap_or_default().to_owned();
    let r = http(
        None,
        "PUT",
        &format!("{}/v1/objects/nope", server.url),
        Some(&token),
        Some(("application/octet-stream", b"x".to_vec())),
    )
    .expect("answer");
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    let r = http(
        None,
        "GET",
        &format!("{}/v1/objects/keep", server.url),
        Some(&token),
        None,
    )
    .expect("answer");
    assert_eq!(r.status, 403);
    let refused = server.get_json("/v1/audit?action=objects.put&principal=vic");
    assert_eq!(refused[0]["result"], "403 AccessDenied", "{refused}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
