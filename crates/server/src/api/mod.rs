//! The native JSON API under `/v1` (routes listed in fleetrun_proto::api): router, errors, auth.

mod access_keys;
pub(crate) mod activations;
mod audit;
pub(crate) mod commands;
mod documents;
mod errors;
pub(crate) mod nodes;
mod output;
mod params;
mod storage;
mod tokens;
mod users;

use crate::AppState;
use crate::access::audit::{self as trail, ANONYMOUS};
use crate::access::gate;
use crate::errors::{Answered, Code, FrontDoor, render};
use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, FromRequest, MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
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
        .route(
            "/v1/activations/{activation_id}",
            axum::routing::delete(activations::delete),
        )
        .route("/v1/nodes", get(nodes::list))
        .route(
            "/v1/nodes/{node_id}",
            get(nodes::get).delete(nodes::deregister),
        )
        .route("/v1/nodes/{node_id}/tags", patch(nodes::tag))
        .route("/v1/nodes/{node_id}/exec", get(crate::sessions::exec::exec))
        .route(
            "/v1/nodes/{node_id}/files/put",
            get(crate::sessions::files::put),
        )
        .route(
            "/v1/nodes/{node_id}/files/get",
            get(crate::sessions::files::get),
        )
        .route(
            "/v1/nodes/{node_id}/files/list",
            get(crate::sessions::files::list),
        )
        .route(
            "/v1/nodes/{node_id}/port-forward",
            get(crate::sessions::forward::open),
        )
        .route(
            "/v1/sessions/{session_id}/tcp",
            get(crate::sessions::forward::connect),
        )
        .route("/v1/sessions", get(crate::sessions::api::list))
        .route("/v1/sessions/{session_id}", get(crate::sessions::api::get))
        .route(SESSION_STREAM_ROUTE, get(crate::sessions::exec::ticketed))
        .route(
            "/v1/sessions/{session_id}/recording",
            get(crate::sessions::api::recording),
        )
        .route(
            "/v1/sessions/{session_id}/terminate",
            post(crate::sessions::api::terminate),
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
        .route(
            "/v1/scripts",
            post(crate::scripts::api::create).get(crate::scripts::api::list),
        )
        .route(
            "/v1/scripts/{name}",
            get(crate::scripts::api::get)
                .put(crate::scripts::api::update)
                .delete(crate::scripts::api::delete),
        )
        .route("/v1/scripts/{name}/run", post(crate::scripts::api::run))
        .route(
            "/v1/commands/{command_id}/script",
            get(crate::scripts::api::of_command),
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
        .route("/v1/objects", get(crate::objects::api::list))
        .route(
            "/v1/objects/{*key}",
            get(crate::objects::api::get)
                .put(crate::objects::api::put)
                .delete(crate::objects::api::delete),
        )
        .route("/v1/audit", get(audit::list))
        .route("/v1/audit/verify", post(audit::verify))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route(
            "/",
            post(aws_door).layer(axum::extract::DefaultBodyLimit::max(crate::ssm::BODY_MAX)),
        )
        .route("/v1/health", get(health))
        .route("/v1/agent/connect", get(crate::fleet::channel::connect))
        .merge(authed)
        .fallback(|| async { ApiError::new(Code::RouteNotFound, "no such route") })
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
    let streamed = req
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|r| crate::objects::api::is_streamed_upload(req.method(), r.as_str()));
    let (parts, body) = req.into_parts();
    let limit = state.body_read_timeout;
    let body = Body::new(if streamed {
        // An upload of gigabytes takes as long as it takes: bounded by time without bytes.
        crate::net::conn::DeadlineBody::idle(body, limit)
    } else {
        crate::net::conn::DeadlineBody::new(body, limit)
    });
    next.run(Request::from_parts(parts, body)).await
}

/// 408 for a body that did not arrive within the body read timeout.
pub(crate) fn body_timeout_error(limit: std::time::Duration) -> ApiError {
    ApiError::new(
        Code::RequestTimeout,
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
/// or not, passes the one request gate ([`crate::access::gate`]): admitted, then concluded (deny by
/// default, audited; accepted writes wait for their record's commit).
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
    let caller = gate::Caller {
        ip,
        credential: credential.as_deref(),
    };
    // A session stream's bearer is its ticket (SSM's StartSession), redeemed here once; every
    // other route's is an API token.
    let mut grant = None;
    let ticket_for = session_stream_id(&route, req.uri().path());
    let headers = req.headers();
    let authenticate = async {
        match ticket_for {
            Some(session_id) => {
                let ticket = redeem_ticket(&state, session_id, headers)?;
                let principal = ticket.principal.clone();
                grant = Some(ticket);
                Ok(principal)
            }
            None => crate::access::authn::bearer(&state.store, headers).await,
        }
    };
    let admitted = gate::admit::<Native>(
        &state.auth_guard,
        &state.rate_limiter,
        &caller,
        &mut entry,
        authenticate,
    )
    .await;
    let principal = match admitted {
        Ok(p) => p,
        Err(e) => {
            let outcome = gate::Outcome {
                principal: None,
                request: None,
                write,
                subject: "this route",
            };
            return gate::conclude::<Native>(&state.store, entry, outcome, render::<Native>(e))
                .await;
        }
    };
    let (mut parts, body) = req.into_parts();
    parts.extensions.insert(principal.clone());
    if let Some(ticket) = grant {
        parts.extensions.insert(ticket);
    }
    if crate::objects::api::is_streamed_upload(&parts.method, &route) {
        // The handler reads the body as it stores it; the trail keeps its summary of it.
        let resp = next.run(Request::from_parts(parts, body)).await;
        let summary = resp
            .extensions()
            .get::<crate::objects::api::StreamedBody>()
            .map(|s| s.0.to_string().into_bytes())
            .unwrap_or_default();
        let outcome = gate::Outcome {
            principal: Some(&principal),
            request: Some(gate::Recorded {
                query,
                body: &summary,
            }),
            write,
            subject: "this route",
        };
        return gate::conclude::<Native>(&state.store, entry, outcome, resp).await;
    }
    let (bytes, resp) = match axum::body::to_bytes(body, AUDIT_BODY_MAX).await {
        Ok(bytes) => {
            let resp = next
                .run(Request::from_parts(parts, Body::from(bytes.clone())))
                .await;
            (bytes, resp)
        }
        Err(e) if let Some(limit) = crate::net::conn::body_timed_out(&e) => {
            (Bytes::new(), body_timeout_error(limit).into_response())
        }
        Err(_) => {
            let e = ApiError::new(
                Code::PayloadTooLarge,
                format!("request body larger than {AUDIT_BODY_MAX} bytes"),
            );
            (Bytes::new(), e.into_response())
        }
    };
    let outcome = gate::Outcome {
        principal: Some(&principal),
        request: Some(gate::Recorded {
            query,
            body: &bytes,
        }),
        write,
        subject: "this route",
    };
    gate::conclude::<Native>(&state.store, entry, outcome, resp).await
}

/// The route a session ticket opens (the `StreamUrl` of SSM's StartSession).
pub const SESSION_STREAM_ROUTE: &str = "/v1/sessions/{session_id}/stream";

/// The session id of a request to [`SESSION_STREAM_ROUTE`].
fn session_stream_id<'a>(route: &str, path: &'a str) -> Option<&'a str> {
    if route != SESSION_STREAM_ROUTE {
        return None;
    }
    path.strip_prefix("/v1/sessions/")?.strip_suffix("/stream")
}

/// Takes the ticket `Authorization: Bearer TOKEN` redeems for `session_id`.
fn redeem_ticket(
    state: &AppState,
    session_id: &str,
    headers: &axum::http::HeaderMap,
) -> Result<crate::sessions::tickets::Ticket, crate::access::authn::AuthnError> {
    let token = crate::access::authn::bearer_token(headers)?;
    state.tickets.redeem(session_id, token).ok_or_else(|| {
        crate::access::authn::AuthnError::Refused {
            code: Code::Unauthorized,
            message: format!(
                "no session ticket {session_id} with that token: it was used, it expired ({} s after StartSession) or it never existed; call StartSession again",
                crate::sessions::tickets::TICKET_TTL.as_secs()
            ),
        }
    })
}

/// The native API's door: `{"error":{"code","message"}}` with the status of the kind.
pub struct Native;

impl FrontDoor for Native {
    const CREDENTIAL: &'static str = "credential";
    const DOCUMENT_MEMBERS: &'static [&'static str] = &["document_name", "name"];

    fn status(code: Code) -> StatusCode {
        code.status()
    }
    fn code(code: Code) -> &'static str {
        code.native_code()
    }
    fn message(code: Code, message: String) -> String {
        match code {
            Code::Internal => "internal server error (see the server log)".into(),
            _ => message,
        }
    }
    fn body(code: &'static str, message: String) -> (&'static str, String) {
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.into(),
                message,
            },
        };
        (
            "application/json",
            serde_json::to_string(&body).unwrap_or_default(),
        )
    }
    /// The query, and the body under `body` (or its length and digest beside the query).
    fn params(query: Option<String>, body: Option<trail::BodyRecord>) -> Value {
        let mut params = serde_json::Map::new();
        if let Some(q) = query {
            params.insert("query".into(), Value::String(q));
        }
        match body {
            Some(trail::BodyRecord::Json(v)) => {
                params.insert("body".into(), v);
            }
            Some(trail::BodyRecord::Digest(m)) => params.extend(m),
            None => {}
        }
        Value::Object(params)
    }
}

/// An API error: an [`crate::errors::Error`] answered by the native API.
pub type ApiError = Answered<Native>;

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
                let code = match rejection.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => Code::PayloadTooLarge,
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => Code::UnsupportedMediaType,
                    _ => Code::InvalidRequest,
                };
                Err(ApiError::new(code, rejection.body_text()))
            }
        }
    }
}

/// A listing's `limit`: `given`, else `default`; anything outside 1 to `max` is refused naming both.
pub fn page_limit<N>(given: Option<N>, default: N, max: N) -> Result<N, ApiError>
where
    N: Copy + PartialOrd + From<u8> + std::fmt::Display,
{
    let limit = given.unwrap_or(default);
    if limit < N::from(1) || limit > max {
        return Err(ApiError::new(
            Code::InvalidParameters,
            format!("limit must be 1 to {max}, got {limit}"),
        ));
    }
    Ok(limit)
}

/// Parses a path segment as an id, or a 4xx naming it.
pub fn parse_id<T: std::str::FromStr>(s: &str, code: Code) -> Result<T, ApiError>
where
    T::Err: std::fmt::Display,
{
    s.parse()
        .map_err(|e: T::Err| ApiError::new(code, e.to_string()))
}

/// `POST /`: the AWS doors. SSM's JSON 1.1 names its operation in `X-Amz-Target`; EC2 and STS
/// (the Query protocol) send a form naming an `Action`.
async fn aws_door(
    state: State<Arc<AppState>>,
    addr: axum::extract::ConnectInfo<std::net::SocketAddr>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> axum::response::Response {
    if crate::query::is_query_request(&headers) {
        crate::query::handle(state, addr, method, uri, headers, body).await
    } else {
        crate::ssm::handle(state, addr, method, uri, headers, body).await
    }
}
