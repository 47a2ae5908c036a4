//! The SSM-compatible API: AWS JSON 1.1 (`POST /` with `X-Amz-Target: AmazonSSM.<Operation>`), signed
//! with SigV4 by access keys from `fleetrun access-key create`, so the AWS CLI, boto3 and tools built on
//! them run commands on fleetrun with `--endpoint-url`.
//!
//! Member names, types, enums, limits and error shapes follow botocore's SSM model
//! (`botocore/data/ssm/2014-11-06/service-2.json`).

mod commands;
mod documents;
mod instances;
mod shapes;

use crate::AppState;
use crate::access::audit::{self as trail, ANONYMOUS};
use crate::access::authn::AuthnError;
use crate::access::authz::{CheckError, Denied, Principal};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use fleetrun_proto::time::now_ms;
use fleetrun_store::AuditEntry;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;

/// The SSM error for a request body that could not be read: not within the body read timeout, over
/// [`BODY_MAX`], or cut off.
fn body_rejection(r: &BytesRejection) -> SsmError {
    if let Some(limit) = crate::net::conn::body_timed_out(r) {
        return SsmError::new(
            "RequestTimeout",
            crate::net::conn::BodyTimedOut(limit).to_string(),
        );
    }
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return SsmError::validation(format!(
            "1 validation error detected: the request body is larger than {BODY_MAX} bytes, the most the SSM API reads"
        ));
    }
    SsmError::new(
        "SerializationException",
        format!("cannot read the request body: {}", r.body_text()),
    )
}

/// An SSM error: HTTP status, AWS error code (`__type`) and message.
#[derive(Debug)]
pub struct SsmError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Nodes an authorization refusal named (for the audit record).
    denied_nodes: Vec<String>,
}

impl SsmError {
    /// A 400 with an AWS error code.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        SsmError {
            status: StatusCode::BAD_REQUEST,
            code,
            message: message.into(),
            denied_nodes: Vec::new(),
        }
    }
    /// A server fault (500 InternalServerError); the detail goes to the log only.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!("SSM API internal error: {e}");
        SsmError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "InternalServerError",
            message: "internal server error".into(),
            denied_nodes: Vec::new(),
        }
    }
    fn validation(message: impl Into<String>) -> Self {
        Self::new("ValidationException", message)
    }
}

impl From<Denied> for SsmError {
    fn from(d: Denied) -> Self {
        let mut e = SsmError::new("AccessDeniedException", d.message);
        e.denied_nodes = d.nodes.iter().map(ToString::to_string).collect();
        e
    }
}

impl From<CheckError> for SsmError {
    fn from(e: CheckError) -> Self {
        match e {
            CheckError::Denied(d) => d.into(),
            CheckError::Store(e) => e.into(),
        }
    }
}

impl From<fleetrun_store::StoreError> for SsmError {
    fn from(e: fleetrun_store::StoreError) -> Self {
        SsmError::internal(e)
    }
}

type SsmResult = Result<Value, SsmError>;

/// Largest SSM request body read (2 MiB: SSM's largest member, a document's content, is 64 KB).
pub const BODY_MAX: usize = 2 * 1024 * 1024;

/// `POST /`: one SSM operation, audited (as `ssm.<Operation>`) before it is answered.
pub async fn handle(
    State(state): State<Arc<AppState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // A body that could not be read (too large, or not sent within the body read timeout) is
    // answered in SSM's shape, naming the limit.
    let (body, unreadable) = match body {
        Ok(b) => (b, None),
        Err(r) => (Bytes::new(), Some(body_rejection(&r))),
    };
    let request_id = uuid::Uuid::new_v4().to_string();
    let op: String = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .map(|t| t.strip_prefix("AmazonSSM.").unwrap_or(t))
        .unwrap_or("")
        .chars()
        .take(64)
        .collect();
    let mut entry = AuditEntry {
        at: now_ms(),
        principal: ANONYMOUS.into(),
        source: addr.to_string(),
        action: format!("ssm.{op}"),
        ..AuditEntry::default()
    };
    let credential = crate::access::authn::sigv4_credential(&headers);
    let authenticated = match state
        .auth_guard
        .check_credential(addr.ip(), credential.as_deref())
    {
        _ if let Some(e) = unreadable => Err(e),
        Err(retry) => Err(SsmError::new(
            "ThrottlingException",
            format!(
                "Rate exceeded: too many failed authentications from this address or with this access key; retry in {} s",
                retry.as_secs().max(1)
            ),
        )),
        Ok(()) => crate::access::authn::sigv4(&state, &method, &uri, &headers, &body)
            .await
            .map_err(|e| match e {
                AuthnError::Refused { code, message } => SsmError::new(code, message),
                AuthnError::Internal(e) => SsmError::internal(e),
            })
            .inspect_err(|e| {
                if e.status == StatusCode::BAD_REQUEST || e.status == StatusCode::FORBIDDEN {
                    state
                        .auth_guard
                        .failed_credential(addr.ip(), credential.as_deref());
                }
            }),
    };
    let result = match authenticated {
        Ok(principal) if let Err(retry) = state.rate_limiter.check(principal.name()) => {
            entry.principal = principal.name().to_owned();
            Err(SsmError::new(
                "ThrottlingException",
                format!(
                    "Rate exceeded: {} is over its request rate limit; retry in {} s",
                    principal.name(),
                    retry.as_secs().max(1)
                ),
            ))
        }
        Ok(principal) => {
            entry.principal = principal.name().to_owned();
            let r = match dispatch(&state, &principal, &headers, &body).await {
                // Deny by default, as on the native API: an operation that never asked is refused.
                Ok(_) if !principal.was_authorized() => Err(SsmError::new(
                    "AccessDeniedException",
                    format!("operation {op} has no authorization rule; refused"),
                )),
                r => r,
            };
            // A big refused body is recorded as its length and digest only.
            match trail::body_record(&mut entry, &body, r.is_ok(), &["DocumentName", "Name"]) {
                Some(trail::BodyRecord::Json(v)) => entry.params = v,
                Some(trail::BodyRecord::Digest(m)) => entry.params = Value::Object(m),
                None => {}
            }
            r
        }
        Err(e) => Err(e),
    };
    // Only an accepted write waits for its record's commit; reads and refusals queue theirs.
    let wait = result.is_ok() && is_write(&op);
    let (status, value) = match result {
        Ok(v) => {
            if let Some(id) = v.pointer("/Command/CommandId").and_then(Value::as_str) {
                entry.command_id = id.to_owned();
            }
            entry.result = "200".into();
            (StatusCode::OK, v)
        }
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(code = e.code, "SSM request failed");
            }
            entry.result = format!("{} {}", e.status.as_u16(), e.code);
            trail::add_nodes(&mut entry, &e.denied_nodes);
            (e.status, json!({ "__type": e.code, "message": e.message }))
        }
    };
    trail::record(&state, entry, wait).await;
    answer(status, value, request_id)
}

/// An SSM answer: AWS JSON 1.1 with a request id.
fn answer(status: StatusCode, value: Value, request_id: String) -> Response {
    let headers = [
        (
            header::CONTENT_TYPE,
            "application/x-amz-json-1.1".to_owned(),
        ),
        (
            header::HeaderName::from_static("x-amzn-requestid"),
            request_id,
        ),
    ];
    (status, headers, value.to_string()).into_response()
}

/// Whether an SSM operation changes state (its record is committed before it is answered).
fn is_write(op: &str) -> bool {
    !["List", "Get", "Describe"]
        .iter()
        .any(|p| op.starts_with(p))
}

async fn dispatch(
    state: &Arc<AppState>,
    p: &Principal,
    headers: &HeaderMap,
    body: &[u8],
) -> SsmResult {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(op) = target.strip_prefix("AmazonSSM.") else {
        return Err(SsmError::new(
            "UnknownOperationException",
            format!("unknown X-Amz-Target {target:?}"),
        ));
    };
    match op {
        "SendCommand" => {
            let idempotency = commands::idempotency(headers, body)?;
            commands::send_command(state, p, parse(body)?, idempotency).await
        }
        "ListCommands" => commands::list_commands(state, p, parse(body)?).await,
        "ListCommandInvocations" => {
            commands::list_command_invocations(state, p, parse(body)?).await
        }
        "GetCommandInvocation" => commands::get_command_invocation(state, p, parse(body)?).await,
        "CancelCommand" => commands::cancel_command(state, p, parse(body)?).await,
        "DescribeInstanceInformation" => {
            instances::describe_instance_information(state, p, parse(body)?).await
        }
        "CreateDocument" => documents::create_document(state, p, parse(body)?).await,
        "GetDocument" => documents::get_document(state, p, parse(body)?).await,
        "DescribeDocument" => documents::describe_document(state, p, parse(body)?).await,
        "ListDocuments" => documents::list_documents(state, p, parse(body)?).await,
        "UpdateDocument" => documents::update_document(state, p, parse(body)?).await,
        "DeleteDocument" => documents::delete_document(state, p, parse(body)?).await,
        "UpdateDocumentDefaultVersion" => {
            documents::update_document_default_version(state, p, parse(body)?).await
        }
        other => Err(SsmError::new(
            "UnknownOperationException",
            format!("operation {other} is not supported by fleetrun"),
        )),
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, SsmError> {
    let body = if body.is_empty() {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        SsmError::new(
            "SerializationException",
            format!("cannot read the request: {e}"),
        )
    })
}

/// Epoch seconds, as the JSON protocol sends timestamps.
fn epoch(ms: i64) -> Value {
    json!(ms as f64 / 1000.0)
}

/// Opaque pagination token: the offset of the next page.
fn next_token(offset: u64, page_len: usize, limit: u32) -> Value {
    if page_len < limit as usize {
        Value::Null
    } else {
        json!(format!(
            "fr1.{}",
            hex::encode((offset + page_len as u64).to_be_bytes())
        ))
    }
}

/// The offset a `NextToken` names. Offsets are bound to SQL as `i64`: a token past `i64::MAX` (which
/// no listing hands out) is refused rather than wrapped to a negative offset, which SQLite reads as
/// "no offset" and answers with the first page.
fn parse_token(token: Option<&str>) -> Result<u64, SsmError> {
    let Some(t) = token else { return Ok(0) };
    let bad = || SsmError::new("InvalidNextToken", "The specified token is not valid.");
    let hex_part = t.strip_prefix("fr1.").ok_or_else(bad)?;
    let bytes: [u8; 8] = hex::decode(hex_part)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(bad)?;
    let offset = u64::from_be_bytes(bytes);
    if i64::try_from(offset).is_err() {
        return Err(bad());
    }
    Ok(offset)
}

fn check_max_results(v: Option<i64>, min: i64, max: i64, default: u32) -> Result<u32, SsmError> {
    match v {
        None => Ok(default),
        Some(n) if (min..=max).contains(&n) => Ok(n as u32),
        Some(n) => Err(SsmError::validation(format!(
            "1 validation error detected: Value '{n}' at 'maxResults' failed to satisfy constraint: Member must have value between {min} and {max}"
        ))),
    }
}

/// SSM's longest target (and filter) key: `TargetKey` in botocore's model.
pub const TARGET_KEY_MAX: usize = 163;
/// SSM's longest target value.
pub const TARGET_VALUE_MAX: usize = 256;

/// Checks a `tag:NAME` / `tag-key` target or filter key and its values (`key_member` and
/// `values_member` name them as SSM does): the key at most [`TARGET_KEY_MAX`] characters, values at
/// most [`TARGET_VALUE_MAX`], and the tag names and values as fleetrun stores tags (the native API's
/// limits: `check_tag_key`, `check_tag_value`), so no control character or oversized text gets
/// through.
fn check_target_key(
    key: &str,
    key_member: &str,
    values: &[String],
    values_member: &str,
) -> Result<(), SsmError> {
    use fleetrun_proto::targets::{check_tag_key, check_tag_value, shown};
    let chars = key.chars().count();
    if chars > TARGET_KEY_MAX {
        return Err(SsmError::validation(format!(
            "1 validation error detected: Value {} at '{key_member}' failed to satisfy constraint: Member must have length less than or equal to {TARGET_KEY_MAX} ({chars} characters)",
            shown(key)
        )));
    }
    if let Some(v) = values.iter().find(|v| v.chars().count() > TARGET_VALUE_MAX) {
        return Err(SsmError::validation(format!(
            "1 validation error detected: Value {} at '{values_member}' failed to satisfy constraint: Member must have length less than or equal to {TARGET_VALUE_MAX}",
            shown(v)
        )));
    }
    let invalid = |e: fleetrun_proto::targets::ParseError| {
        SsmError::validation(format!(
            "1 validation error detected: {key_member} {}: {}",
            shown(key),
            e.0
        ))
    };
    if let Some(name) = key.strip_prefix("tag:") {
        if !name.is_empty() {
            check_tag_key(name).map_err(invalid)?;
        }
        for v in values {
            check_tag_value(v).map_err(invalid)?;
        }
    } else if key == "tag-key" {
        for v in values {
            check_tag_key(v).map_err(invalid)?;
        }
    } else if key.chars().any(char::is_control) {
        return Err(SsmError::validation(format!(
            "1 validation error detected: Value {} at '{key_member}' failed to satisfy constraint: Member must not contain control characters",
            shown(key)
        )));
    }
    Ok(())
}

/// SSM's instance id pattern: `i-` + 8 or 17 word characters, or `mi-` + 17.
fn check_instance_id(id: &str) -> Result<fleetrun_proto::NodeId, SsmError> {
    let word = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    let ssm_shape = (id.starts_with("mi-") && id.len() == 20 && word(&id[3..]))
        || (id.starts_with("i-") && (id.len() == 10 || id.len() == 19) && word(&id[2..]));
    if !ssm_shape {
        return Err(SsmError::validation(format!(
            "1 validation error detected: Value '{id}' at 'instanceId' failed to satisfy constraint: Member must satisfy regular expression pattern: (^i-(\\w{{8}}|\\w{{17}})$)|(^mi-\\w{{17}}$)"
        )));
    }
    id.parse().map_err(|_| {
        SsmError::new(
            "InvalidInstanceId",
            format!("Instance Id {id} is not a valid managed node"),
        )
    })
}

fn check_command_id(id: &str) -> Result<fleetrun_proto::CommandId, SsmError> {
    if id.len() != 36 {
        return Err(SsmError::validation(format!(
            "1 validation error detected: Value '{id}' at 'commandId' failed to satisfy constraint: Member must have length equal to 36"
        )));
    }
    id.parse().map_err(|_| {
        SsmError::new(
            "InvalidCommandId",
            format!("{id} is not a valid command id"),
        )
    })
}
