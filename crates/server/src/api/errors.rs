//! Every error answer is the API's own JSON: errors the framework makes before a handler runs (a
//! 405 with an empty body, a path that does not decode, a body it will not read, a failed WebSocket
//! upgrade) come out as text or nothing. This layer turns each such answer into
//! `{"error":{"code","message"}}` on the native API, or `{"__type","message"}` as
//! `application/x-amz-json-1.1` on the SSM API (`POST /`), keeping its status and headers and
//! naming what was wrong. Answers that are already JSON pass untouched, as do successes.

use crate::errors::Code;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use fleetrun_proto::api::{ErrorBody, ErrorDetail};

/// Most bytes of a framework error's text kept as the message.
const FRAMEWORK_TEXT_MAX: usize = 1024;

/// The layer (see the module doc).
pub async fn json_errors(req: Request, next: Next) -> Response {
    let ssm = req.uri().path() == "/";
    let method = req.method().clone();
    let path: String = req.uri().path().chars().take(200).collect();
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(&resp) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, FRAMEWORK_TEXT_MAX * 4).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
        Err(_) => String::new(),
    };
    let text: String = text.chars().take(FRAMEWORK_TEXT_MAX).collect();
    let allow = parts
        .headers
        .get(header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let message = message(status, &method, &path, allow.as_deref(), &text);
    let code = Code::from_status(status);
    let (content_type, body) = if ssm {
        (
            "application/x-amz-json-1.1",
            serde_json::json!({ "__type": code.aws_code(), "message": message }).to_string(),
        )
    } else {
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.native_code().into(),
                message,
            },
        };
        (
            "application/json",
            serde_json::to_string(&body).unwrap_or_default(),
        )
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Response::from_parts(parts, Body::from(body))
}

fn is_json(resp: &Response) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            // A door's own error shapes: native JSON, SSM's JSON 1.1, the Query protocol's XML.
            t.starts_with("application/json")
                || t.starts_with("application/x-amz-json")
                || t.starts_with("text/xml")
        })
}

fn message(
    status: StatusCode,
    method: &Method,
    path: &str,
    allow: Option<&str>,
    text: &str,
) -> String {
    if status == StatusCode::METHOD_NOT_ALLOWED {
        return match allow {
            Some(a) if !a.is_empty() => {
                format!("method {method} is not allowed on {path}; allowed: {a}")
            }
            _ => format!("method {method} is not allowed on {path}"),
        };
    }
    if text.is_empty() {
        let reason = status.canonical_reason().unwrap_or("error");
        return format!("{method} {path}: {reason}");
    }
    text.to_owned()
}
