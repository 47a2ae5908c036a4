//! TLS termination: the server's certificate (its own CA's, or the operator's) and the accept loop
//! that serves HTTPS and WSS (or plain HTTP when explicitly asked for).
//!
//! By default the server is its own CA: on first start it creates an ECDSA P-256 CA and a server
//! certificate signed by it in `DATA_DIR/tls/` (keys 0600) and publishes the CA certificate as
//! `DATA_DIR/ca.pem`, which clients trust (`--ca-cert`) or agents pin by fingerprint. Later starts
//! reuse them; the server certificate is re-issued by the same CA when it lacks a name the server
//! must now answer to (a new listen address, `public_url` host or `--tls-san`), so pinned clients
//! keep working.

use crate::net::conn::{Counter, Refused, Slot};
use anyhow::{Context, bail};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How the server secures its listener.
#[derive(Clone, Debug)]
pub enum TlsMode {
    /// Its own CA and server certificate in the data dir (the default). `extra_sans` are names
    /// (DNS names or IPs) the certificate must carry beyond the ones the server derives itself.
    Auto {
        /// Extra subject alternative names (`--tls-san`).
        extra_sans: Vec<String>,
    },
    /// The operator's certificate chain (leaf first) and private key, PEM files.
    Files {
        /// The certificate chain.
        cert: PathBuf,
        /// The private key.
        key: PathBuf,
    },
    /// Plain HTTP (`--insecure-http`): tokens and scripts cross the network in clear.
    Insecure,
}

impl Default for TlsMode {
    fn default() -> Self {
        TlsMode::Auto {
            extra_sans: Vec::new(),
        }
    }
}

/// The listener's TLS set-up, ready to serve.
pub struct Tls {
    /// None when serving plain HTTP.
    pub acceptor: Option<TlsAcceptor>,
    /// Fingerprint of the server's own CA (auto mode only).
    pub ca_fingerprint: Option<String>,
    /// Where the CA certificate clients should trust is (auto mode only).
    pub ca_path: Option<PathBuf>,
}

/// Subject of the server's own CA. The issuer of later server certificates is rebuilt from it, so it
/// never changes.
const CA_NAME: &str = "fleetrun CA";

/// Prepares TLS for a listener on `listen` reached at `public_url` (its host goes into the
/// certificate in auto mode).
pub fn setup(
    mode: &TlsMode,
    data_dir: &Path,
    listen: SocketAddr,
    public_url: Option<&str>,
) -> anyhow::Result<Tls> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match mode {
        TlsMode::Insecure => Ok(Tls {
            acceptor: None,
            ca_fingerprint: None,
            ca_path: None,
        }),
        TlsMode::Files { cert, key } => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("cannot read TLS certificate {}", cert.display()))?;
            if chain.is_empty() {
                bail!("no certificate in {}", cert.display());
            }
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("cannot read TLS key {}", key.display()))?;
            Ok(Tls {
                acceptor: Some(acceptor(chain, key)?),
                ca_fingerprint: None,
                ca_path: None,
            })
        }
        TlsMode::Auto { extra_sans } => {
            let mut sans = default_sans(listen, public_url);
            sans.extend(extra_sans.iter().map(|s| s.trim().to_owned()));
            let own = own_ca(data_dir, &sans)?;
            let fingerprint = fleetrun_proto::tls::fingerprint(own.ca.as_ref());
            tracing::info!(ca = %own.ca_path.display(), %fingerprint, "TLS with the server's own CA");
            Ok(Tls {
                acceptor: Some(acceptor(vec![own.server, own.ca], own.key)?),
                ca_fingerprint: Some(fingerprint),
                ca_path: Some(own.ca_path),
            })
        }
    }
}

fn acceptor(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the TLS certificate does not match its key, or is unusable")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Names every client on this machine may use, the listen address, and `public_url`'s host.
fn default_sans(listen: SocketAddr, public_url: Option<&str>) -> BTreeSet<String> {
    let mut sans: BTreeSet<String> = ["localhost", "127.0.0.1", "::1"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    if !listen.ip().is_unspecified() {
        sans.insert(listen.ip().to_string());
    } else if let Some(h) = hostname() {
        // Listening everywhere: other machines most likely use the host name.
        sans.insert(h);
    }
    if let Some(host) = public_url.and_then(url_host) {
        sans.insert(host);
    }
    sans
}

/// The host of `scheme://host[:port][/path]`, without brackets around an IPv6 address.
fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_owned())
}

fn hostname() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let h = h.trim();
    (!h.is_empty()).then(|| h.to_owned())
}

/// The server's own CA and server certificate, loaded or created.
struct OwnCa {
    ca: CertificateDer<'static>,
    ca_path: PathBuf,
    server: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

fn own_ca(data_dir: &Path, wanted: &BTreeSet<String>) -> anyhow::Result<OwnCa> {
    let dir = data_dir.join("tls");
    create_private_dir(&dir)?;
    let ca_path = data_dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    let server_path = dir.join("server.pem");
    let server_key_path = dir.join("server.key");
    // The names the current server certificate carries, one a line.
    let sans_path = dir.join("server.sans");

    let ca_key = match (ca_key_path.exists(), ca_path.exists()) {
        (true, true) => rcgen::KeyPair::from_pem(&read(&ca_key_path)?)
            .with_context(|| format!("bad CA key {}", ca_key_path.display()))?,
        (false, false) => {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let cert = ca_params().self_signed(&key)?;
            crate::app::write_private_file(&ca_key_path, key.serialize_pem().as_bytes())?;
            write_public_file(&ca_path, cert.pem().as_bytes())?;
            // Whatever server certificate was there is not this CA's.
            let _ = std::fs::remove_file(&sans_path);
            tracing::info!(path = %ca_path.display(), "created the server's own CA");
            key
        }
        (true, false) => bail!(
            "{} exists but {} is missing: restore it, or remove {} to create a new CA (agents and clients then need the new one)",
            ca_key_path.display(),
            ca_path.display(),
            dir.display()
        ),
        (false, true) => bail!(
            "{} exists but its key {} is missing: restore it, or remove {} to create a new CA",
            ca_path.display(),
            ca_key_path.display(),
            ca_path.display()
        ),
    };
    let ca = CertificateDer::from_pem_file(&ca_path)
        .with_context(|| format!("cannot read CA certificate {}", ca_path.display()))?;

    let have: BTreeSet<String> = std::fs::read_to_string(&sans_path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    let current = server_path.exists() && server_key_path.exists() && wanted.is_subset(&have);
    if !current {
        // Keep the names of the last certificate too: clients may still use them.
        let all: Vec<String> = have.union(wanted).cloned().collect();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(all.clone())
            .with_context(|| format!("bad TLS subject name in {all:?}"))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fleetrun server");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&random_serial()));
        let issuer = rcgen::Issuer::new(ca_params(), &ca_key);
        let cert = params.signed_by(&key, &issuer)?;
        crate::app::write_private_file(&server_key_path, key.serialize_pem().as_bytes())?;
        crate::app::write_private_file(&server_path, cert.pem().as_bytes())?;
        crate::app::write_private_file(&sans_path, (all.join("\n") + "\n").as_bytes())?;
        tracing::info!(names = ?all, "issued the server certificate");
    }
    let server = CertificateDer::from_pem_file(&server_path)
        .with_context(|| format!("cannot read {}", server_path.display()))?;
    let key = PrivateKeyDer::from_pem_file(&server_key_path)
        .with_context(|| format!("cannot read {}", server_key_path.display()))?;
    Ok(OwnCa {
        ca,
        ca_path,
        server,
        key,
    })
}

/// The CA's parameters; the same on every start, so later server certificates name it as issuer.
fn ca_params() -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, CA_NAME);
    p.distinguished_name
        .push(rcgen::DnType::OrganizationName, "fleetrun");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn random_serial() -> [u8; 16] {
    let mut s: [u8; 16] = rand::random();
    // Positive, as DER integers for serials must be.
    s[0] &= 0x7f;
    s
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// The CA certificate is public: readable by anyone, so local users can point clients at it.
fn write_public_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// How the accept loop bounds connections (see [`crate::ServerConfig`] for the defaults).
#[derive(Clone, Debug)]
pub struct ConnSettings {
    /// Longest wait for a request head: the first one (TLS handshake included) from the accept on,
    /// and each later one on a kept-alive connection from the end of the previous answer (so it is
    /// also the idle keep-alive timeout, and an HTTP/2 connection with no open stream for this
    /// long is closed). WebSockets, once upgraded, leave these timeouts.
    pub header_read_timeout: Duration,
    /// Most connections open at once (upgraded WebSockets included); more are closed at accept.
    pub max_connections: usize,
    /// Most HTTP connections one source address may hold open (upgraded WebSockets leave the
    /// count); more are closed at accept.
    pub max_connections_per_address: usize,
}

/// Longest wait for a client's TLS handshake (or the header read timeout, if shorter).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of HTTP/2 keep-alive pings; a peer that answers none within [`H2_KEEPALIVE_TIMEOUT`]
/// loses its connection.
pub const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long an HTTP/2 keep-alive ping may go unanswered.
pub const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Most concurrent HTTP/2 streams per connection.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 128;
/// Largest HTTP/2 header list accepted, in bytes.
pub const H2_MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// Most HTTP/2 streams a client may open and reset before they are accepted (rapid-reset attacks).
pub const H2_MAX_PENDING_RESETS: usize = 32;

/// Accepts connections until `stop` fires. Each connection gets its own task, and the TLS
/// handshake runs in it, so a slow or silent client never holds up the accepts of others. The
/// caller's address reaches handlers as `ConnectInfo<SocketAddr>` (audit trail, brute-force guard).
/// Connections over [`ConnSettings`]' caps are closed at once; a connection that has not sent a
/// whole request head within `header_read_timeout` is closed, and so is one with no request in
/// progress for that long (HTTP/2 included).
///
/// `open` counts every socket (a slot lives as long as the socket, upgraded or not). When `stop`
/// fires the listener is closed, every HTTP connection is shut down gracefully (the requests in
/// progress finish, HTTP/2 gets a GOAWAY), and this returns once the last one has ended; upgraded
/// WebSockets are not waited for (they are the agent channels, closed after this).
pub async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: Option<TlsAcceptor>,
    app: axum::Router,
    settings: ConnSettings,
    stop: CancellationToken,
    open: Counter,
) -> std::io::Result<()> {
    use tower_service::Service;
    let mut make_service = app.into_make_service_with_connect_info::<SocketAddr>();
    // HTTP connections per source (a slot lives as long as the connection serves HTTP).
    let http = Counter::default();
    let connections = TaskTracker::new();
    let mut refusals = Refusals::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, remote) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                accept_error(e).await;
                continue;
            }
        };
        let socket_slot = match open.acquire(remote.ip(), 0, settings.max_connections) {
            Ok(s) => s,
            Err(r) => {
                refusals.log(remote, r);
                continue;
            }
        };
        let http_slot = match http.acquire(remote.ip(), settings.max_connections_per_address, 0) {
            Ok(s) => s,
            Err(r) => {
                refusals.log(remote, r);
                continue;
            }
        };
        // Nagle off: agent frames and watch lines are small and latency-bound.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
        let service = match make_service.call(remote).await {
            Ok(s) => s,
            Err(never) => match never {},
        };
        let acceptor = acceptor.clone();
        let header_timeout = settings.header_read_timeout;
        let stop = stop.clone();
        connections.spawn(async move {
            let first_head_by = tokio::time::Instant::now() + header_timeout;
            let activity = Arc::new(Activity::default());
            let service = Tracked {
                inner: TowerToHyperService::new(service),
                activity: activity.clone(),
                stop: stop.clone(),
            };
            let bounds = Bounds {
                first_head_by,
                idle: header_timeout,
                stop: &stop,
                remote,
            };
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                // Extended CONNECT: WebSockets over HTTP/2.
                .enable_connect_protocol()
                .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
                .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
                .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
                .max_header_list_size(H2_MAX_HEADER_LIST_SIZE)
                .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS);
            let served = match acceptor {
                None => {
                    let io = Counted {
                        inner: tcp,
                        _slot: socket_slot,
                    };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                    drive(conn, &activity, bounds).await
                }
                Some(acceptor) => {
                    let handshake_by =
                        first_head_by.min(tokio::time::Instant::now() + TLS_HANDSHAKE_TIMEOUT);
                    let stream =
                        match tokio::time::timeout_at(handshake_by, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                tracing::debug!(%remote, "TLS handshake failed: {e}");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%remote, "TLS handshake timed out");
                                return;
                            }
                        };
                    let io = Counted {
                        inner: stream,
                        _slot: socket_slot,
                    };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                    drive(conn, &activity, bounds).await
                }
            };
            // An upgraded connection has left (it keeps its socket slot); the HTTP one ends here.
            drop(http_slot);
            if let Err(e) = served {
                tracing::trace!(%remote, "connection ended: {e}");
            }
        });
    }
    drop(listener);
    tracing::info!(
        connections = connections.len(),
        "stopped accepting; finishing the requests in progress"
    );
    connections.close();
    connections.wait().await;
    Ok(())
}

/// What bounds one connection's life besides its own end.
struct Bounds<'a> {
    /// The first whole request head must have come by then.
    first_head_by: tokio::time::Instant,
    /// Longest time with no request in progress.
    idle: Duration,
    /// Fired at shutdown.
    stop: &'a CancellationToken,
    remote: SocketAddr,
}

/// Serves a connection, closing it if no whole request head came by `first_head_by` (a silent
/// client, a half-sent head, an HTTP/2 preface that never completes), or once no request has been
/// in progress for `idle` (HTTP/1 heads are bounded by hyper's own header timeout as well; HTTP/2
/// has no idle timeout of its own, so an open connection with no stream would live forever). On
/// `stop`, and when idle, the connection is shut down gracefully: what is in progress finishes
/// (HTTP/2 gets a GOAWAY). A client that then still holds the connection with nothing in progress
/// (HTTP/2's shutdown waits for a ping answer) is dropped after another `idle` ([`STOP_LINGER`]
/// at shutdown).
async fn drive<C>(conn: C, activity: &Activity, bounds: Bounds<'_>) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    let remote = bounds.remote;
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = tokio::time::sleep_until(bounds.first_head_by) => {}
        _ = bounds.stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => return r,
                _ = tokio::time::sleep_until(bounds.first_head_by) => {}
            }
        }
    }
    if !activity.seen.load(Ordering::Acquire) {
        tracing::debug!(%remote, "no request head within the header timeout; closing");
        return Ok(());
    }
    // Set once the graceful shutdown has begun.
    // Once the graceful shutdown has begun: how long the connection may then stay idle.
    let mut closing: Option<Duration> = None;
    loop {
        // Registered before the count is read, so a change in between is not missed.
        let changed = activity.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let idle =
            activity.open.load(Ordering::Acquire) == 0 && !activity.tunnel.load(Ordering::Acquire);
        let idle_until = idle.then(|| tokio::time::Instant::now() + closing.unwrap_or(bounds.idle));
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = bounds.stop.cancelled(), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                // The server is going away: an idle client gets a moment to read the GOAWAY, not
                // a whole idle period that would eat the shutdown's grace.
                closing = Some(bounds.idle.min(STOP_LINGER));
            }
            _ = &mut changed => {}
            _ = sleep_until_opt(idle_until) => {
                if closing.is_some() {
                    tracing::debug!(%remote, "still open, idle, after its shutdown; dropping");
                    return Ok(());
                }
                tracing::debug!(%remote, "no request for {:?}; closing", bounds.idle);
                conn.as_mut().graceful_shutdown();
                closing = Some(bounds.idle);
            }
        }
    }
}

/// How long an idle connection may stay open after the shutdown's GOAWAY.
const STOP_LINGER: Duration = Duration::from_secs(1);

/// Sleeps until `t`, or forever when there is none.
async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// A connection's requests: whether a whole head ever arrived, and how many are in progress (from
/// the head until the answer's body has been sent or dropped).
#[derive(Default)]
struct Activity {
    seen: AtomicBool,
    open: AtomicUsize,
    /// An HTTP/2 extended CONNECT (a WebSocket) was answered: its stream outlives the answer's
    /// body, so the connection is never idle.
    tunnel: AtomicBool,
    changed: tokio::sync::Notify,
}

/// One request in progress, counted in its connection's [`Activity`] until dropped.
struct InProgress(Arc<Activity>);

impl InProgress {
    fn new(activity: Arc<Activity>) -> Self {
        activity.seen.store(true, Ordering::Release);
        activity.open.fetch_add(1, Ordering::AcqRel);
        activity.changed.notify_waiters();
        InProgress(activity)
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// The connection's service, counting its requests in progress in [`Activity`].
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    /// Fired at shutdown: long polls end then.
    stop: CancellationToken,
}

/// Whether a request is a long poll, answered until something else ends it (a command's watch, a
/// followed output). Those end at shutdown, as after a lost connection; their clients carry on
/// from there (`send --wait` polls, a follower resumes at the byte it had), and the shutdown does
/// not wait the whole grace period for them.
fn is_long_poll(uri: &axum::http::Uri) -> bool {
    uri.path().ends_with("/watch")
        || uri
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv == "follow=true"))
}

impl<S, B> hyper::service::Service<axum::http::Request<B>> for Tracked<S>
where
    S: hyper::service::Service<axum::http::Request<B>, Response = axum::response::Response>,
    S::Future: Send + 'static,
{
    type Response = axum::response::Response;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn call(&self, req: axum::http::Request<B>) -> Self::Future {
        let in_progress = InProgress::new(self.activity.clone());
        if req.method() == axum::http::Method::CONNECT {
            self.activity.tunnel.store(true, Ordering::Release);
        }
        let cut = is_long_poll(req.uri()).then(|| Box::pin(self.stop.clone().cancelled_owned()));
        let answer = self.inner.call(req);
        Box::pin(async move {
            let response = answer.await?;
            // The request stays in progress while its body streams (a watch, a followed output).
            Ok(response.map(|body| {
                axum::body::Body::new(AnswerBody {
                    inner: body,
                    _in_progress: in_progress,
                    cut,
                })
            }))
        })
    }
}

/// An answer's body, holding its request's place in [`Activity`]; a long poll's ends at `cut`.
struct AnswerBody {
    inner: axum::body::Body,
    _in_progress: InProgress,
    cut: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
}

impl http_body::Body for AnswerBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if let Some(cut) = self.cut.as_mut()
            && cut.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(None);
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A socket with its slot in the server's connection count, released when the socket closes.
struct Counted<T> {
    inner: T,
    _slot: Slot,
}
impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Logs refused connections without a line per refusal: the first, then a count at most every
/// [`REFUSAL_LOG_EVERY`].
#[derive(Default)]
struct Refusals {
    since_log: u64,
    last_log: Option<std::time::Instant>,
}

/// Least time between two log lines about refused connections.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

impl Refusals {
    fn log(&mut self, remote: SocketAddr, why: Refused) {
        self.since_log += 1;
        let due = self
            .last_log
            .is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY);
        if due {
            let why = match why {
                Refused::PerAddress { limit } => {
                    format!("{} holds {limit} connections already", remote.ip())
                }
                Refused::Total { limit } => format!("{limit} connections are open already"),
            };
            tracing::warn!(
                %remote,
                "connection refused: {why} (refusals since the last report: {})",
                self.since_log
            );
            self.since_log = 0;
            self.last_log = Some(std::time::Instant::now());
        }
    }
}

/// A failed accept: a connection reset before it was accepted is the client's business; anything
/// else (out of file descriptors) is logged and waited out, as hyper and axum do.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!("accept error: {e}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_hosts_are_found() {
        assert_eq!(
            url_host("https://a.example:8443/x").as_deref(),
            Some("a.example")
        );
        assert_eq!(url_host("https://[::1]:1").as_deref(), Some("::1"));
        assert_eq!(url_host("https://10.0.0.1").as_deref(), Some("10.0.0.1"));
        assert_eq!(url_host("https://"), None);
    }

    #[test]
    fn own_ca_is_created_once_and_reissues_for_new_names() {
        let dir = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mode = TlsMode::default();
        let a = setup(&mode, dir.path(), listen, None).unwrap();
        let fp = a.ca_fingerprint.unwrap();
        assert!(dir.path().join("ca.pem").exists());
        let key_mode = std::fs::metadata(dir.path().join("tls/ca.key")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(key_mode.permissions().mode() & 0o777, 0o600);
        let server1 = std::fs::read(dir.path().join("tls/server.pem")).unwrap();
        // Same names: nothing changes.
        let b = setup(&mode, dir.path(), listen, None).unwrap();
        assert_eq!(b.ca_fingerprint.unwrap(), fp);
        assert_eq!(
            std::fs::read(dir.path().join("tls/server.pem")).unwrap(),
            server1
        );
        // A new name: same CA, new server certificate keeping the old names.
        let extra = TlsMode::Auto {
            extra_sans: vec!["fleet.example".into()],
        };
        let c = setup(&extra, dir.path(), listen, None).unwrap();
        assert_eq!(c.ca_fingerprint.unwrap(), fp);
        let sans = std::fs::read_to_string(dir.path().join("tls/server.sans")).unwrap();
        assert!(
            sans.contains("fleet.example") && sans.contains("127.0.0.1"),
            "{sans}"
        );
        assert_ne!(
            std::fs::read(dir.path().join("tls/server.pem")).unwrap(),
            server1
        );
    }
}
