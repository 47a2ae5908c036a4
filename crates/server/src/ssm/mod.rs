//! The SSM-compatible API: AWS JSON 1.1 (`POST /` with `X-Amz-Target: AmazonSSM.<Operation>`), signed
//! with SigV4 by access keys from `fleetrun access-key create`, so the AWS CLI, boto3 and tools built on
//! them run commands on fleetrun with `--endpoint-url`.
//!
//! Member names, types, enums, limits and error shapes follow botocore's SSM model
//! (`botocore/data/ssm/2014-11-06/service-2.json`).

mod activations;
mod commands;
mod documents;
mod instances;
mod params;
mod sessions;
mod shapes;
mod tags;

pub use sessions::owner_arn;

use crate::AppState;
use crate::access::audit::{self as trail, ANONYMOUS, CreatedCommand};
use crate::access::authz::Principal;
use crate::access::gate;
use crate::errors::{Answered, Code, FrontDoor, render};
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
            Code::RequestTimeout,
            crate::net::conn::BodyTimedOut(limit).to_string(),
        );
    }
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return SsmError::validation(format!(
            "1 validation error detected: the request body is larger than {BODY_MAX} bytes, the most the SSM API reads"
        ));
    }
    SsmError::new(
        Code::InvalidRequest,
        format!("cannot read the request body: {}", r.body_text()),
    )
}

/// The SSM API's door: AWS JSON 1.1 (`{"__type","message"}`), every client error a 400.
pub struct Ssm;

impl FrontDoor for Ssm {
    const CREDENTIAL: &'static str = "access key";
    const DOCUMENT_MEMBERS: &'static [&'static str] = &["DocumentName", "Name"];

    fn status(code: Code) -> StatusCode {
        code.aws_status()
    }
    fn code(code: Code) -> &'static str {
        code.aws_code()
    }
    fn message(code: Code, message: String) -> String {
        match code {
            Code::Internal => "internal server error".into(),
            // AWS words every throttle so; SDKs match on the code.
            Code::TooManyRequests | Code::TooManyFailedAuthentications => {
                format!("Rate exceeded: {message}")
            }
            _ => message,
        }
    }
    fn body(code: &'static str, message: String) -> (&'static str, String) {
        (
            CONTENT_TYPE,
            json!({ "__type": code, "message": message }).to_string(),
        )
    }
    /// The body itself (or its length and digest); nothing for an empty body.
    fn params(_query: Option<String>, body: Option<trail::BodyRecord>) -> Value {
        match body {
            Some(trail::BodyRecord::Json(v)) => v,
            Some(trail::BodyRecord::Digest(m)) => Value::Object(m),
            None => Value::Null,
        }
    }
}

/// AWS JSON 1.1's content type.
const CONTENT_TYPE: &str = "application/x-amz-json-1.1";

/// An SSM error: an [`crate::errors::Error`] answered by the SSM API.
pub type SsmError = Answered<Ssm>;

impl SsmError {
    fn validation(message: impl Into<String>) -> Self {
        Self::new(Code::Validation, message)
    }
}

type SsmResult<T = Value> = Result<T, SsmError>;

/// Largest SSM request body read (2 MiB: SSM's largest member, a document's content, is 64 KB).
pub const BODY_MAX: usize = 2 * 1024 * 1024;

/// The operation a request names, read once from `X-Amz-Target`.
struct Target<'a> {
    /// The header as sent (empty when missing or not text).
    header: &'a str,
    /// The operation, when the header is `AmazonSSM.<Operation>`.
    op: Option<&'a str>,
}

impl<'a> Target<'a> {
    fn parse(headers: &'a HeaderMap) -> Self {
        let header = headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        Target {
            header,
            op: header.strip_prefix("AmazonSSM."),
        }
    }

    /// The audit action: `ssm.<Operation>` (the header's first 64 characters without the prefix).
    fn action(&self) -> String {
        let name: String = self.op.unwrap_or(self.header).chars().take(64).collect();
        format!("ssm.{name}")
    }

    /// Whether the operation changes state (its record is committed before it is answered).
    fn is_write(&self) -> bool {
        let op = self.op.unwrap_or(self.header);
        !["List", "Get", "Describe"]
            .iter()
            .any(|p| op.starts_with(p))
    }
}

/// `POST /`: one SSM operation, passed through the request gate ([`crate::access::gate`]) and
/// audited (as `ssm.<Operation>`) before it is answered.
pub async fn handle(
    State(state): State<Arc<AppState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request_id = uuid::Uuid::new_v4().to_string();
    let target = Target::parse(&headers);
    let mut entry = AuditEntry {
        at: now_ms(),
        principal: ANONYMOUS.into(),
        source: addr.to_string(),
        action: target.action(),
        ..AuditEntry::default()
    };
    let subject = format!("operation {}", &entry.action["ssm.".len()..]);
    let mut outcome = gate::Outcome {
        principal: None,
        request: None,
        write: target.is_write(),
        subject: &subject,
    };
    let credential = crate::access::authn::sigv4_credential(&headers);
    let caller = gate::Caller {
        ip: Some(addr.ip()),
        credential: credential.as_deref(),
    };
    // A body that could not be read (too large, or not sent within the body read timeout) is
    // answered in SSM's shape, naming the limit, before any credential is looked at.
    let principal;
    let resp = match body {
        Err(r) => render::<Ssm>(body_rejection(&r).error),
        Ok(ref body) => {
            let admitted = gate::admit::<Ssm>(
                &state.auth_guard,
                &state.rate_limiter,
                &caller,
                &mut entry,
                crate::access::authn::sigv4(
                    &state.store,
                    &state.secret_box,
                    &method,
                    &uri,
                    &headers,
                    body,
                    "ssm",
                ),
            )
            .await;
            match admitted {
                Err(e) => render::<Ssm>(e),
                Ok(p) => {
                    principal = p;
                    let r = dispatch(&state, &principal, target.op, target.header, &headers, body)
                        .await;
                    outcome.principal = Some(&principal);
                    outcome.request = Some(gate::Recorded { query: None, body });
                    answer(r)
                }
            }
        }
    };
    let mut resp = gate::conclude::<Ssm>(&state.store, entry, outcome, resp).await;
    if resp.status().is_server_error() {
        let code = resp.extensions().get::<trail::ErrorCode>().map(|c| c.0);
        tracing::warn!(code, "SSM request failed");
    }
    if let Ok(id) = header::HeaderValue::from_str(&request_id) {
        resp.headers_mut()
            .insert(header::HeaderName::from_static("x-amzn-requestid"), id);
    }
    resp
}

/// An SSM answer: AWS JSON 1.1; a created command named for the audit record.
fn answer(r: SsmResult) -> Response {
    match r {
        Ok(v) => {
            let created = v
                .pointer("/Command/CommandId")
                .and_then(Value::as_str)
                .map(|id| CreatedCommand(id.to_owned()));
            let mut resp = (
                StatusCode::OK,
                [(header::CONTENT_TYPE, CONTENT_TYPE)],
                v.to_string(),
            )
                .into_response();
            if let Some(c) = created {
                resp.extensions_mut().insert(c);
            }
            resp
        }
        Err(e) => e.into_response(),
    }
}

async fn dispatch(
    state: &Arc<AppState>,
    p: &Principal,
    op: Option<&str>,
    target: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> SsmResult {
    let Some(op) = op else {
        return Err(SsmError::new(
            Code::UnknownOperation,
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
        "ListDocumentVersions" => documents::list_document_versions(state, p, parse(body)?).await,
        "UpdateDocument" => documents::update_document(state, p, parse(body)?).await,
        "DeleteDocument" => documents::delete_document(state, p, parse(body)?).await,
        "UpdateDocumentDefaultVersion" => {
            documents::update_document_default_version(state, p, parse(body)?).await
        }
        "AddTagsToResource" => tags::add_tags_to_resource(state, p, parse(body)?).await,
        "RemoveTagsFromResource" => tags::remove_tags_from_resource(state, p, parse(body)?).await,
        "ListTagsForResource" => tags::list_tags_for_resource(state, p, parse(body)?).await,
        "CreateActivation" => activations::create_activation(state, p, parse(body)?).await,
        "DescribeActivations" => activations::describe_activations(state, p, parse(body)?).await,
        "DeleteActivation" => activations::delete_activation(state, p, parse(body)?).await,
        "DeregisterManagedInstance" => {
            activations::deregister_managed_instance(state, p, parse(body)?).await
        }
        "StartSession" => sessions::start_session(state, p, parse(body)?).await,
        "DescribeSessions" => sessions::describe_sessions(state, p, parse(body)?).await,
        "TerminateSession" => sessions::terminate_session(state, p, parse(body)?).await,
        "PutParameter" => params::put_parameter(state, p, parse(body)?).await,
        "GetParameter" => params::get_parameter(state, p, parse(body)?).await,
        "GetParameters" => params::get_parameters(state, p, parse(body)?).await,
        "GetParametersByPath" => params::get_parameters_by_path(state, p, parse(body)?).await,
        "DeleteParameter" => params::delete_parameter(state, p, parse(body)?).await,
        "DeleteParameters" => params::delete_parameters(state, p, parse(body)?).await,
        "DescribeParameters" => params::describe_parameters(state, p, parse(body)?).await,
        "GetParameterHistory" => params::get_parameter_history(state, p, parse(body)?).await,
        other => Err(SsmError::new(
            Code::UnknownOperation,
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
            Code::InvalidRequest,
            format!("cannot read the request: {e}"),
        )
    })
}

/// A member SSM's model requires: its value, else the validation error SSM gives for a null.
fn required<T>(value: Option<T>, member: &str) -> Result<T, SsmError> {
    value.ok_or_else(|| {
        SsmError::validation(format!(
            "1 validation error detected: Value null at '{member}' failed to satisfy constraint: Member must not be null"
        ))
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
    let bad = || SsmError::new(Code::InvalidNextToken, "The specified token is not valid.");
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
            Code::InvalidNodeId,
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
            Code::InvalidCommandId,
            format!("{id} is not a valid command id"),
        )
    })
}
