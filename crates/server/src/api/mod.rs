//! The native JSON API under `/v1` (routes listed in fleetrun_proto::api): router, errors, auth.

mod access_keys;
mod activations;
mod audit;
mod commands;
mod documents;
mod errors;
mod nodes;
mod output;
mod params;
mod storage;
mod tokens;
mod users;

use crate::AppState;
use crate::access::audit::{self as trail, ANONYMOUS, CreatedCommand, ErrorCode};
use crate::access::authn::AuthnError;
use crate::access::authz::Denied;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, FromRequest, MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use fleetrun_proto::api::{ErrorBody, ErrorDetail, Health};
use fleetrun_proto::time::now_ms;
use fleetrun_store::AuditEntry;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;

pub(crate) use nodes::node_ref;

/// Builds the HTTP router.
pub fn router(state: Arc<AppState>) -> Router {
    let authed = Router::new()
        .route(
            "/v1/activations",
            post(activations::create).get(activations::list),
        )
        .route("/v1/nodes", get(nodes::list))
        .route(
            "/v1/nodes/{node_id}",
            get(nodes::get).delete(nodes::deregister),
        )
        .route("/v1/commands", post(commands::send).get(commands::list))
        .route("/v1/commands/{command_id}", get(commands::get))
        .route("/v1/commands/{command_id}/watch", get(commands::watch))
        .route(
            "/v1/commands/{command_id}/invocations",
            get(commands::invocations),
        )
        .route(
            "/v1/commands/{command_id}/invocations/{node_id}/output/{pipe}",
            get(output::get),
        )
        .route("/v1/commands/{command_id}/cancel", post(commands::cancel))
        .route(
            "/v1/documents",
            post(documents::create).get(documents::list),
        )
        .route(
            "/v1/documents/{name}",
            get(documents::get)
                .put(documents::update)
                .delete(documents::delete),
        )
        .route(
            "/v1/documents/{name}/default-version",
            put(documents::set_default),
        )
        .route("/v1/storage", get(storage::get))
        .route(
            "/v1/access-keys",
            post(access_keys::create).get(access_keys::list),
        )
        .route("/v1/whoami", get(users::whoami))
        .route("/v1/users", post(users::create).get(users::list))
        .route(
            "/v1/users/{name}",
            get(users::get).put(users::update).delete(users::delete),
        )
        .route("/v1/tokens", post(tokens::create).get(tokens::list))
        .route("/v1/tokens/{id}", axum::routing::delete(tokens::delete))
        .route("/v1/params", get(params::list))
        .route(
            "/v1/params/{name}",
            get(params::get).put(params::put).delete(params::delete),
        )
        .route("/v1/audit", get(audit::list))
        .route("/v1/audit/verify", post(audit::verify))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route(
            "/",
            post(crate::ssm::handle)
                .layer(axum::extract::DefaultBodyLimit::max(crate::ssm::BODY_MAX)),
        )
        .route("/v1/health", get(health))
        .route("/v1/agent/connect", get(crate::fleet::channel::connect))
        .merge(authed)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "NotFound", "no such route") })
        .layer(middleware::from_fn_with_state(state.clone(), body_deadline))
        .layer(middleware::from_fn(errors::json_errors))
        .with_state(state)
}

/// Every request body must arrive within the body read timeout (see [`crate::net::conn::DeadlineBody`]);
/// bodiless requests (GETs, the agent channel's upgrade) are left as they are.
async fn body_deadline(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    use http_body::Body as _;
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let body = Body::new(crate::net::conn::DeadlineBody::new(
        body,
        state.body_read_timeout,
    ));
    next.run(Request::from_parts(parts, body)).await
}

/// 408 for a body that did not arrive within the body read timeout.
pub(crate) fn body_timeout_error(limit: std::time::Duration) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "RequestTimeout",
        crate::net::conn::BodyTimedOut(limit).to_string(),
    )
}

async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: fleetrun_proto::version::FLEETRUN_VERSION.into(),
        protocol_version: fleetrun_proto::version::PROTOCOL_VERSION,
    })
}

/// Largest request body read for the audit record (and so accepted); axum's JSON limit is 2 MiB.
const AUDIT_BODY_MAX: usize = 2 * 1024 * 1024;

/// Every API route but health and the agent channel needs a bearer token; every call, authenticated
/// or not, is audited here (see crate::access::audit). Accepted writes wait for their record's commit before
/// the answer is sent; reads and refused requests only queue theirs, so they never wait for the
/// writer (and a flood of them cannot delay the writes).
async fn authenticate(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let mut entry = AuditEntry {
        at: now_ms(),
        principal: ANONYMOUS.into(),
        source: trail::source(req.extensions()),
        action: trail::api_action(req.method(), &route),
        ..AuditEntry::default()
    };
    trail::resources_from_path(&mut entry, &route, req.uri().path());
    let write = req.method() != Method::GET;
    let query = req.uri().query().map(str::to_owned);
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let credential = crate::access::authn::bearer_credential(req.headers());
    let checked = match ip.map(|ip| state.auth_guard.check_credential(ip, credential.as_deref())) {
        Some(Err(retry)) => Err(throttled(retry)),
        _ => crate::access::authn::bearer(&state, req.headers())
            .await
            .map_err(|e| match e {
                AuthnError::Refused { message, .. } => {
                    if let Some(ip) = ip {
                        state
                            .auth_guard
                            .failed_credential(ip, credential.as_deref());
                    }
                    ApiError::unauthorized(&message).into_response()
                }
                AuthnError::Internal(e) => ApiError::internal(e).into_response(),
            }),
    };
    let resp = match checked {
        Err(resp) => resp,
        Ok(principal) if let Err(retry) = state.rate_limiter.check(principal.name()) => {
            entry.principal = principal.name().to_owned();
            rate_limited(principal.name(), retry)
        }
        Ok(principal) => {
            entry.principal = principal.name().to_owned();
            let (mut parts, body) = req.into_parts();
            parts.extensions.insert(principal.clone());
            let mut params = serde_json::Map::new();
            if let Some(q) = query {
                params.insert("query".into(), Value::String(q));
            }
            let bytes = match axum::body::to_bytes(body, AUDIT_BODY_MAX).await {
                Ok(b) => b,
                Err(e) if let Some(limit) = crate::net::conn::body_timed_out(&e) => {
                    entry.params = Value::Object(params);
                    let resp = body_timeout_error(limit).into_response();
                    return finish(&state, entry, resp, write).await;
                }
                Err(_) => {
                    let e = ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "InvalidRequest",
                        format!("request body larger than {AUDIT_BODY_MAX} bytes"),
                    );
                    entry.params = Value::Object(params);
                    return finish(&state, entry, e.into_response(), write).await;
                }
            };
            let resp = next
                .run(Request::from_parts(parts, Body::from(bytes.clone())))
                .await;
            let accepted = resp.status().is_success();
            match trail::body_record(&mut entry, &bytes, accepted, &["document_name", "name"]) {
                Some(trail::BodyRecord::Json(v)) => {
                    params.insert("body".into(), v);
                }
                Some(trail::BodyRecord::Digest(m)) => params.extend(m),
                None => {}
            }
            entry.params = Value::Object(params);
            if resp.status().is_success() && !principal.was_authorized() {
                // Deny by default: a handler that answered without asking crate::access::authz is a bug,
                // and must not hand anything out.
                tracing::error!(%route, "handler answered without an authorization check; refused");
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "AccessDenied",
                    "this route has no authorization rule; refused",
                )
                .into_response()
            } else {
                resp
            }
        }
    };
    finish(&state, entry, resp, write).await
}

/// Records the outcome of a call, then lets the answer go: after its record's commit for an
/// accepted `write`, at once (the record queued) for anything else.
async fn finish(state: &AppState, mut entry: AuditEntry, resp: Response, write: bool) -> Response {
    let wait = write && resp.status().is_success();
    if let Some(CreatedCommand(id)) = resp.extensions().get::<CreatedCommand>() {
        entry.command_id = id.clone();
    }
    if let Some(trail::DeniedNodes(nodes)) = resp.extensions().get::<trail::DeniedNodes>() {
        trail::add_nodes(&mut entry, nodes);
    }
    entry.result = match resp.extensions().get::<ErrorCode>() {
        Some(ErrorCode(code)) => format!("{} {code}", resp.status().as_u16()),
        None => resp.status().as_u16().to_string(),
    };
    trail::record(state, entry, wait).await;
    resp
}

/// 429 for a principal over its request rate (`--rate-limit`).
fn rate_limited(who: &str, retry: std::time::Duration) -> Response {
    let secs = retry.as_secs().max(1);
    let body = ErrorBody {
        error: ErrorDetail {
            code: "TooManyRequests".into(),
            message: format!("{who} is over its request rate limit; retry in {secs} s"),
        },
    };
    let mut resp = (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, secs.to_string())],
        Json(body),
    )
        .into_response();
    resp.extensions_mut().insert(ErrorCode("TooManyRequests"));
    resp
}

/// 429 for a source that failed authentication too often (see [`crate::access::guard`]).
fn throttled(retry: std::time::Duration) -> Response {
    let secs = retry.as_secs().max(1);
    let body = ErrorBody {
        error: ErrorDetail {
            code: "TooManyFailedAuthentications".into(),
            message: format!(
                "too many failed authentications from this address or with this credential; retry in {secs} s"
            ),
        },
    };
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, secs.to_string())],
        Json(body),
    )
        .into_response()
}

/// An API error: status, machine-readable code and a one-line message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Nodes an authorization refusal named (for the audit record).
    denied_nodes: Vec<String>,
}

impl ApiError {
    /// An error with a status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            denied_nodes: Vec::new(),
        }
    }
    /// 400 with a code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    /// 404 with a code.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
    fn unauthorized(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized", message)
    }
    /// 500: a fault of the server itself; the detail goes to the log, not the client.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {e}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "internal server error (see the server log)",
        )
    }
}

impl From<Denied> for ApiError {
    fn from(d: Denied) -> Self {
        let mut e = ApiError::new(StatusCode::FORBIDDEN, "AccessDenied", d.message);
        e.denied_nodes = d.nodes.iter().map(ToString::to_string).collect();
        e
    }
}

impl From<crate::access::authz::CheckError> for ApiError {
    fn from(e: crate::access::authz::CheckError) -> Self {
        match e {
            crate::access::authz::CheckError::Denied(d) => d.into(),
            crate::access::authz::CheckError::Store(e) => e.into(),
        }
    }
}

impl From<fleetrun_store::StoreError> for ApiError {
    fn from(e: fleetrun_store::StoreError) -> Self {
        ApiError::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.into(),
                message: self.message,
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
        resp.extensions_mut().insert(ErrorCode(self.code));
        if !self.denied_nodes.is_empty() {
            resp.extensions_mut()
                .insert(trail::DeniedNodes(self.denied_nodes));
        }
        resp
    }
}

/// A JSON body whose rejections are [`ApiError`]s naming what is wrong.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => {
                // 413 and 415 say something precise; every other malformed body is a plain 400.
                let status = match rejection.status() {
                    s @ (StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE) => s,
                    _ => StatusCode::BAD_REQUEST,
                };
                Err(ApiError::new(
                    status,
                    "InvalidRequest",
                    rejection.body_text(),
                ))
            }
        }
    }
}

/// Parses a path segment as an id, or a 4xx naming it.
pub fn parse_id<T: std::str::FromStr>(s: &str, code: &'static str) -> Result<T, ApiError>
where
    T::Err: std::fmt::Display,
{
    s.parse()
        .map_err(|e: T::Err| ApiError::bad_request(code, e.to_string()))
}
