//! Fetches from a real HTTPS server on a loopback port (its own CA, as an internal artifact server
//! has), into a real local object store.

use super::*;
use axum::Router;
use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use object_store::ObjectStoreExt;
use object_store::local::LocalFileSystem;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Bytes of the big input: several object-store parts, so the fetch is streamed through many.
const BIG: usize = 20 * 1024 * 1024 + 12_345;

/// The big input's chunks (64 KiB, the last shorter), made as they are sent.
fn big_chunks() -> impl Iterator<Item = bytes::Bytes> {
    const CHUNK: usize = 64 * 1024;
    (0..BIG.div_ceil(CHUNK)).map(|i| {
        let len = CHUNK.min(BIG - i * CHUNK);
        (0..len)
            .map(|j| ((i * 31 + j * 7) % 251) as u8)
            .collect::<Vec<u8>>()
            .into()
    })
}

fn big_body() -> Body {
    Body::from_stream(futures_util::stream::iter(
        big_chunks().map(Ok::<_, std::io::Error>),
    ))
}

fn big_sha256() -> String {
    let mut hasher = Sha256::new();
    big_chunks().for_each(|c| hasher.update(&c));
    hex::encode(hasher.finalize())
}

/// A HTTPS server on a free loopback port, answering for `localhost`: its base URL and the PEM
/// of the CA that signed its certificate.
async fn https_server() -> (String, Vec<u8>) {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "inputs test CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).expect("sans");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer).expect("cert");
    let tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("tls config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let base = format!("https://localhost:{port}");
    let to_http = format!("http://localhost:{port}/big");
    let app = Router::new()
        .route("/big", get(|| async { big_body() }))
        .route(
            "/missing",
            get(|| async { (StatusCode::NOT_FOUND, "no such file") }),
        )
        .route("/to-http", get(move || async move { redirect(&to_http) }))
        .route("/loop", get(|| async { redirect("/loop") }))
        .route(
            "/stall",
            get(|| async {
                // One chunk, then nothing, ever.
                let first = futures_util::stream::once(async {
                    Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"a start"))
                });
                Body::from_stream(first.chain(futures_util::stream::pending()))
            }),
        )
        .route(
            "/short",
            get(|| async {
                // A stream, so hyper takes the header's length and ends the connection short.
                let ten = futures_util::stream::once(async {
                    Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"ten bytes!"))
                });
                let mut resp = Body::from_stream(ten).into_response();
                resp.headers_mut()
                    .insert(header::CONTENT_LENGTH, "1000".parse().expect("header"));
                resp
            }),
        );
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (base, ca_cert.pem().into_bytes())
}

fn redirect(to: &str) -> Response {
    (StatusCode::FOUND, [(header::LOCATION, to.to_owned())]).into_response()
}

struct Setup {
    base: String,
    fetcher: Fetcher,
    objects: LocalFileSystem,
    _dir: tempfile::TempDir,
}

async fn setup(limits: FetchLimits) -> Setup {
    let (base, ca) = https_server().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca).expect("write CA");
    let objects_dir = dir.path().join("objects");
    std::fs::create_dir(&objects_dir).expect("objects dir");
    Setup {
        base,
        fetcher: Fetcher::new(Some(&ca_path), limits, local_buckets()).expect("fetcher"),
        objects: LocalFileSystem::new_with_prefix(&objects_dir).expect("local store"),
        _dir: dir,
    }
}

fn dest() -> ObjectPath {
    ObjectPath::from("runs/test/input")
}

async fn fetch_error(s: &Setup, path: &str) -> String {
    let url = format!("{}{path}", s.base);
    let got = tokio::time::timeout(
        Duration::from_secs(60),
        s.fetcher.fetch_into(&url, &s.objects, &dest()),
    )
    .await
    .expect("the fetch ends within a minute");
    let e = got.expect_err("the fetch fails");
    assert_eq!(e.code, Code::ScriptInputUnavailable, "{e:?}");
    assert!(
        s.objects.head(&dest()).await.is_err(),
        "nothing is left at the destination after: {e:?}"
    );
    e.message
}

#[tokio::test]
async fn an_https_input_is_streamed_into_the_store_with_its_hash() {
    let s = setup(FetchLimits::default()).await;
    let url = format!("{}/big", s.base);
    let staged = s
        .fetcher
        .fetch_into(&url, &s.objects, &dest())
        .await
        .expect("fetched");
    let want = big_sha256();
    assert_eq!(staged.size, BIG as u64);
    assert_eq!(staged.sha256, want);
    let stored = s.objects.get(&dest()).await.expect("stored").bytes().await;
    let stored = stored.expect("read back");
    assert_eq!(hex::encode(Sha256::digest(&stored)), want);
}

#[tokio::test]
async fn a_failing_or_hostile_input_url_is_refused_clearly_and_leaves_nothing() {
    let s = setup(FetchLimits {
        idle: Duration::from_secs(2),
        max_bytes: 1024 * 1024,
        ..FetchLimits::default()
    })
    .await;
    let e = fetch_error(&s, "/missing").await;
    assert!(e.contains("404"), "{e}");
    let e = fetch_error(&s, "/to-http").await;
    assert!(e.contains("not https"), "{e}");
    let e = fetch_error(&s, "/loop").await;
    assert!(e.contains("more than 5 redirects"), "{e}");
    let e = fetch_error(&s, "/stall").await;
    assert!(e.contains("timed out"), "{e}");
    let e = fetch_error(&s, "/short").await;
    assert!(e.contains("cannot fetch the input"), "{e}");
    // No Content-Length: the limit stops it as the bytes arrive.
    let e = fetch_error(&s, "/big").await;
    assert!(e.contains("over the limit of 1048576"), "{e}");
}

#[tokio::test]
async fn an_input_url_to_a_metadata_address_or_with_user_info_is_refused_before_connecting() {
    let s = setup(FetchLimits::default()).await;
    for (url, want) in [
        ("https://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://[fe80::1]/x", "link-local"),
        ("https://[::ffff:169.254.169.254]/x", "link-local"),
        ("https://0.0.0.0/x", "link-local"),
        ("https://user:pw@localhost/x", "without user info"),
        ("http://localhost/x", "only https://"),
    ] {
        let got = s.fetcher.fetch_into(url, &s.objects, &dest()).await;
        let e = got.expect_err(url);
        assert!(e.message.contains(want), "{url}: {}", e.message);
    }
    assert!(reachable("127.0.0.1".parse().expect("ip")));
    assert!(reachable("10.1.2.3".parse().expect("ip")));
    assert!(!reachable("fd00:ec2::254".parse().expect("ip")));
    assert!(!reachable("224.0.0.1".parse().expect("ip")));
}

#[tokio::test]
async fn an_untrusted_certificate_is_refused() {
    let s = setup(FetchLimits::default()).await;
    let plain = Fetcher::new(None, FetchLimits::default(), local_buckets()).expect("fetcher");
    let url = format!("{}/big", s.base);
    let e = plain
        .fetch_into(&url, &s.objects, &dest())
        .await
        .expect_err("an unknown CA is not trusted");
    assert!(e.message.contains("certificate"), "{}", e.message);
}

/// The bucket clients of a server with a local store and no `allowed_buckets`.
fn local_buckets() -> std::sync::Arc<crate::objects::buckets::Buckets> {
    std::sync::Arc::new(crate::objects::buckets::Buckets::new(
        &crate::objects::ObjectStoreConfig::Local,
        None,
    ))
}
