//! Issue 12, object storage for real: a server whose objects live in an S3-compatible bucket
//! (moto's server from the harness's venv, on a free loopback port): output lands under the
//! prefix, byte-exact, and reads back through the API (also after a restart); a bucket that does
//! not exist stops the server at start with an error naming it.

use crate::support::{Agent, S3Server, Server, fleetrun_bin, run};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

/// A server config file pointing at `bucket/prefix` of the store.
fn config(dir: &Path, s3: &S3Server, bucket: &str) -> std::path::PathBuf {
    let path = dir.join(format!("server-{bucket}.toml"));
    let text = format!(
        "[object_store]\nurl = \"s3://{bucket}/fleet/out\"\nendpoint = \"{}\"\nallow_http = true\npath_style = true\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\nregion = \"us-east-1\"\n",
        s3.url
    );
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn output_goes_to_the_bucket_and_reads_back_byte_exact() {
    let s3 = S3Server::start();
    s3.create_bucket("fleet-objects");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), &s3, "fleet-objects");
    let mut server = Server::start_with(&["--config", cfg.to_str().expect("utf-8 path")]);
    assert!(
        server
            .logs()
            .contains("s3://fleet-objects/fleet/out at http://127.0.0.1"),
        "{}",
        server.logs()
    );
    let _agent = Agent::start(&server, "s3-node", &[]);
    // ~2.9 MB: past the inline copy, so most of it goes to segment objects.
    let id = server.send(&["--targets", "all"], "seq 1 420000");
    let done = server.wait_terminal(&id, LIMIT);
    assert_eq!(done["status"], "Success", "{done}");
    let expected: Vec<u8> = (1..=420_000)
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        .into_bytes();
    let node = server.node_id("s3-node");
    let back = server.output(&id, &node);
    assert_eq!(back.len(), expected.len());
    assert!(back == expected, "the output read back differs");

    // In the bucket, under the prefix: the segments in offset order are the output's first bytes.
    let mut segments = s3.keys(
        "fleet-objects",
        &format!("fleet/out/output/{id}/{node}/stdout/"),
    );
    segments.sort();
    assert!(!segments.is_empty(), "no segment objects");
    let mut stored = Vec::new();
    for (key, size) in &segments {
        let bytes = s3.get("fleet-objects", key);
        assert_eq!(bytes.len() as u64, *size, "{key}");
        stored.extend_from_slice(&bytes);
    }
    assert!(
        stored.len() > 1_000_000 && expected.starts_with(&stored),
        "{} bytes in segments",
        stored.len()
    );
    let all = s3.keys("fleet-objects", "");
    assert!(
        all.iter().all(|(k, _)| k.starts_with("fleet/out/output/")),
        "objects outside the prefix, or a probe left behind: {all:?}"
    );

    // Objects kept for users go to the bucket too, in multipart uploads (12 MiB: two parts).
    let file = dir.path().join("input.bin");
    let input: Vec<u8> = (0..12 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &input).expect("write");
    server
        .cli(&[
            "objects",
            "put",
            file.to_str().unwrap_or_default(),
            "in/input.bin",
        ])
        .ok();
    let keys = s3.keys("fleet-objects", "fleet/out/files/");
    assert_eq!(
        keys,
        vec![(
            "fleet/out/files/in/input.bin".to_owned(),
            input.len() as u64
        )]
    );

    // A restarted server reads the same bytes back from the bucket.
    server.restart();
    assert!(server.output(&id, &node) == expected);
    let back = server.cli(&["objects", "get", "in/input.bin", "-"]).ok();
    assert!(back.stdout == input, "the object read back differs");
}

#[test]
fn a_missing_bucket_stops_the_server_at_start_naming_it() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), &s3, "no-such-bucket");
    let mut cmd = Command::new(fleetrun_bin());
    cmd.args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&cfg)
        .env_remove("FLEETRUN_SERVER_CONFIG");
    let out = run(cmd, LIMIT);
    assert_ne!(out.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("the object store s3://no-such-bucket/fleet/out at http://127.0.0.1")
            && out.stderr.contains("not usable"),
        "{}",
        out.stderr
    );

    // And a flag the store needs is asked for by name.
    let out = run(
        {
            let mut c = Command::new(fleetrun_bin());
            c.args([
                "server",
                "--listen",
                "127.0.0.1:0",
                "--object-store",
                "s3://fleet-objects",
                "--s3-endpoint",
                &s3.url,
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data2"))
            .env_remove("FLEETRUN_SERVER_CONFIG");
            c
        },
        LIMIT,
    );
    assert_ne!(out.code(), Some(0));
    assert!(out.stderr.contains("--s3-allow-http"), "{}", out.stderr);
}
