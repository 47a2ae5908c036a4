//! Typed client of the `/v1` JSON API (routes and bodies in `fleetrun_proto::api`).
//!
//! Every failure becomes one readable line: API errors as `MESSAGE (CODE)`, transport errors as
//! `cannot reach server at URL: CAUSE`.

use crate::config::Connection;
use anyhow::Context;
use bytes::Bytes;
use fleetrun_proto::api::{
    AccessKey, Activation, AuditAnchor, AuditQuery, AuditRecord, AuditVerify, CancelCommand,
    Command, CreateAccessKey, CreateActivation, CreateDocument, CreateToken, CreateUser, Document,
    ErrorBody, Invocation, Node, SendCommand, SetDefaultVersion, Storage, Token, UpdateDocument,
    UpdateUser, User, WhoAmI,
};
use fleetrun_proto::{CommandId, NodeId};
use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;
use std::fmt;
use std::time::Duration;

/// An error answer of the API.
#[derive(Debug)]
pub struct ApiError {
    /// Wire code, e.g. `CommandNotFound`.
    pub code: String,
    /// One-line message.
    pub message: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for ApiError {}

/// A request that got no answer (connection refused, reset or closed before the answer): it may be
/// worth retrying. `retryable` is false when retrying cannot help (an untrusted certificate).
#[derive(Debug)]
pub struct TransportError {
    /// One line: `cannot reach server at URL: CAUSE`.
    pub message: String,
    /// Whether a retry may succeed.
    pub retryable: bool,
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TransportError {}

/// Whether an error is worth a retry: no answer came (a transport error), or a proxy or a starting
/// server answered 502, 503 or 504.
pub fn is_retryable(e: &anyhow::Error) -> bool {
    if let Some(t) = e.downcast_ref::<TransportError>() {
        return t.retryable;
    }
    e.downcast_ref::<UnavailableError>().is_some()
}

/// A 502, 503 or 504 answer without an API error body.
#[derive(Debug)]
pub struct UnavailableError(String);

impl fmt::Display for UnavailableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UnavailableError {}

/// How many times `fleetrun send` tries a request that got no answer (with one idempotency key).
pub const SEND_ATTEMPTS: u32 = 8;
/// First wait between attempts; doubled after each, up to [`RETRY_DELAY_MAX`].
pub const RETRY_DELAY_FIRST: Duration = Duration::from_millis(250);
/// Longest wait between attempts.
pub const RETRY_DELAY_MAX: Duration = Duration::from_secs(5);

/// Which output stream of an invocation.
#[derive(Clone, Copy, Debug)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A client bound to one server and token.
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    /// The CA to trust (for WebSockets, which do not go through `http`).
    ca_cert: Option<std::path::PathBuf>,
}

/// A session's WebSocket to the server.
pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl Client {
    /// Builds a client. No overall request timeout: watches and followed output last as long as the
    /// command does.
    pub fn new(conn: &Connection) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .no_proxy();
        if let Some(path) = &conn.ca_cert {
            builder = builder.tls_certs_only(read_ca(path)?);
        }
        let http = builder.build().context("cannot build the HTTP client")?;
        Ok(Client {
            http,
            base: conn.server.clone(),
            token: conn.token.clone(),
            ca_cert: conn.ca_cert.clone(),
        })
    }

    /// Opens a session WebSocket (`path` under the API, e.g. `/v1/nodes/ID/exec`) with the same
    /// token and trust as every request. A refused upgrade is its API error.
    pub async fn socket(&self, path: &str) -> anyhow::Result<Socket> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = match self.base.split_once("://") {
            Some(("https", rest)) => format!("wss://{rest}{path}"),
            Some(("http", rest)) => format!("ws://{rest}{path}"),
            _ => anyhow::bail!("the server URL {} is not http:// or https://", self.base),
        };
        let mut req = url
            .as_str()
            .into_client_request()
            .with_context(|| format!("bad server URL {url}"))?;
        let bearer = format!("Bearer {}", self.token)
            .parse()
            .context("the token is not a valid header value")?;
        req.headers_mut().insert("authorization", bearer);
        let connector = if url.starts_with("wss://") {
            Some(tokio_tungstenite::Connector::Rustls(std::sync::Arc::new(
                self.tls_config()?,
            )))
        } else {
            None
        };
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(fleetrun_proto::stream::STREAM_FRAME_MAX + 64 * 1024))
            .max_frame_size(Some(fleetrun_proto::stream::STREAM_FRAME_MAX + 64 * 1024));
        let dial =
            tokio_tungstenite::connect_async_tls_with_config(req, Some(config), true, connector);
        match tokio::time::timeout(Duration::from_secs(10), dial).await {
            Err(_) => Err(TransportError {
                message: format!("cannot reach server at {}: timed out", self.base),
                retryable: true,
            }
            .into()),
            Ok(Ok((ws, _))) => Ok(ws),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                let status = resp.status();
                let body = resp.body().as_deref().unwrap_or_default();
                match serde_json::from_slice::<ErrorBody>(body) {
                    Ok(e) => Err(ApiError {
                        code: e.error.code,
                        message: e.error.message,
                    }
                    .into()),
                    Err(_) => anyhow::bail!("the server refused the session: HTTP {status}"),
                }
            }
            Ok(Err(e)) => Err(TransportError {
                message: format!("cannot reach server at {}: {e}", self.base),
                retryable: false,
            }
            .into()),
        }
    }

    /// TLS for sockets: the configured CA alone, else the system's roots.
    fn tls_config(&self) -> anyhow::Result<rustls::ClientConfig> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_cert {
            Some(path) => {
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .and_then(|i| i.collect())
                    .with_context(|| format!("bad CA certificate {}", path.display()))?;
                for c in certs {
                    roots
                        .add(c)
                        .with_context(|| format!("bad CA certificate {}", path.display()))?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                let _ = roots.add_parsable_certificates(native.certs);
            }
        }
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS")?
            .with_root_certificates(roots)
            .with_no_client_auth())
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    /// Sends a request; turns transport failures and non-2xx answers into readable errors.
    async fn send(&self, req: RequestBuilder) -> anyhow::Result<Response> {
        let resp = req.send().await.map_err(|e| self.transport_error(e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.bytes().await.unwrap_or_default();
        Err(match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => ApiError {
                code: e.error.code,
                message: e.error.message,
            }
            .into(),
            Err(_) => {
                let text = String::from_utf8_lossy(&body);
                let text = text.lines().next().unwrap_or("").trim();
                let msg = format!("server answered {status}: {text}");
                if matches!(status.as_u16(), 502..=504) {
                    UnavailableError(msg).into()
                } else {
                    anyhow::anyhow!(msg)
                }
            }
        })
    }

    fn transport_error(&self, e: reqwest::Error) -> anyhow::Error {
        // reqwest's own message ("error sending request") hides the cause, so name the innermost one.
        let mut cause: &dyn std::error::Error = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        if is_untrusted_certificate(&e) {
            return TransportError {
                message: format!(
                    "cannot reach server at {}: its TLS certificate is not trusted ({cause}); give the server's CA with --ca-cert FILE or FLEETRUN_CA_CERT (a fleetrun server keeps it in DATA_DIR/ca.pem), or `ca_cert` in the config file",
                    self.base
                ),
                retryable: false,
            }
            .into();
        }
        TransportError {
            message: format!("cannot reach server at {}: {cause}", self.base),
            // A body cut short is reported as a decode error too: every failure but a bad request
            // (the builder's) may pass on a new connection.
            retryable: !e.is_builder(),
        }
        .into()
    }

    async fn json<T: DeserializeOwned>(&self, req: RequestBuilder) -> anyhow::Result<T> {
        let resp = self.send(req).await?;
        let body = resp.bytes().await.map_err(|e| self.transport_error(e))?;
        serde_json::from_slice(&body).context("the server's answer is not what this CLI expects")
    }

    /// `POST /v1/activations`.
    pub async fn create_activation(&self, body: &CreateActivation) -> anyhow::Result<Activation> {
        self.json(self.request(Method::POST, "/v1/activations").json(body))
            .await
    }

    /// `GET /v1/activations`.
    pub async fn activations(&self) -> anyhow::Result<Vec<Activation>> {
        self.json(self.request(Method::GET, "/v1/activations"))
            .await
    }

    /// `DELETE /v1/activations/{id}`.
    pub async fn delete_activation(&self, id: &str) -> anyhow::Result<()> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            anyhow::bail!("{id:?} is not an activation id (a UUID, as `activation list` shows)");
        }
        let path = format!("/v1/activations/{id}");
        self.send(self.request(Method::DELETE, &path)).await?;
        Ok(())
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> anyhow::Result<Vec<Node>> {
        self.json(self.request(Method::GET, "/v1/nodes")).await
    }

    /// `DELETE /v1/nodes/{id}`: deregisters a node.
    pub async fn deregister_node(&self, id: &NodeId) -> anyhow::Result<Node> {
        self.json(self.request(Method::DELETE, &format!("/v1/nodes/{id}")))
            .await
    }

    /// `PATCH /v1/nodes/{id}/tags`: sets and removes tags; answers with the node.
    pub async fn retag_node(
        &self,
        id: &NodeId,
        change: &fleetrun_proto::api::NodeTagsChange,
    ) -> anyhow::Result<Node> {
        self.json(
            self.request(Method::PATCH, &format!("/v1/nodes/{id}/tags"))
                .json(change),
        )
        .await
    }

    /// `GET /v1/sessions?limit=N[&active=true][&before=ID]`: one page, newest first.
    pub async fn sessions(
        &self,
        active: bool,
        limit: u32,
        before: Option<&str>,
    ) -> anyhow::Result<Vec<fleetrun_proto::api::Session>> {
        let mut path = format!("/v1/sessions?limit={limit}");
        if active {
            path.push_str("&active=true");
        }
        if let Some(b) = before {
            path.push_str(&format!("&before={}", encode(b)));
        }
        self.json(self.request(Method::GET, &path)).await
    }

    /// `GET /v1/sessions/{id}`.
    pub async fn session(&self, id: &str) -> anyhow::Result<fleetrun_proto::api::Session> {
        let path = format!("/v1/sessions/{}", encode(id));
        self.json(self.request(Method::GET, &path)).await
    }

    /// `POST /v1/sessions/{id}/terminate`.
    pub async fn terminate_session(
        &self,
        id: &str,
    ) -> anyhow::Result<fleetrun_proto::api::Session> {
        let path = format!("/v1/sessions/{}/terminate", encode(id));
        self.json(self.request(Method::POST, &path)).await
    }

    /// `PUT /v1/objects/{key}`, the body streamed from `body` (of `size` bytes).
    pub async fn put_object(
        &self,
        key: &str,
        size: u64,
        body: reqwest::Body,
    ) -> anyhow::Result<fleetrun_proto::api::ObjectInfo> {
        let path = format!("/v1/objects/{}", encode_key(key));
        self.json(
            self.request(Method::PUT, &path)
                .header(reqwest::header::CONTENT_LENGTH, size)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(body),
        )
        .await
    }

    /// `GET /v1/objects/{key}`: the body as it arrives, its length and SHA-256 (from headers).
    pub async fn get_object(&self, key: &str) -> anyhow::Result<(Output<'_>, Option<u64>, String)> {
        let path = format!("/v1/objects/{}", encode_key(key));
        let resp = self.send(self.request(Method::GET, &path)).await?;
        let sha256 = resp
            .headers()
            .get("x-fleetrun-sha256")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let len = resp.content_length();
        Ok((Output { client: self, resp }, len, sha256))
    }

    /// `GET /v1/objects?prefix=&after=&limit=`.
    pub async fn objects(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> anyhow::Result<Vec<fleetrun_proto::api::ObjectInfo>> {
        let mut path = format!("/v1/objects?prefix={}&limit={limit}", encode(prefix));
        if let Some(a) = after {
            path.push_str(&format!("&after={}", encode(a)));
        }
        self.json(self.request(Method::GET, &path)).await
    }

    /// `DELETE /v1/objects/{key}`.
    pub async fn delete_object(&self, key: &str) -> anyhow::Result<()> {
        let path = format!("/v1/objects/{}", encode_key(key));
        self.send(self.request(Method::DELETE, &path)).await?;
        Ok(())
    }

    /// `GET /v1/sessions/{id}/recording`: the asciicast file, to be read chunk by chunk.
    pub async fn recording(&self, id: &str) -> anyhow::Result<Output<'_>> {
        let path = format!("/v1/sessions/{}/recording", encode(id));
        let resp = self.send(self.request(Method::GET, &path)).await?;
        Ok(Output { client: self, resp })
    }

    /// `GET /v1/audit`.
    pub async fn audit(&self, q: &AuditQuery) -> anyhow::Result<Vec<AuditRecord>> {
        let mut url = reqwest::Url::parse("http://query.invalid/v1/audit")?;
        {
            let mut pairs = url.query_pairs_mut();
            let fields = [
                ("principal", q.principal.clone()),
                ("action", q.action.clone()),
                ("node", q.node.clone()),
                ("since", q.since.clone()),
                ("until", q.until.clone()),
                ("limit", q.limit.map(|n| n.to_string())),
            ];
            for (k, v) in fields {
                if let Some(v) = v {
                    pairs.append_pair(k, &v);
                }
            }
        }
        let path = match url.query() {
            Some(query) => format!("/v1/audit?{query}"),
            None => "/v1/audit".to_owned(),
        };
        self.json(self.request(Method::GET, &path)).await
    }

    /// `POST /v1/audit/verify`.
    pub async fn audit_verify(&self, anchor: Option<&AuditAnchor>) -> anyhow::Result<AuditVerify> {
        let mut req = self.request(Method::POST, "/v1/audit/verify");
        if let Some(a) = anchor {
            req = req.json(a);
        }
        self.json(req).await
    }

    /// `POST /v1/commands` with an `Idempotency-Key`, tried up to [`SEND_ATTEMPTS`] times while no
    /// answer comes (the server restarting, a connection cut): every attempt carries the same key,
    /// so one that was stored but whose answer was lost is answered, not run again.
    pub async fn send_command(&self, body: &SendCommand, key: &str) -> anyhow::Result<Command> {
        self.post_command("/v1/commands", "fleetrun send", body, key)
            .await
    }

    /// `POST /v1/scripts/{name}/run` (`?version=N`), retried as [`Self::send_command`] is.
    pub async fn run_script(
        &self,
        name: &str,
        version: Option<u64>,
        body: &SendCommand,
        key: &str,
    ) -> anyhow::Result<Command> {
        let mut path = format!("/v1/scripts/{}/run", encode(name));
        if let Some(v) = version {
            path.push_str(&format!("?version={v}"));
        }
        self.post_command(&path, "fleetrun scripts run", body, key)
            .await
    }

    /// `GET /v1/commands/{id}/script`: the saved script a command ran.
    pub async fn command_script(
        &self,
        id: &CommandId,
    ) -> anyhow::Result<fleetrun_proto::api::ScriptRun> {
        self.json(self.request(Method::GET, &format!("/v1/commands/{id}/script")))
            .await
    }

    /// A POST that makes a command, with its idempotency key, retried while no answer comes;
    /// `what` names the CLI command to run again when it gives up.
    async fn post_command(
        &self,
        path: &str,
        what: &str,
        body: &SendCommand,
        key: &str,
    ) -> anyhow::Result<Command> {
        let mut delay = RETRY_DELAY_FIRST;
        let started = std::time::Instant::now();
        let mut attempt = 1;
        loop {
            let req = self
                .request(Method::POST, path)
                .header(fleetrun_proto::limits::IDEMPOTENCY_KEY_HEADER, key)
                .json(body);
            match self.json(req).await {
                Ok(cmd) => return Ok(cmd),
                Err(e) if is_retryable(&e) && attempt < SEND_ATTEMPTS => {
                    eprintln!(
                        "{e}; retrying in {:.1} s (attempt {}/{SEND_ATTEMPTS}, idempotency key {key})",
                        delay.as_secs_f64(),
                        attempt + 1
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_DELAY_MAX);
                    attempt += 1;
                }
                Err(e) if is_retryable(&e) => {
                    return Err(e.context(format!(
                        "gave up after {attempt} attempts over {} s; the command may have been accepted: run the same `{what}` again with --idempotency-key {key} to get it without running it twice",
                        started.elapsed().as_secs()
                    )));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `GET /v1/commands?limit=N`, newest first.
    pub async fn commands(
        &self,
        limit: Option<u32>,
        before: Option<&str>,
    ) -> anyhow::Result<Vec<Command>> {
        let mut query = Vec::new();
        if let Some(n) = limit {
            query.push(format!("limit={n}"));
        }
        if let Some(b) = before {
            query.push(format!("before={}", encode(b)));
        }
        let path = match query.is_empty() {
            true => "/v1/commands".to_owned(),
            false => format!("/v1/commands?{}", query.join("&")),
        };
        self.json(self.request(Method::GET, &path)).await
    }

    /// `GET /v1/commands/{id}`, with invocations.
    pub async fn command(&self, id: &CommandId) -> anyhow::Result<Command> {
        self.json(self.request(Method::GET, &format!("/v1/commands/{id}")))
            .await
    }

    /// `GET /v1/commands/{id}/invocations`.
    pub async fn invocations(&self, id: &CommandId) -> anyhow::Result<Vec<Invocation>> {
        self.json(self.request(Method::GET, &format!("/v1/commands/{id}/invocations")))
            .await
    }

    /// `POST /v1/commands/{id}/cancel`.
    pub async fn cancel(&self, id: &CommandId, body: &CancelCommand) -> anyhow::Result<Command> {
        self.json(
            self.request(Method::POST, &format!("/v1/commands/{id}/cancel"))
                .json(body),
        )
        .await
    }

    /// `GET /v1/storage`.
    pub async fn storage(&self) -> anyhow::Result<Storage> {
        self.json(self.request(Method::GET, "/v1/storage")).await
    }

    /// `POST /v1/access-keys`: the answer holds the secret, this once.
    pub async fn create_access_key(&self, body: &CreateAccessKey) -> anyhow::Result<AccessKey> {
        self.json(self.request(Method::POST, "/v1/access-keys").json(body))
            .await
    }

    /// `GET /v1/access-keys`, without secrets.
    pub async fn access_keys(&self) -> anyhow::Result<Vec<AccessKey>> {
        self.json(self.request(Method::GET, "/v1/access-keys"))
            .await
    }

    /// `GET /v1/whoami`.
    pub async fn whoami(&self) -> anyhow::Result<WhoAmI> {
        self.json(self.request(Method::GET, "/v1/whoami")).await
    }

    /// `POST /v1/users`.
    pub async fn create_user(&self, body: &CreateUser) -> anyhow::Result<User> {
        self.json(self.request(Method::POST, "/v1/users").json(body))
            .await
    }

    /// `GET /v1/users`.
    pub async fn users(&self) -> anyhow::Result<Vec<User>> {
        self.json(self.request(Method::GET, "/v1/users")).await
    }

    /// `GET /v1/users/{name}`.
    pub async fn user(&self, name: &str) -> anyhow::Result<User> {
        let path = format!("/v1/users/{}", encode(name));
        self.json(self.request(Method::GET, &path)).await
    }

    /// `PUT /v1/users/{name}`.
    pub async fn update_user(&self, name: &str, body: &UpdateUser) -> anyhow::Result<User> {
        let path = format!("/v1/users/{}", encode(name));
        self.json(self.request(Method::PUT, &path).json(body)).await
    }

    /// `DELETE /v1/users/{name}`.
    pub async fn delete_user(&self, name: &str) -> anyhow::Result<()> {
        let path = format!("/v1/users/{}", encode(name));
        self.send(self.request(Method::DELETE, &path)).await?;
        Ok(())
    }

    /// `POST /v1/tokens`: the answer holds the token, this once.
    pub async fn create_token(&self, body: &CreateToken) -> anyhow::Result<Token> {
        self.json(self.request(Method::POST, "/v1/tokens").json(body))
            .await
    }

    /// `GET /v1/tokens[?user=NAME]`.
    pub async fn tokens(&self, user: Option<&str>) -> anyhow::Result<Vec<Token>> {
        let path = match user {
            Some(u) => format!("/v1/tokens?user={}", encode(u)),
            None => "/v1/tokens".to_owned(),
        };
        self.json(self.request(Method::GET, &path)).await
    }

    /// `DELETE /v1/tokens/{id}`.
    pub async fn delete_token(&self, id: &str) -> anyhow::Result<()> {
        let path = format!("/v1/tokens/{}", encode(id));
        self.send(self.request(Method::DELETE, &path)).await?;
        Ok(())
    }

    /// `POST /v1/documents`.
    pub async fn create_document(&self, body: &CreateDocument) -> anyhow::Result<Document> {
        self.json(self.request(Method::POST, "/v1/documents").json(body))
            .await
    }

    /// `GET /v1/documents`: every document at its default version, without content.
    pub async fn documents(&self) -> anyhow::Result<Vec<Document>> {
        self.json(self.request(Method::GET, "/v1/documents")).await
    }

    /// `GET /v1/documents/{name}[?version=V]`, with content (the default version when `version` is
    /// None).
    pub async fn document(&self, name: &str, version: Option<&str>) -> anyhow::Result<Document> {
        let mut path = format!("/v1/documents/{}", encode(name));
        if let Some(v) = version {
            path.push_str(&format!("?version={}", encode(v)));
        }
        self.json(self.request(Method::GET, &path)).await
    }

    /// `PUT /v1/documents/{name}`: adds a version; the answer is the new version.
    pub async fn update_document(
        &self,
        name: &str,
        body: &UpdateDocument,
    ) -> anyhow::Result<Document> {
        let path = format!("/v1/documents/{}", encode(name));
        self.json(self.request(Method::PUT, &path).json(body)).await
    }

    /// `PUT /v1/documents/{name}/default-version`.
    pub async fn set_default_document_version(
        &self,
        name: &str,
        body: &SetDefaultVersion,
    ) -> anyhow::Result<Document> {
        let path = format!("/v1/documents/{}/default-version", encode(name));
        self.json(self.request(Method::PUT, &path).json(body)).await
    }

    /// `DELETE /v1/documents/{name}`.
    pub async fn delete_document(&self, name: &str) -> anyhow::Result<()> {
        let path = format!("/v1/documents/{}", encode(name));
        self.send(self.request(Method::DELETE, &path)).await?;
        Ok(())
    }

    /// `POST /v1/scripts`.
    pub async fn create_script(
        &self,
        body: &fleetrun_proto::api::CreateScript,
    ) -> anyhow::Result<fleetrun_proto::api::Script> {
        self.json(self.request(Method::POST, "/v1/scripts").json(body))
            .await
    }

    /// `GET /v1/scripts?limit=N[&after=NAME]`: scripts at their latest versions, without bodies.
    pub async fn scripts(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> anyhow::Result<Vec<fleetrun_proto::api::Script>> {
        let mut path = format!("/v1/scripts?limit={limit}");
        if let Some(a) = after {
            path.push_str(&format!("&after={}", encode(a)));
        }
        self.json(self.request(Method::GET, &path)).await
    }

    /// `GET /v1/scripts/{name}[?version=N]`, with the body (the latest version by default).
    pub async fn script(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> anyhow::Result<fleetrun_proto::api::Script> {
        let mut path = format!("/v1/scripts/{}", encode(name));
        if let Some(v) = version {
            path.push_str(&format!("?version={v}"));
        }
        self.json(self.request(Method::GET, &path)).await
    }

    /// `PUT /v1/scripts/{name}`: adds a version; the answer is the new version.
    pub async fn update_script(
        &self,
        name: &str,
        body: &fleetrun_proto::api::UpdateScript,
    ) -> anyhow::Result<fleetrun_proto::api::Script> {
        let path = format!("/v1/scripts/{}", encode(name));
        self.json(self.request(Method::PUT, &path).json(body)).await
    }

    /// `DELETE /v1/scripts/{name}`.
    pub async fn delete_script(&self, name: &str) -> anyhow::Result<()> {
        let path = format!("/v1/scripts/{}", encode(name));
        self.send(self.request(Method::DELETE, &path)).await?;
        Ok(())
    }

    /// `PUT /v1/params/{name}`.
    pub async fn put_param(
        &self,
        name: &str,
        body: &fleetrun_proto::params::PutParam,
    ) -> anyhow::Result<fleetrun_proto::params::Param> {
        let path = format!("/v1/params/{}", encode(name));
        self.json(self.request(Method::PUT, &path).json(body)).await
    }

    /// `GET /v1/params`.
    pub async fn params(&self) -> anyhow::Result<Vec<fleetrun_proto::params::Param>> {
        self.json(self.request(Method::GET, "/v1/params")).await
    }

    /// `GET /v1/params/{name}`.
    pub async fn param(&self, name: &str) -> anyhow::Result<fleetrun_proto::params::Param> {
        let path = format!("/v1/params/{}", encode(name));
        self.json(self.request(Method::GET, &path)).await
    }

    /// `DELETE /v1/params/{name}`.
    pub async fn delete_param(&self, name: &str) -> anyhow::Result<()> {
        let path = format!("/v1/params/{}", encode(name));
        self.send(self.request(Method::DELETE, &path)).await?;
        Ok(())
    }

    /// `GET /v1/commands/{id}/watch`: snapshots until the command is terminal.
    pub async fn watch(&self, id: &CommandId) -> anyhow::Result<Watch<'_>> {
        let resp = self
            .send(self.request(Method::GET, &format!("/v1/commands/{id}/watch")))
            .await?;
        Ok(Watch {
            client: self,
            resp,
            buf: Vec::new(),
        })
    }

    /// `GET .../output/{stdout,stderr}?offset=N[&follow=true]`: the raw bytes from byte `offset` of
    /// what the route serves, to be read chunk by chunk.
    pub async fn output(
        &self,
        id: &CommandId,
        node: &NodeId,
        stream: Stream,
        follow: bool,
        offset: u64,
    ) -> anyhow::Result<Output<'_>> {
        let name = match stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        let mut path =
            format!("/v1/commands/{id}/invocations/{node}/output/{name}?offset={offset}");
        if follow {
            path.push_str("&follow=true");
        }
        let resp = self.send(self.request(Method::GET, &path)).await?;
        Ok(Output { client: self, resp })
    }
}

/// Percent-encodes text for a path segment or a query value: everything but RFC 3986's unreserved
/// characters (so `$LATEST` and names with `/` or spaces reach the server as they were typed).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An object key for a path: each segment encoded, the `/` between them kept.
fn encode_key(key: &str) -> String {
    key.split('/').map(encode).collect::<Vec<_>>().join("/")
}

/// A body of raw output bytes.
pub struct Output<'a> {
    client: &'a Client,
    resp: Response,
}

impl Output<'_> {
    /// The next chunk as received, or None at the end.
    pub async fn chunk(&mut self) -> anyhow::Result<Option<Bytes>> {
        self.resp
            .chunk()
            .await
            .map_err(|e| self.client.transport_error(e))
    }
}

/// An NDJSON stream of command snapshots.
pub struct Watch<'a> {
    client: &'a Client,
    resp: Response,
    buf: Vec<u8>,
}

impl Watch<'_> {
    /// The next snapshot, or None when the server ended the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<Command>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                return serde_json::from_slice(line)
                    .map(Some)
                    .context("the server sent a watch line this CLI does not understand");
            }
            match self
                .resp
                .chunk()
                .await
                .map_err(|e| self.client.transport_error(e))?
            {
                Some(chunk) => self.buf.extend_from_slice(&chunk),
                None => {
                    // A last line without its newline still counts.
                    let rest = std::mem::take(&mut self.buf);
                    let rest = rest.trim_ascii();
                    if rest.is_empty() {
                        return Ok(None);
                    }
                    return serde_json::from_slice(rest)
                        .map(Some)
                        .context("the server sent a watch line this CLI does not understand");
                }
            }
        }
    }
}

/// The certificates of a PEM file, to trust as roots.
fn read_ca(path: &std::path::Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read the CA certificate {}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("bad CA certificate {}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("no certificate in {}", path.display());
    }
    Ok(certs)
}

/// Whether a failed request was refused because the server's certificate is not trusted. rustls'
/// error travels inside an `io::Error`, whose `source()` skips it, so look into those too.
fn is_untrusted_certificate(e: &reqwest::Error) -> bool {
    fn find(e: &(dyn std::error::Error + 'static)) -> bool {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return matches!(tls, rustls::Error::InvalidCertificate(_));
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && find(inner)
        {
            return true;
        }
        e.source().is_some_and(find)
    }
    find(e)
}

#[cfg(test)]
mod tests {
    use super::encode;

    #[test]
    fn encodes_path_segments_and_query_values() {
        assert_eq!(encode("my-doc_1.x"), "my-doc_1.x");
        assert_eq!(encode("$LATEST"), "%24LATEST");
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
        assert_eq!(encode("é"), "%C3%A9");
    }
}
