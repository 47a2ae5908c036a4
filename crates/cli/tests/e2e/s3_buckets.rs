//! Issue 12, buckets other than the server's own store: `s3://bucket/key` script inputs are read
//! from them (in ranges, into the server's store, SHA-256 measured) through the bucket clients
//! output to S3 uses, against a real S3-compatible server (moto's); and only the buckets of the
//! server's `allowed_buckets` are reached, for inputs and output to S3 alike.

use crate::support::{Agent, S3Server, Server};
use fleetrun_server::errors::Code;
use fleetrun_server::objects::buckets::Buckets;
use fleetrun_server::objects::{ObjectStoreConfig, S3Config};
use fleetrun_server::scripts::inputs::{FetchLimits, Fetcher, stage};
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;
use sha2::Digest;
use std::sync::Arc;

/// The bucket clients of a server whose own store is `s3://fleet-objects/fleet` on `s3`.
fn buckets(s3: &S3Server, allowed: Option<Vec<String>>) -> Arc<Buckets> {
    let config = ObjectStoreConfig::S3(S3Config {
        bucket: "fleet-objects".into(),
        prefix: "fleet".into(),
        endpoint: Some(s3.url.clone()),
        region: Some("us-east-1".into()),
        path_style: true,
        allow_http: true,
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
    });
    Arc::new(Buckets::new(&config, allowed))
}

#[test]
fn an_s3_input_from_an_allowed_bucket_is_streamed_into_the_store() {
    let s3 = S3Server::start();
    for b in ["fleet-objects", "inputs-a", "secrets"] {
        s3.create_bucket(b);
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    rt.block_on(async {
        let buckets = buckets(&s3, Some(vec!["inputs-*".into()]));
        let fetcher = Fetcher::new(None, FetchLimits::default(), buckets.clone()).expect("fetcher");
        let store = fleetrun_store::Store::open_sqlite(&dir.path().join("db.sqlite"))
            .await
            .expect("store");
        // The server's own store is the bucket too: the input lands there.
        let own = buckets.client("fleet-objects", "").expect("own client");
        // 20 MiB and a bit: three ranges, the last short.
        let body = crate::support::noise(20 * 1024 * 1024 + 12_345, 7);
        let want = hex::encode(sha2::Sha256::digest(&body));
        let input = buckets.client("inputs-a", "").expect("input client");
        input
            .put(
                &ObjectPath::from("tools/collector.bin"),
                body.clone().into(),
            )
            .await
            .expect("put the input");
        let dest = ObjectPath::from("fleet/runs/r1/input");
        let staged = stage(
            "s3://inputs-a/tools/collector.bin",
            &store,
            own.as_ref(),
            &fetcher,
            &dest,
        )
        .await
        .expect("staged");
        assert_eq!(staged.size, body.len() as u64);
        assert_eq!(staged.sha256, want);
        assert_eq!(staged.path, dest);
        let stored = own.get(&dest).await.expect("stored").bytes().await.unwrap();
        assert_eq!(hex::encode(sha2::Sha256::digest(&stored)), want);

        let refused = async |uri: &str| {
            let e = stage(uri, &store, own.as_ref(), &fetcher, &dest)
                .await
                .expect_err(uri);
            (e.code, e.message)
        };
        let (code, msg) = refused("s3://inputs-a/tools/missing.bin").await;
        assert_eq!(code, Code::ScriptInputUnavailable, "{msg}");
        assert!(msg.contains("no such key"), "{msg}");
        assert!(msg.contains("s3://inputs-a/tools/missing.bin"), "{msg}");
        let (code, msg) = refused("s3://inputs-none/k").await;
        assert_eq!(code, Code::ScriptInputUnavailable, "{msg}");
        assert!(msg.contains("no such bucket"), "{msg}");
        let (code, msg) = refused("s3://secrets/k").await;
        assert_eq!(code, Code::AccessDenied, "{msg}");
        assert!(
            msg.contains("may not read an input from bucket secrets")
                && msg.contains("allowed_buckets (--allowed-buckets)"),
            "{msg}"
        );
        // The server's own objects are named by key, not reached around their authorization.
        let open = buckets_all(&s3);
        let open_fetcher = Fetcher::new(None, FetchLimits::default(), open).expect("fetcher");
        let e = stage(
            "s3://fleet-objects/fleet/files/x",
            &store,
            own.as_ref(),
            &open_fetcher,
            &dest,
        )
        .await
        .expect_err("own store");
        assert_eq!(e.code, Code::InvalidScript, "{}", e.message);
        assert!(
            e.message.contains("inside this server's own store"),
            "{}",
            e.message
        );
        // Over the size limit: refused before a byte is read, nothing staged.
        let small = Fetcher::new(
            None,
            FetchLimits {
                max_bytes: 1024,
                ..FetchLimits::default()
            },
            buckets.clone(),
        )
        .expect("fetcher");
        let dest2 = ObjectPath::from("fleet/runs/r2/input");
        let e = stage(
            "s3://inputs-a/tools/collector.bin",
            &store,
            own.as_ref(),
            &small,
            &dest2,
        )
        .await
        .expect_err("too big");
        assert!(
            e.message.contains("over the limit of 1024"),
            "{}",
            e.message
        );
        assert!(own.head(&dest2).await.is_err(), "nothing staged");
    });
}

/// Every bucket allowed (`*`).
fn buckets_all(s3: &S3Server) -> Arc<Buckets> {
    buckets(s3, Some(vec!["*".into()]))
}

#[test]
fn output_to_s3_goes_only_to_allowed_buckets() {
    // A local store and no setting: no bucket at all.
    let server = Server::start();
    let out = server.cli(&[
        "send",
        "--targets",
        "all",
        "--output-s3-bucket",
        "ir-results",
        "--",
        "true",
    ]);
    assert_ne!(out.code(), Some(0));
    assert!(
        out.one_line_error()
            .contains("may not write output to bucket ir-results: only its own store's bucket is allowed until the server's allowed_buckets (--allowed-buckets) names others"),
        "{}",
        out.one_line_error()
    );
    drop(server);

    // Allowed by a glob: accepted (the export waits for the bucket); others refused.
    let server = Server::start_with(&["--allowed-buckets", "ir-*,ssm-out"]);
    let _agent = Agent::start(&server, "allowed-node", &[]);
    server.wait_online("allowed-node");
    let id = server.send(
        &["--targets", "all", "--output-s3-bucket", "ir-results"],
        "true",
    );
    assert_eq!(server.command(&id)["output_s3"]["bucket"], "ir-results");
    let out = server.cli(&[
        "send",
        "--targets",
        "all",
        "--output-s3-bucket",
        "elsewhere",
        "--",
        "true",
    ]);
    assert_ne!(out.code(), Some(0));
    assert!(
        out.one_line_error()
            .contains("not in the server's allowed_buckets (--allowed-buckets)"),
        "{}",
        out.one_line_error()
    );
}
