//! The AWS Query protocol door (`POST /` with a form-encoded body naming an `Action`, XML answers,
//! SigV4 with service `ec2` or `sts`): the few EC2 and STS calls that tools built on boto3 make
//! before they call SSM (look an instance up by id, IP or Name tag; tag it; ask who they are).
//! Everything answers from the fleet through the same store, authn, authz and audit as the other
//! doors; any other action is a clear `UnsupportedOperation`.
//!
//! Shapes follow botocore's models (`ec2/2016-11-15`, `sts/2011-06-15`).

mod ec2;
mod sts;
mod xml;

use crate::AppState;
use crate::access::audit::{self as trail, ANONYMOUS};
use crate::access::gate;
use crate::errors::{Answered, Code, FrontDoor, render};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use fleetrun_proto::time::now_ms;
use fleetrun_store::AuditEntry;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;

/// Most form members one request may carry (a DescribeInstances with many ids and filters is
/// a few hundred).
const PARAMS_MAX: usize = 2_000;
/// Longest member name or value read.
const PARAM_LEN_MAX: usize = 4_096;

/// Whether a `POST /` is for this door: a form body and no `X-Amz-Target` (the SSM door's).
pub fn is_query_request(headers: &HeaderMap) -> bool {
    !headers.contains_key("x-amz-target")
        && headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"))
}

/// The EC2 door: EC2's XML error shape (`Response/Errors/Error`) and codes.
pub struct Ec2;
/// The STS door: the Query protocol's XML error shape (`ErrorResponse/Error`).
pub struct Sts;

/// EC2's name for an error kind, where it has its own.
fn ec2_code(code: Code) -> &'static str {
    match code {
        Code::UnknownOperation => "UnsupportedOperation",
        Code::Validation
        | Code::InvalidParameters
        | Code::InvalidRequest
        | Code::InvalidTag
        | Code::InvalidFilter
        | Code::InvalidFilterValue => "InvalidParameterValue",
        Code::InvalidFilterKey => "InvalidParameterValue",
        Code::InvalidNextToken => "InvalidNextToken.Malformed",
        Code::InvalidNodeId | Code::InvalidResourceId => "InvalidInstanceID.Malformed",
        Code::NodeNotFound => "InvalidInstanceID.NotFound",
        Code::TooManyTags => "TagLimitExceeded",
        Code::AccessDenied => "UnauthorizedOperation",
        Code::MissingAuthenticationToken
        | Code::IncompleteSignature
        | Code::InvalidSignature
        | Code::UnrecognizedClient
        | Code::Unauthorized => "AuthFailure",
        Code::TooManyRequests | Code::TooManyFailedAuthentications => "RequestLimitExceeded",
        Code::Internal => "InternalError",
        other => other.aws_code(),
    }
}

impl FrontDoor for Ec2 {
    const CREDENTIAL: &'static str = "access key";
    const DOCUMENT_MEMBERS: &'static [&'static str] = &[];

    fn status(code: Code) -> StatusCode {
        match code {
            Code::MissingAuthenticationToken
            | Code::IncompleteSignature
            | Code::InvalidSignature
            | Code::UnrecognizedClient
            | Code::Unauthorized => StatusCode::UNAUTHORIZED,
            other => other.aws_status(),
        }
    }
    fn code(code: Code) -> &'static str {
        ec2_code(code)
    }
    fn message(code: Code, message: String) -> String {
        if code == Code::Internal {
            "An internal error has occurred".into()
        } else {
            message
        }
    }
    fn body(code: &'static str, message: String) -> (&'static str, String) {
        let request_id = uuid::Uuid::new_v4();
        (
            xml::CONTENT_TYPE,
            format!(
                "{}<Response><Errors><Error><Code>{}</Code><Message>{}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>",
                xml::DECLARATION,
                xml::esc(code),
                xml::esc(&message)
            ),
        )
    }
    fn params(_query: Option<String>, body: Option<trail::BodyRecord>) -> Value {
        record_params(body)
    }
}

impl FrontDoor for Sts {
    const CREDENTIAL: &'static str = "access key";
    const DOCUMENT_MEMBERS: &'static [&'static str] = &[];

    fn status(code: Code) -> StatusCode {
        Ec2::status(code)
    }
    fn code(code: Code) -> &'static str {
        match code {
            Code::UnknownOperation => "InvalidAction",
            Code::MissingAuthenticationToken => "MissingAuthenticationToken",
            Code::IncompleteSignature => "IncompleteSignature",
            Code::InvalidSignature => "SignatureDoesNotMatch",
            Code::UnrecognizedClient | Code::Unauthorized => "InvalidClientTokenId",
            Code::TooManyRequests | Code::TooManyFailedAuthentications => "Throttling",
            Code::Internal => "InternalFailure",
            _ => "InvalidParameterValue",
        }
    }
    fn body(code: &'static str, message: String) -> (&'static str, String) {
        let request_id = uuid::Uuid::new_v4();
        (
            xml::CONTENT_TYPE,
            format!(
                "{}<ErrorResponse xmlns=\"{}\"><Error><Type>Sender</Type><Code>{}</Code><Message>{}</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>",
                xml::DECLARATION,
                sts::XMLNS,
                xml::esc(code),
                xml::esc(&message)
            ),
        )
    }
    fn params(_query: Option<String>, body: Option<trail::BodyRecord>) -> Value {
        record_params(body)
    }
}

fn record_params(body: Option<trail::BodyRecord>) -> Value {
    match body {
        Some(trail::BodyRecord::Json(v)) => v,
        Some(trail::BodyRecord::Digest(m)) => Value::Object(m),
        None => Value::Null,
    }
}

/// A request's form members, in order.
pub struct Params(Vec<(String, String)>);

impl Params {
    /// Parses a form body within the limits.
    fn parse(body: &[u8]) -> Result<Params, crate::errors::Error> {
        let mut out = Vec::new();
        for (k, v) in form_urlencoded::parse(body) {
            if out.len() == PARAMS_MAX {
                return Err(crate::errors::Error::new(
                    Code::InvalidRequest,
                    format!("a request carries at most {PARAMS_MAX} parameters"),
                ));
            }
            if k.len() > PARAM_LEN_MAX || v.len() > PARAM_LEN_MAX {
                return Err(crate::errors::Error::new(
                    Code::InvalidRequest,
                    format!("parameter {k:.64} is longer than {PARAM_LEN_MAX} bytes"),
                ));
            }
            out.push((k.into_owned(), v.into_owned()));
        }
        Ok(Params(out))
    }

    /// The value of a member.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The values of a list member `NAME.1`, `NAME.2`, ... in order of their index.
    pub fn list(&self, name: &str) -> Vec<&str> {
        let mut items: Vec<(u32, &str)> = self
            .0
            .iter()
            .filter_map(|(k, v)| {
                let n = k.strip_prefix(name)?.strip_prefix('.')?.parse().ok()?;
                Some((n, v.as_str()))
            })
            .collect();
        items.sort_by_key(|(n, _)| *n);
        items.into_iter().map(|(_, v)| v).collect()
    }

    /// The members of a list of structures `NAME.N.FIELD`: index and field to value.
    pub fn structs(&self, name: &str) -> Vec<(u32, Vec<(&str, &str)>)> {
        let mut by_index: std::collections::BTreeMap<u32, Vec<(&str, &str)>> =
            std::collections::BTreeMap::new();
        for (k, v) in &self.0 {
            let Some(rest) = k.strip_prefix(name).and_then(|r| r.strip_prefix('.')) else {
                continue;
            };
            let Some((n, field)) = rest.split_once('.') else {
                continue;
            };
            if let Ok(n) = n.parse::<u32>() {
                by_index.entry(n).or_default().push((field, v.as_str()));
            }
        }
        by_index.into_iter().collect()
    }

    /// The members as a JSON object for the audit record.
    fn to_json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        )
    }
}

/// The error for a body that could not be read: not within the body read timeout, over the
/// limit (named, as the SSM door names it), or cut off.
fn body_rejection(r: &BytesRejection) -> crate::errors::Error {
    if let Some(limit) = crate::net::conn::body_timed_out(r) {
        return crate::errors::Error::new(
            Code::RequestTimeout,
            crate::net::conn::BodyTimedOut(limit).to_string(),
        );
    }
    if r.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        return crate::errors::Error::new(
            Code::InvalidRequest,
            format!(
                "the request body is larger than {} bytes, the most the EC2 and STS APIs read",
                crate::ssm::BODY_MAX
            ),
        );
    }
    crate::errors::Error::new(
        Code::InvalidRequest,
        format!("cannot read the request body: {}", r.body_text()),
    )
}

/// Which of the two services a request is for: its credential's scope, else (unsigned) its action.
fn service_of(headers: &HeaderMap, params: Option<&Params>) -> &'static str {
    match crate::access::authn::sigv4_service(headers).as_deref() {
        Some("sts") => "sts",
        Some(_) => "ec2",
        None if params.and_then(|p| p.get("Action")) == Some("GetCallerIdentity") => "sts",
        None => "ec2",
    }
}

/// `POST /` with a form body: one EC2 or STS action, through the request gate and audited as
/// `ec2.<Action>` / `sts.<Action>`.
pub async fn handle(
    State(state): State<Arc<AppState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let params = body.as_ref().ok().map(|b| Params::parse(b));
    let parsed = params.as_ref().and_then(|p| p.as_ref().ok());
    if service_of(&headers, parsed) == "sts" {
        serve::<Sts>(&state, addr, &method, &uri, &headers, body, params, "sts").await
    } else {
        serve::<Ec2>(&state, addr, &method, &uri, &headers, body, params, "ec2").await
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve<D: FrontDoor>(
    state: &Arc<AppState>,
    addr: SocketAddr,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    params: Option<Result<Params, crate::errors::Error>>,
    service: &'static str,
) -> Response {
    let action: String = parsed_action(params.as_ref()).chars().take(64).collect();
    let mut entry = AuditEntry {
        at: now_ms(),
        principal: ANONYMOUS.into(),
        source: addr.to_string(),
        action: format!("{service}.{action}"),
        ..AuditEntry::default()
    };
    let subject = format!("action {action}");
    let write = ["CreateTags", "DeleteTags"].contains(&action.as_str());
    let mut outcome = gate::Outcome {
        principal: None,
        request: None,
        write,
        subject: &subject,
    };
    let credential = crate::access::authn::sigv4_credential(headers);
    let caller = gate::Caller {
        ip: Some(addr.ip()),
        credential: credential.as_deref(),
    };
    let principal;
    let recorded;
    let resp = match (body, params) {
        (Err(r), _) => render::<D>(body_rejection(&r)),
        (Ok(_), Some(Err(e))) => render::<D>(e),
        (Ok(body), params) => {
            let admitted = gate::admit::<D>(
                &state.auth_guard,
                &state.rate_limiter,
                &caller,
                &mut entry,
                crate::access::authn::sigv4(
                    &state.store,
                    &state.secret_box,
                    method,
                    uri,
                    headers,
                    &body,
                    service,
                ),
            )
            .await;
            match (admitted, params) {
                (Err(e), _) => render::<D>(e),
                (Ok(p), params) => {
                    principal = p;
                    let params = params.and_then(Result::ok).unwrap_or(Params(Vec::new()));
                    for id in params
                        .list("InstanceId")
                        .into_iter()
                        .chain(params.list("ResourceId"))
                    {
                        entry.node_ids.push(id.chars().take(64).collect());
                    }
                    let r = if service == "sts" {
                        sts::dispatch(state, &principal, &action, &params).await
                    } else {
                        ec2::dispatch(state, &principal, &action, &params).await
                    };
                    recorded =
                        serde_json::to_vec(&trail::redact(params.to_json())).unwrap_or_default();
                    outcome.principal = Some(&principal);
                    outcome.request = Some(gate::Recorded {
                        query: None,
                        body: &recorded,
                    });
                    match r {
                        Ok(xml) => (
                            StatusCode::OK,
                            [(header::CONTENT_TYPE, xml::CONTENT_TYPE)],
                            xml,
                        )
                            .into_response(),
                        Err(e) => render::<D>(e),
                    }
                }
            }
        }
    };
    gate::conclude::<D>(&state.store, entry, outcome, resp).await
}

fn parsed_action(params: Option<&Result<Params, crate::errors::Error>>) -> String {
    params
        .and_then(|p| p.as_ref().ok())
        .and_then(|p| p.get("Action"))
        .unwrap_or("")
        .to_owned()
}

/// What an action answers: its XML document, or an error.
pub type QueryResult = Result<String, crate::errors::Error>;

/// Converts a door-specific error from shared code (it carries the same [`crate::errors::Error`]).
pub fn plain<D>(e: Answered<D>) -> crate::errors::Error {
    e.error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_are_read_within_limits_and_lists_in_index_order() {
        let p = Params::parse(b"Action=DescribeInstances&InstanceId.2=b&InstanceId.1=a&Filter.1.Name=tag%3ARole&Filter.1.Value.1=web&InstanceIdX.3=no").unwrap();
        assert_eq!(p.get("Action"), Some("DescribeInstances"));
        assert_eq!(p.list("InstanceId"), ["a", "b"]);
        let filters = p.structs("Filter");
        assert_eq!(
            filters,
            [(1, vec![("Name", "tag:Role"), ("Value.1", "web")])]
        );
        let many: String = (0..=PARAMS_MAX).map(|i| format!("k{i}=v&")).collect();
        let e = Params::parse(many.as_bytes()).err().map(|e| e.message);
        assert!(e.is_some_and(|m| m.contains("at most")));
        let long = format!("k={}", "x".repeat(PARAM_LEN_MAX + 1));
        assert!(Params::parse(long.as_bytes()).is_err());
    }
}
