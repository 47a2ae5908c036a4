//! The error kinds both front doors answer, and the one trait they answer them through.
//!
//! A refusal or fault is an [`Error`]: a [`Code`] (the kind), a one-line message, and what the
//! answer carries beyond its body (a `Retry-After`, the nodes an authorization refusal named). A
//! front door ([`FrontDoor`]: the native API, the SSM API) renders it: status, code, wording, body
//! shape and headers. Errors made below the doors (`run/send.rs`, `run/document`, authentication)
//! carry a `Code`, so which code and status a client sees is decided in one table here, and a
//! mistyped code does not compile.

use crate::access::audit::{BodyRecord, DeniedNodes, ErrorCode};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::marker::PhantomData;
use std::time::Duration;

/// Every kind of error either API answers. Each names its HTTP status on the native API, its
/// native code and its SSM `__type` code; several kinds share a code on one API where that API
/// does not tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// A body, query or path that does not parse.
    InvalidRequest,
    /// A request the framework refused before any handler, with no more precise kind.
    RequestRejected,
    /// A body over the route's limit.
    PayloadTooLarge,
    /// A body that is not JSON.
    UnsupportedMediaType,
    /// A body that did not arrive within the body read timeout.
    RequestTimeout,
    /// No such route.
    RouteNotFound,
    /// A route without that method.
    MethodNotAllowed,
    /// An `X-Amz-Target` naming no operation fleetrun serves.
    UnknownOperation,
    /// A member outside its constraints (SSM's model, or a document's name).
    Validation,
    /// A bad parameter of a send or a listing.
    InvalidParameters,
    /// A pagination token no listing handed out.
    InvalidNextToken,
    /// A listing filter that is malformed.
    InvalidFilter,
    /// A listing filter key that is not known.
    InvalidFilterKey,
    /// A listing filter value that is not valid.
    InvalidFilterValue,
    /// A DescribeInstanceInformation filter value that is not valid.
    InvalidInstanceInformationFilterValue,
    /// A plugin (step) name a command does not have.
    InvalidPluginName,
    /// A missing, malformed or unknown API token (SSM never answers 401; its fallback for one is a validation error).
    Unauthorized,
    /// A SigV4 request without an `Authorization` header.
    MissingAuthenticationToken,
    /// A SigV4 `Authorization` header that is malformed or lacks a part.
    IncompleteSignature,
    /// A SigV4 signature that does not verify (or is out of its time window).
    InvalidSignature,
    /// A SigV4 access key that is not known.
    UnrecognizedClient,
    /// The principal may not do this (authorization, or a route without a rule).
    AccessDenied,
    /// A principal over its request rate (`--rate-limit`).
    TooManyRequests,
    /// A source or credential that failed authentication too often (the brute-force guard).
    TooManyFailedAuthentications,
    /// A tag key or value outside fleetrun's limits.
    InvalidTag,
    /// No such activation.
    ActivationNotFound,
    /// More tags than a resource may carry.
    TooManyTags,
    /// A tagged resource's id that is malformed or names nothing (SSM's tagging calls).
    InvalidResourceId,
    /// A resource type fleetrun does not tag (SSM's tagging calls).
    InvalidResourceType,
    /// A node id that is malformed, unknown or not part of the command.
    InvalidNodeId,
    /// A node id given twice.
    DuplicateNodeId,
    /// No such node.
    NodeNotFound,
    /// A target expression that does not parse or is over its limits.
    InvalidTarget,
    /// A send without targets.
    MissingTarget,
    /// A command id that is malformed (or unknown, on the SSM API).
    InvalidCommandId,
    /// No such command.
    CommandNotFound,
    /// A command with no invocation on that node.
    InvocationNotFound,
    /// No such session.
    SessionNotFound,
    /// A session that is no longer running.
    SessionEnded,
    /// A node a session cannot start on now (not connected, or its agent has no shells).
    TargetNotConnected,
    /// An object key is not valid.
    InvalidObjectKey,
    /// No such object.
    ObjectNotFound,
    /// Another upload to the same key is in progress.
    ObjectBusy,
    /// A saved script whose name, platform, input, output or body is not valid.
    InvalidScript,
    /// No such saved script (or version).
    ScriptNotFound,
    /// A saved script of that name exists.
    ScriptAlreadyExists,
    /// The server keeps as many scripts, or a script as many versions, as it may.
    ScriptLimitExceeded,
    /// A saved script's input could not be fetched (its URL answered an error, too much, too slowly or
    /// is not allowed).
    ScriptInputUnavailable,
    /// A session without a (stored) recording.
    RecordingNotFound,
    /// A session whose recording is still being written (it runs).
    RecordingNotReady,
    /// An idempotency key that is malformed or given twice.
    InvalidIdempotencyKey,
    /// An idempotency key used before for another request.
    IdempotencyKeyMismatch,
    /// A user name outside its pattern.
    InvalidUserName,
    /// A Cedar policy that does not parse or validate.
    InvalidPolicy,
    /// No such user.
    UserNotFound,
    /// A user of that name exists.
    UserExists,
    /// The change would leave no admin.
    LastAdmin,
    /// No such API token.
    TokenNotFound,
    /// A parameter store name outside its pattern.
    InvalidParameterName,
    /// A parameter store value that is empty or malformed.
    InvalidParameterValue,
    /// A parameter store value over its limit.
    ParameterValueTooLarge,
    /// The parameter store is full.
    ParameterLimitExceeded,
    /// No such parameter.
    ParameterNotFound,
    /// A parameter of that name exists (a put without overwrite).
    ParameterAlreadyExists,
    /// A parameter version (selector) that does not exist.
    ParameterVersionNotFound,
    /// A parameter value that does not match the parameter's allowed pattern.
    ParameterPatternMismatch,
    /// An allowed pattern that is not a valid regular expression (or too large).
    InvalidAllowedPattern,
    /// A KMS key id other than the one fleetrun seals with (`alias/aws/ssm`).
    InvalidKeyId,
    /// A parameter name with more than 15 levels of hierarchy.
    HierarchyLevelLimitExceeded,
    /// A listing filter option that is not valid for its key.
    InvalidFilterOption,
    /// No such document (a route's own resource).
    DocumentNotFound,
    /// A document a request names that does not exist or cannot be used (a send's).
    InvalidDocument,
    /// A document version that is malformed or does not exist.
    InvalidDocumentVersion,
    /// Document content that does not parse or validate.
    InvalidDocumentContent,
    /// A document schema version fleetrun does not run.
    InvalidDocumentSchemaVersion,
    /// A change to a built-in document.
    InvalidDocumentOperation,
    /// A document, or what a send renders of one, over its size limit.
    MaxDocumentSizeExceeded,
    /// A document of that name exists.
    DocumentAlreadyExists,
    /// The server keeps as many documents as it may.
    DocumentLimitExceeded,
    /// A document has as many versions as it may.
    DocumentVersionLimitExceeded,
    /// A new version with the content of an existing one.
    DuplicateDocumentContent,
    /// A version name another version has.
    DuplicateDocumentVersionName,
    /// The server cannot take the request now.
    Unavailable,
    /// A fault of the server itself (the detail goes to the log, not the client).
    Internal,
}

impl Code {
    /// Every kind, for tables and tests.
    pub const ALL: [Code; 84] = [
        Code::InvalidRequest,
        Code::RequestRejected,
        Code::PayloadTooLarge,
        Code::UnsupportedMediaType,
        Code::RequestTimeout,
        Code::RouteNotFound,
        Code::MethodNotAllowed,
        Code::UnknownOperation,
        Code::Validation,
        Code::InvalidParameters,
        Code::InvalidNextToken,
        Code::InvalidFilter,
        Code::InvalidFilterKey,
        Code::InvalidFilterValue,
        Code::InvalidInstanceInformationFilterValue,
        Code::InvalidPluginName,
        Code::Unauthorized,
        Code::MissingAuthenticationToken,
        Code::IncompleteSignature,
        Code::InvalidSignature,
        Code::UnrecognizedClient,
        Code::AccessDenied,
        Code::TooManyRequests,
        Code::TooManyFailedAuthentications,
        Code::InvalidTag,
        Code::ActivationNotFound,
        Code::TooManyTags,
        Code::InvalidResourceId,
        Code::InvalidResourceType,
        Code::InvalidNodeId,
        Code::DuplicateNodeId,
        Code::NodeNotFound,
        Code::InvalidTarget,
        Code::MissingTarget,
        Code::InvalidCommandId,
        Code::CommandNotFound,
        Code::InvocationNotFound,
        Code::SessionNotFound,
        Code::SessionEnded,
        Code::TargetNotConnected,
        Code::InvalidObjectKey,
        Code::ObjectNotFound,
        Code::ObjectBusy,
        Code::InvalidScript,
        Code::ScriptNotFound,
        Code::ScriptAlreadyExists,
        Code::ScriptLimitExceeded,
        Code::ScriptInputUnavailable,
        Code::RecordingNotFound,
        Code::RecordingNotReady,
        Code::InvalidIdempotencyKey,
        Code::IdempotencyKeyMismatch,
        Code::InvalidUserName,
        Code::InvalidPolicy,
        Code::UserNotFound,
        Code::UserExists,
        Code::LastAdmin,
        Code::TokenNotFound,
        Code::InvalidParameterName,
        Code::InvalidParameterValue,
        Code::ParameterValueTooLarge,
        Code::ParameterLimitExceeded,
        Code::ParameterNotFound,
        Code::ParameterAlreadyExists,
        Code::ParameterVersionNotFound,
        Code::ParameterPatternMismatch,
        Code::InvalidAllowedPattern,
        Code::InvalidKeyId,
        Code::HierarchyLevelLimitExceeded,
        Code::InvalidFilterOption,
        Code::DocumentNotFound,
        Code::InvalidDocument,
        Code::InvalidDocumentVersion,
        Code::InvalidDocumentContent,
        Code::InvalidDocumentSchemaVersion,
        Code::InvalidDocumentOperation,
        Code::MaxDocumentSizeExceeded,
        Code::DocumentAlreadyExists,
        Code::DocumentLimitExceeded,
        Code::DocumentVersionLimitExceeded,
        Code::DuplicateDocumentContent,
        Code::DuplicateDocumentVersionName,
        Code::Unavailable,
        Code::Internal,
    ];

    /// The HTTP status on the native API.
    pub fn status(self) -> StatusCode {
        match self {
            Code::InvalidRequest => StatusCode::BAD_REQUEST,
            Code::RequestRejected => StatusCode::BAD_REQUEST,
            Code::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Code::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Code::RouteNotFound => StatusCode::NOT_FOUND,
            Code::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Code::UnknownOperation => StatusCode::BAD_REQUEST,
            Code::Validation => StatusCode::BAD_REQUEST,
            Code::InvalidParameters => StatusCode::BAD_REQUEST,
            Code::InvalidNextToken => StatusCode::BAD_REQUEST,
            Code::InvalidFilter => StatusCode::BAD_REQUEST,
            Code::InvalidFilterKey => StatusCode::BAD_REQUEST,
            Code::InvalidFilterValue => StatusCode::BAD_REQUEST,
            Code::InvalidInstanceInformationFilterValue => StatusCode::BAD_REQUEST,
            Code::InvalidPluginName => StatusCode::BAD_REQUEST,
            Code::Unauthorized => StatusCode::UNAUTHORIZED,
            Code::MissingAuthenticationToken => StatusCode::UNAUTHORIZED,
            Code::IncompleteSignature => StatusCode::UNAUTHORIZED,
            Code::InvalidSignature => StatusCode::UNAUTHORIZED,
            Code::UnrecognizedClient => StatusCode::UNAUTHORIZED,
            Code::AccessDenied => StatusCode::FORBIDDEN,
            Code::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Code::TooManyFailedAuthentications => StatusCode::TOO_MANY_REQUESTS,
            Code::InvalidTag => StatusCode::BAD_REQUEST,
            Code::ActivationNotFound => StatusCode::NOT_FOUND,
            Code::TooManyTags => StatusCode::BAD_REQUEST,
            Code::InvalidResourceId => StatusCode::BAD_REQUEST,
            Code::InvalidResourceType => StatusCode::BAD_REQUEST,
            Code::InvalidNodeId => StatusCode::BAD_REQUEST,
            Code::DuplicateNodeId => StatusCode::BAD_REQUEST,
            Code::NodeNotFound => StatusCode::NOT_FOUND,
            Code::InvalidTarget => StatusCode::BAD_REQUEST,
            Code::MissingTarget => StatusCode::BAD_REQUEST,
            Code::InvalidCommandId => StatusCode::BAD_REQUEST,
            Code::CommandNotFound => StatusCode::NOT_FOUND,
            Code::InvocationNotFound => StatusCode::NOT_FOUND,
            Code::SessionNotFound => StatusCode::NOT_FOUND,
            Code::SessionEnded => StatusCode::CONFLICT,
            Code::TargetNotConnected => StatusCode::CONFLICT,
            Code::InvalidObjectKey => StatusCode::BAD_REQUEST,
            Code::ObjectNotFound => StatusCode::NOT_FOUND,
            Code::ObjectBusy => StatusCode::CONFLICT,
            Code::InvalidScript => StatusCode::BAD_REQUEST,
            Code::ScriptNotFound => StatusCode::NOT_FOUND,
            Code::ScriptAlreadyExists => StatusCode::CONFLICT,
            Code::ScriptLimitExceeded => StatusCode::BAD_REQUEST,
            Code::ScriptInputUnavailable => StatusCode::BAD_GATEWAY,
            Code::RecordingNotFound => StatusCode::NOT_FOUND,
            Code::RecordingNotReady => StatusCode::CONFLICT,
            Code::InvalidIdempotencyKey => StatusCode::BAD_REQUEST,
            Code::IdempotencyKeyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Code::InvalidUserName => StatusCode::BAD_REQUEST,
            Code::InvalidPolicy => StatusCode::BAD_REQUEST,
            Code::UserNotFound => StatusCode::NOT_FOUND,
            Code::UserExists => StatusCode::CONFLICT,
            Code::LastAdmin => StatusCode::CONFLICT,
            Code::TokenNotFound => StatusCode::NOT_FOUND,
            Code::InvalidParameterName => StatusCode::BAD_REQUEST,
            Code::InvalidParameterValue => StatusCode::BAD_REQUEST,
            Code::ParameterValueTooLarge => StatusCode::BAD_REQUEST,
            Code::ParameterLimitExceeded => StatusCode::BAD_REQUEST,
            Code::ParameterNotFound => StatusCode::NOT_FOUND,
            Code::ParameterAlreadyExists => StatusCode::CONFLICT,
            Code::ParameterVersionNotFound => StatusCode::NOT_FOUND,
            Code::ParameterPatternMismatch => StatusCode::BAD_REQUEST,
            Code::InvalidAllowedPattern => StatusCode::BAD_REQUEST,
            Code::InvalidKeyId => StatusCode::BAD_REQUEST,
            Code::HierarchyLevelLimitExceeded => StatusCode::BAD_REQUEST,
            Code::InvalidFilterOption => StatusCode::BAD_REQUEST,
            Code::DocumentNotFound => StatusCode::NOT_FOUND,
            Code::InvalidDocument => StatusCode::BAD_REQUEST,
            Code::InvalidDocumentVersion => StatusCode::BAD_REQUEST,
            Code::InvalidDocumentContent => StatusCode::BAD_REQUEST,
            Code::InvalidDocumentSchemaVersion => StatusCode::BAD_REQUEST,
            Code::InvalidDocumentOperation => StatusCode::BAD_REQUEST,
            Code::MaxDocumentSizeExceeded => StatusCode::BAD_REQUEST,
            Code::DocumentAlreadyExists => StatusCode::CONFLICT,
            Code::DocumentLimitExceeded => StatusCode::BAD_REQUEST,
            Code::DocumentVersionLimitExceeded => StatusCode::BAD_REQUEST,
            Code::DuplicateDocumentContent => StatusCode::BAD_REQUEST,
            Code::DuplicateDocumentVersionName => StatusCode::BAD_REQUEST,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The native API's `error.code`.
    pub fn native_code(self) -> &'static str {
        match self {
            Code::InvalidRequest => "InvalidRequest",
            Code::RequestRejected => "InvalidRequest",
            Code::PayloadTooLarge => "InvalidRequest",
            Code::UnsupportedMediaType => "InvalidRequest",
            Code::RequestTimeout => "RequestTimeout",
            Code::RouteNotFound => "NotFound",
            Code::MethodNotAllowed => "MethodNotAllowed",
            Code::UnknownOperation => "UnknownOperation",
            Code::Validation => "ValidationException",
            Code::InvalidParameters => "InvalidParameters",
            Code::InvalidNextToken => "InvalidNextToken",
            Code::InvalidFilter => "InvalidFilter",
            Code::InvalidFilterKey => "InvalidFilterKey",
            Code::InvalidFilterValue => "InvalidFilterValue",
            Code::InvalidInstanceInformationFilterValue => "InvalidInstanceInformationFilterValue",
            Code::InvalidPluginName => "InvalidPluginName",
            Code::Unauthorized => "Unauthorized",
            Code::MissingAuthenticationToken => "Unauthorized",
            Code::IncompleteSignature => "Unauthorized",
            Code::InvalidSignature => "Unauthorized",
            Code::UnrecognizedClient => "Unauthorized",
            Code::AccessDenied => "AccessDenied",
            Code::TooManyRequests => "TooManyRequests",
            Code::TooManyFailedAuthentications => "TooManyFailedAuthentications",
            Code::InvalidTag => "InvalidTag",
            Code::ActivationNotFound => "ActivationNotFound",
            Code::TooManyTags => "TooManyTags",
            Code::InvalidResourceId => "InvalidResourceId",
            Code::InvalidResourceType => "InvalidResourceType",
            Code::InvalidNodeId => "InvalidNodeId",
            Code::DuplicateNodeId => "DuplicateNodeId",
            Code::NodeNotFound => "NodeNotFound",
            Code::InvalidTarget => "InvalidTarget",
            Code::MissingTarget => "MissingTarget",
            Code::InvalidCommandId => "InvalidCommandId",
            Code::CommandNotFound => "CommandNotFound",
            Code::InvocationNotFound => "InvocationNotFound",
            Code::SessionNotFound => "SessionNotFound",
            Code::SessionEnded => "SessionEnded",
            Code::TargetNotConnected => "TargetNotConnected",
            Code::InvalidObjectKey => "InvalidObjectKey",
            Code::ObjectNotFound => "ObjectNotFound",
            Code::ObjectBusy => "ObjectBusy",
            Code::InvalidScript => "InvalidScript",
            Code::ScriptNotFound => "ScriptNotFound",
            Code::ScriptAlreadyExists => "ScriptAlreadyExists",
            Code::ScriptLimitExceeded => "ScriptLimitExceeded",
            Code::ScriptInputUnavailable => "ScriptInputUnavailable",
            Code::RecordingNotFound => "RecordingNotFound",
            Code::RecordingNotReady => "RecordingNotReady",
            Code::InvalidIdempotencyKey => "InvalidIdempotencyKey",
            Code::IdempotencyKeyMismatch => "IdempotencyKeyMismatch",
            Code::InvalidUserName => "InvalidUserName",
            Code::InvalidPolicy => "InvalidPolicy",
            Code::UserNotFound => "UserNotFound",
            Code::UserExists => "UserExists",
            Code::LastAdmin => "LastAdmin",
            Code::TokenNotFound => "TokenNotFound",
            Code::InvalidParameterName => "InvalidParameterName",
            Code::InvalidParameterValue => "InvalidParameterValue",
            Code::ParameterValueTooLarge => "ParameterValueTooLarge",
            Code::ParameterLimitExceeded => "ParameterLimitExceeded",
            Code::ParameterNotFound => "ParameterNotFound",
            Code::ParameterAlreadyExists => "ParameterAlreadyExists",
            Code::ParameterVersionNotFound => "ParameterVersionNotFound",
            Code::ParameterPatternMismatch => "ParameterPatternMismatch",
            Code::InvalidAllowedPattern => "InvalidAllowedPattern",
            Code::InvalidKeyId => "InvalidKeyId",
            Code::HierarchyLevelLimitExceeded => "HierarchyLevelLimitExceeded",
            Code::InvalidFilterOption => "InvalidFilterOption",
            Code::DocumentNotFound => "InvalidDocument",
            Code::InvalidDocument => "InvalidDocument",
            Code::InvalidDocumentVersion => "InvalidDocumentVersion",
            Code::InvalidDocumentContent => "InvalidDocumentContent",
            Code::InvalidDocumentSchemaVersion => "InvalidDocumentSchemaVersion",
            Code::InvalidDocumentOperation => "InvalidDocumentOperation",
            Code::MaxDocumentSizeExceeded => "MaxDocumentSizeExceeded",
            Code::DocumentAlreadyExists => "DocumentAlreadyExists",
            Code::DocumentLimitExceeded => "DocumentLimitExceeded",
            Code::DocumentVersionLimitExceeded => "DocumentVersionLimitExceeded",
            Code::DuplicateDocumentContent => "DuplicateDocumentContent",
            Code::DuplicateDocumentVersionName => "DuplicateDocumentVersionName",
            Code::Unavailable => "Unavailable",
            Code::Internal => "InternalError",
        }
    }

    /// The SSM API's `__type` (AWS error code).
    pub fn aws_code(self) -> &'static str {
        match self {
            Code::InvalidRequest => "SerializationException",
            Code::RequestRejected => "ValidationException",
            Code::PayloadTooLarge => "ValidationException",
            Code::UnsupportedMediaType => "ValidationException",
            Code::RequestTimeout => "RequestTimeout",
            Code::RouteNotFound => "ValidationException",
            Code::MethodNotAllowed => "UnknownOperationException",
            Code::UnknownOperation => "UnknownOperationException",
            Code::Validation => "ValidationException",
            Code::InvalidParameters => "InvalidParameters",
            Code::InvalidNextToken => "InvalidNextToken",
            Code::InvalidFilter => "InvalidFilter",
            Code::InvalidFilterKey => "InvalidFilterKey",
            Code::InvalidFilterValue => "InvalidFilterValue",
            Code::InvalidInstanceInformationFilterValue => "InvalidInstanceInformationFilterValue",
            Code::InvalidPluginName => "InvalidPluginName",
            Code::Unauthorized => "ValidationException",
            Code::MissingAuthenticationToken => "MissingAuthenticationTokenException",
            Code::IncompleteSignature => "IncompleteSignatureException",
            Code::InvalidSignature => "InvalidSignatureException",
            Code::UnrecognizedClient => "UnrecognizedClientException",
            Code::AccessDenied => "AccessDeniedException",
            Code::TooManyRequests => "ThrottlingException",
            Code::TooManyFailedAuthentications => "ThrottlingException",
            Code::InvalidTag => "ValidationException",
            Code::ActivationNotFound => "InvalidActivationId",
            Code::TooManyTags => "TooManyTagsError",
            Code::InvalidResourceId => "InvalidResourceId",
            Code::InvalidResourceType => "InvalidResourceType",
            Code::InvalidNodeId => "InvalidInstanceId",
            Code::DuplicateNodeId => "DuplicateInstanceId",
            Code::NodeNotFound => "InvalidInstanceId",
            Code::InvalidTarget => "InvalidParameters",
            Code::MissingTarget => "ValidationException",
            Code::InvalidCommandId => "InvalidCommandId",
            Code::CommandNotFound => "InvalidCommandId",
            Code::InvocationNotFound => "InvocationDoesNotExist",
            Code::SessionNotFound => "DoesNotExistException",
            Code::SessionEnded => "ValidationException",
            Code::TargetNotConnected => "TargetNotConnected",
            Code::InvalidObjectKey => "ValidationException",
            Code::ObjectNotFound => "DoesNotExistException",
            Code::ObjectBusy => "ValidationException",
            Code::InvalidScript => "ValidationException",
            Code::ScriptNotFound => "DoesNotExistException",
            Code::ScriptAlreadyExists => "ValidationException",
            Code::ScriptLimitExceeded => "ValidationException",
            Code::ScriptInputUnavailable => "InvalidParameters",
            Code::RecordingNotFound => "DoesNotExistException",
            Code::RecordingNotReady => "ValidationException",
            Code::InvalidIdempotencyKey => "ValidationException",
            Code::IdempotencyKeyMismatch => "IdempotentParameterMismatch",
            Code::InvalidUserName => "ValidationException",
            Code::InvalidPolicy => "ValidationException",
            Code::UserNotFound => "ValidationException",
            Code::UserExists => "ValidationException",
            Code::LastAdmin => "ValidationException",
            Code::TokenNotFound => "ValidationException",
            Code::InvalidParameterName => "ValidationException",
            Code::InvalidParameterValue => "ValidationException",
            Code::ParameterValueTooLarge => "ValidationException",
            Code::ParameterLimitExceeded => "ParameterLimitExceeded",
            Code::ParameterNotFound => "ParameterNotFound",
            Code::ParameterAlreadyExists => "ParameterAlreadyExists",
            Code::ParameterVersionNotFound => "ParameterVersionNotFound",
            Code::ParameterPatternMismatch => "ParameterPatternMismatchException",
            Code::InvalidAllowedPattern => "InvalidAllowedPatternException",
            Code::InvalidKeyId => "InvalidKeyId",
            Code::HierarchyLevelLimitExceeded => "HierarchyLevelLimitExceededException",
            Code::InvalidFilterOption => "InvalidFilterOption",
            Code::DocumentNotFound => "InvalidDocument",
            Code::InvalidDocument => "InvalidDocument",
            Code::InvalidDocumentVersion => "InvalidDocumentVersion",
            Code::InvalidDocumentContent => "InvalidDocumentContent",
            Code::InvalidDocumentSchemaVersion => "InvalidDocumentSchemaVersion",
            Code::InvalidDocumentOperation => "InvalidDocumentOperation",
            Code::MaxDocumentSizeExceeded => "MaxDocumentSizeExceeded",
            Code::DocumentAlreadyExists => "DocumentAlreadyExists",
            Code::DocumentLimitExceeded => "DocumentLimitExceeded",
            Code::DocumentVersionLimitExceeded => "DocumentVersionLimitExceeded",
            Code::DuplicateDocumentContent => "DuplicateDocumentContent",
            Code::DuplicateDocumentVersionName => "DuplicateDocumentVersionName",
            Code::Unavailable => "InternalServerError",
            Code::Internal => "InternalServerError",
        }
    }
}

impl Code {
    /// The kind a framework answer (not JSON, made before any handler) of `status` is shown as
    /// (see `api/errors.rs`).
    pub fn from_status(status: StatusCode) -> Code {
        match status {
            StatusCode::BAD_REQUEST => Code::InvalidRequest,
            StatusCode::UNAUTHORIZED => Code::Unauthorized,
            StatusCode::FORBIDDEN => Code::AccessDenied,
            StatusCode::NOT_FOUND => Code::RouteNotFound,
            StatusCode::METHOD_NOT_ALLOWED => Code::MethodNotAllowed,
            StatusCode::PAYLOAD_TOO_LARGE => Code::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Code::UnsupportedMediaType,
            StatusCode::TOO_MANY_REQUESTS => Code::TooManyRequests,
            StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
            s if s.is_server_error() => Code::Internal,
            _ => Code::RequestRejected,
        }
    }

    /// The HTTP status on the SSM API: AWS JSON 1.1 answers every client error 400 (the `__type`
    /// says which) and server faults 500.
    pub fn aws_status(self) -> StatusCode {
        if self.status().is_server_error() {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::BAD_REQUEST
        }
    }
}

/// A refusal or fault, as either front door answers it.
#[derive(Debug, Clone)]
pub struct Error {
    /// The kind.
    pub code: Code,
    /// One line naming the problem (for `Internal`, a door's fixed wording replaces it).
    pub message: String,
    /// Sent as `Retry-After` (whole seconds, at least 1).
    pub retry_after: Option<Duration>,
    /// Nodes an authorization refusal named (for the audit record).
    pub denied_nodes: Vec<String>,
}

impl Error {
    /// An error of a kind.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
            retry_after: None,
            denied_nodes: Vec::new(),
        }
    }

    /// A fault of the server itself: the detail goes to the log, not the client.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {e}");
        Error::new(Code::Internal, "internal server error")
    }

    /// The same error, answered with `Retry-After`.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
}

impl From<crate::access::authz::Denied> for Error {
    fn from(d: crate::access::authz::Denied) -> Self {
        let mut e = Error::new(Code::AccessDenied, d.message);
        e.denied_nodes = d.nodes.iter().map(ToString::to_string).collect();
        e
    }
}

impl From<crate::access::authz::CheckError> for Error {
    fn from(e: crate::access::authz::CheckError) -> Self {
        match e {
            crate::access::authz::CheckError::Denied(d) => d.into(),
            crate::access::authz::CheckError::Store(e) => e.into(),
        }
    }
}

impl From<fleetrun_store::StoreError> for Error {
    fn from(e: fleetrun_store::StoreError) -> Self {
        if e.is_unavailable() {
            tracing::warn!("database unavailable: {e}");
            return Error::unavailable_database();
        }
        Error::internal(e)
    }
}

/// How long a client is told to wait when the database cannot be reached.
const DATABASE_RETRY: Duration = Duration::from_secs(2);

impl Error {
    /// The database cannot be reached: 503, try again shortly (agents keep running and spooling).
    pub fn unavailable_database() -> Self {
        Error::new(
            Code::Unavailable,
            "the server cannot reach its database; try again shortly",
        )
        .retry_after(DATABASE_RETRY)
    }
}

impl From<crate::access::authn::AuthnError> for Error {
    fn from(e: crate::access::authn::AuthnError) -> Self {
        match e {
            crate::access::authn::AuthnError::Refused { code, message } => {
                Error::new(code, message)
            }
            crate::access::authn::AuthnError::Internal(e) => Error::internal(e),
            crate::access::authn::AuthnError::Unavailable => Error::unavailable_database(),
        }
    }
}

/// Whole seconds of a `Retry-After`, at least 1.
pub fn retry_secs(after: Duration) -> u64 {
    after.as_secs().max(1)
}

/// A front door: how one API shows an [`Error`], and what its audit records keep of a request.
pub trait FrontDoor {
    /// The HTTP status of a kind.
    fn status(code: Code) -> StatusCode;
    /// The code a kind is named by.
    fn code(code: Code) -> &'static str;
    /// The message as this API words it (the default: as given).
    fn message(code: Code, message: String) -> String {
        let _ = code;
        message
    }
    /// The error body and its content type.
    fn body(code: &'static str, message: String) -> (&'static str, String);
    /// What a credential is called in this API's refusals.
    const CREDENTIAL: &'static str;
    /// Body members that name a document (for the audit record's resources).
    const DOCUMENT_MEMBERS: &'static [&'static str];
    /// A record's `params`: the query (native only) and what is kept of the body.
    fn params(query: Option<String>, body: Option<BodyRecord>) -> Value;
}

/// Renders an error through a door: status, body, `Retry-After`, and for the audit record the
/// code and the denied nodes (response extensions).
pub fn render<D: FrontDoor>(e: Error) -> Response {
    let code = D::code(e.code);
    let (content_type, body) = D::body(code, D::message(e.code, e.message));
    let mut resp = (
        D::status(e.code),
        [(header::CONTENT_TYPE, content_type)],
        body,
    )
        .into_response();
    if let Some(after) = e.retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_secs(after)));
    }
    resp.extensions_mut().insert(ErrorCode(code));
    if !e.denied_nodes.is_empty() {
        resp.extensions_mut().insert(DeniedNodes(e.denied_nodes));
    }
    resp
}

/// An [`Error`] as one door answers it: `ApiError` and `SsmError` are this, for their door.
pub struct Answered<D> {
    /// The error.
    pub error: Error,
    door: PhantomData<fn() -> D>,
}

impl<D> std::fmt::Debug for Answered<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl<D> Answered<D> {
    /// An error of a kind.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Error::new(code, message).into()
    }
    /// A fault of the server itself; the detail goes to the log only.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Error::internal(e).into()
    }
    /// The kind.
    pub fn code(&self) -> Code {
        self.error.code
    }
}

impl<D> From<Error> for Answered<D> {
    fn from(error: Error) -> Self {
        Answered {
            error,
            door: PhantomData,
        }
    }
}

impl<D> From<crate::access::authz::Denied> for Answered<D> {
    fn from(d: crate::access::authz::Denied) -> Self {
        Error::from(d).into()
    }
}

impl<D> From<crate::access::authz::CheckError> for Answered<D> {
    fn from(e: crate::access::authz::CheckError) -> Self {
        Error::from(e).into()
    }
}

impl<D> From<fleetrun_store::StoreError> for Answered<D> {
    fn from(e: fleetrun_store::StoreError) -> Self {
        Error::from(e).into()
    }
}

impl<D: FrontDoor> IntoResponse for Answered<D> {
    fn into_response(self) -> Response {
        render::<D>(self.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: [(Code, u16, &str, &str); 84] = [
        (
            Code::InvalidRequest,
            400,
            "InvalidRequest",
            "SerializationException",
        ),
        (
            Code::RequestRejected,
            400,
            "InvalidRequest",
            "ValidationException",
        ),
        (
            Code::PayloadTooLarge,
            413,
            "InvalidRequest",
            "ValidationException",
        ),
        (
            Code::UnsupportedMediaType,
            415,
            "InvalidRequest",
            "ValidationException",
        ),
        (
            Code::RequestTimeout,
            408,
            "RequestTimeout",
            "RequestTimeout",
        ),
        (Code::RouteNotFound, 404, "NotFound", "ValidationException"),
        (
            Code::MethodNotAllowed,
            405,
            "MethodNotAllowed",
            "UnknownOperationException",
        ),
        (
            Code::UnknownOperation,
            400,
            "UnknownOperation",
            "UnknownOperationException",
        ),
        (
            Code::Validation,
            400,
            "ValidationException",
            "ValidationException",
        ),
        (
            Code::InvalidParameters,
            400,
            "InvalidParameters",
            "InvalidParameters",
        ),
        (
            Code::InvalidNextToken,
            400,
            "InvalidNextToken",
            "InvalidNextToken",
        ),
        (Code::InvalidFilter, 400, "InvalidFilter", "InvalidFilter"),
        (
            Code::InvalidFilterKey,
            400,
            "InvalidFilterKey",
            "InvalidFilterKey",
        ),
        (
            Code::InvalidFilterValue,
            400,
            "InvalidFilterValue",
            "InvalidFilterValue",
        ),
        (
            Code::InvalidInstanceInformationFilterValue,
            400,
            "InvalidInstanceInformationFilterValue",
            "InvalidInstanceInformationFilterValue",
        ),
        (
            Code::InvalidPluginName,
            400,
            "InvalidPluginName",
            "InvalidPluginName",
        ),
        (
            Code::Unauthorized,
            401,
            "Unauthorized",
            "ValidationException",
        ),
        (
            Code::MissingAuthenticationToken,
            401,
            "Unauthorized",
            "MissingAuthenticationTokenException",
        ),
        (
            Code::IncompleteSignature,
            401,
            "Unauthorized",
            "IncompleteSignatureException",
        ),
        (
            Code::InvalidSignature,
            401,
            "Unauthorized",
            "InvalidSignatureException",
        ),
        (
            Code::UnrecognizedClient,
            401,
            "Unauthorized",
            "UnrecognizedClientException",
        ),
        (
            Code::AccessDenied,
            403,
            "AccessDenied",
            "AccessDeniedException",
        ),
        (
            Code::TooManyRequests,
            429,
            "TooManyRequests",
            "ThrottlingException",
        ),
        (
            Code::TooManyFailedAuthentications,
            429,
            "TooManyFailedAuthentications",
            "ThrottlingException",
        ),
        (Code::InvalidTag, 400, "InvalidTag", "ValidationException"),
        (
            Code::ActivationNotFound,
            404,
            "ActivationNotFound",
            "InvalidActivationId",
        ),
        (Code::TooManyTags, 400, "TooManyTags", "TooManyTagsError"),
        (
            Code::InvalidResourceId,
            400,
            "InvalidResourceId",
            "InvalidResourceId",
        ),
        (
            Code::InvalidResourceType,
            400,
            "InvalidResourceType",
            "InvalidResourceType",
        ),
        (
            Code::InvalidNodeId,
            400,
            "InvalidNodeId",
            "InvalidInstanceId",
        ),
        (
            Code::DuplicateNodeId,
            400,
            "DuplicateNodeId",
            "DuplicateInstanceId",
        ),
        (Code::NodeNotFound, 404, "NodeNotFound", "InvalidInstanceId"),
        (
            Code::InvalidTarget,
            400,
            "InvalidTarget",
            "InvalidParameters",
        ),
        (
            Code::MissingTarget,
            400,
            "MissingTarget",
            "ValidationException",
        ),
        (
            Code::InvalidCommandId,
            400,
            "InvalidCommandId",
            "InvalidCommandId",
        ),
        (
            Code::CommandNotFound,
            404,
            "CommandNotFound",
            "InvalidCommandId",
        ),
        (
            Code::InvocationNotFound,
            404,
            "InvocationNotFound",
            "InvocationDoesNotExist",
        ),
        (
            Code::SessionNotFound,
            404,
            "SessionNotFound",
            "DoesNotExistException",
        ),
        (
            Code::SessionEnded,
            409,
            "SessionEnded",
            "ValidationException",
        ),
        (
            Code::TargetNotConnected,
            409,
            "TargetNotConnected",
            "TargetNotConnected",
        ),
        (
            Code::InvalidObjectKey,
            400,
            "InvalidObjectKey",
            "ValidationException",
        ),
        (
            Code::ObjectNotFound,
            404,
            "ObjectNotFound",
            "DoesNotExistException",
        ),
        (Code::ObjectBusy, 409, "ObjectBusy", "ValidationException"),
        (
            Code::InvalidScript,
            400,
            "InvalidScript",
            "ValidationException",
        ),
        (
            Code::ScriptNotFound,
            404,
            "ScriptNotFound",
            "DoesNotExistException",
        ),
        (
            Code::ScriptAlreadyExists,
            409,
            "ScriptAlreadyExists",
            "ValidationException",
        ),
        (
            Code::ScriptLimitExceeded,
            400,
            "ScriptLimitExceeded",
            "ValidationException",
        ),
        (
            Code::ScriptInputUnavailable,
            502,
            "ScriptInputUnavailable",
            "InvalidParameters",
        ),
        (
            Code::RecordingNotFound,
            404,
            "RecordingNotFound",
            "DoesNotExistException",
        ),
        (
            Code::RecordingNotReady,
            409,
            "RecordingNotReady",
            "ValidationException",
        ),
        (
            Code::InvalidIdempotencyKey,
            400,
            "InvalidIdempotencyKey",
            "ValidationException",
        ),
        (
            Code::IdempotencyKeyMismatch,
            422,
            "IdempotencyKeyMismatch",
            "IdempotentParameterMismatch",
        ),
        (
            Code::InvalidUserName,
            400,
            "InvalidUserName",
            "ValidationException",
        ),
        (
            Code::InvalidPolicy,
            400,
            "InvalidPolicy",
            "ValidationException",
        ),
        (
            Code::UserNotFound,
            404,
            "UserNotFound",
            "ValidationException",
        ),
        (Code::UserExists, 409, "UserExists", "ValidationException"),
        (Code::LastAdmin, 409, "LastAdmin", "ValidationException"),
        (
            Code::TokenNotFound,
            404,
            "TokenNotFound",
            "ValidationException",
        ),
        (
            Code::InvalidParameterName,
            400,
            "InvalidParameterName",
            "ValidationException",
        ),
        (
            Code::InvalidParameterValue,
            400,
            "InvalidParameterValue",
            "ValidationException",
        ),
        (
            Code::ParameterValueTooLarge,
            400,
            "ParameterValueTooLarge",
            "ValidationException",
        ),
        (
            Code::ParameterLimitExceeded,
            400,
            "ParameterLimitExceeded",
            "ParameterLimitExceeded",
        ),
        (
            Code::ParameterNotFound,
            404,
            "ParameterNotFound",
            "ParameterNotFound",
        ),
        (
            Code::ParameterAlreadyExists,
            409,
            "ParameterAlreadyExists",
            "ParameterAlreadyExists",
        ),
        (
            Code::ParameterVersionNotFound,
            404,
            "ParameterVersionNotFound",
            "ParameterVersionNotFound",
        ),
        (
            Code::ParameterPatternMismatch,
            400,
            "ParameterPatternMismatch",
            "ParameterPatternMismatchException",
        ),
        (
            Code::InvalidAllowedPattern,
            400,
            "InvalidAllowedPattern",
            "InvalidAllowedPatternException",
        ),
        (Code::InvalidKeyId, 400, "InvalidKeyId", "InvalidKeyId"),
        (
            Code::HierarchyLevelLimitExceeded,
            400,
            "HierarchyLevelLimitExceeded",
            "HierarchyLevelLimitExceededException",
        ),
        (
            Code::InvalidFilterOption,
            400,
            "InvalidFilterOption",
            "InvalidFilterOption",
        ),
        (
            Code::DocumentNotFound,
            404,
            "InvalidDocument",
            "InvalidDocument",
        ),
        (
            Code::InvalidDocument,
            400,
            "InvalidDocument",
            "InvalidDocument",
        ),
        (
            Code::InvalidDocumentVersion,
            400,
            "InvalidDocumentVersion",
            "InvalidDocumentVersion",
        ),
        (
            Code::InvalidDocumentContent,
            400,
            "InvalidDocumentContent",
            "InvalidDocumentContent",
        ),
        (
            Code::InvalidDocumentSchemaVersion,
            400,
            "InvalidDocumentSchemaVersion",
            "InvalidDocumentSchemaVersion",
        ),
        (
            Code::InvalidDocumentOperation,
            400,
            "InvalidDocumentOperation",
            "InvalidDocumentOperation",
        ),
        (
            Code::MaxDocumentSizeExceeded,
            400,
            "MaxDocumentSizeExceeded",
            "MaxDocumentSizeExceeded",
        ),
        (
            Code::DocumentAlreadyExists,
            409,
            "DocumentAlreadyExists",
            "DocumentAlreadyExists",
        ),
        (
            Code::DocumentLimitExceeded,
            400,
            "DocumentLimitExceeded",
            "DocumentLimitExceeded",
        ),
        (
            Code::DocumentVersionLimitExceeded,
            400,
            "DocumentVersionLimitExceeded",
            "DocumentVersionLimitExceeded",
        ),
        (
            Code::DuplicateDocumentContent,
            400,
            "DuplicateDocumentContent",
            "DuplicateDocumentContent",
        ),
        (
            Code::DuplicateDocumentVersionName,
            400,
            "DuplicateDocumentVersionName",
            "DuplicateDocumentVersionName",
        ),
        (Code::Unavailable, 503, "Unavailable", "InternalServerError"),
        (Code::Internal, 500, "InternalError", "InternalServerError"),
    ];
    /// Every kind's status and codes, on both APIs, in one table: a change to any is a wire change.
    #[test]
    fn every_kind_has_its_status_and_codes() {
        assert_eq!(
            TABLE.len(),
            Code::ALL.len(),
            "a kind missing from the table"
        );
        for (code, (kind, status, native, aws)) in Code::ALL.iter().zip(TABLE) {
            assert_eq!(*code, kind, "table order");
            assert_eq!(kind.status().as_u16(), status, "{kind:?} status");
            assert_eq!(kind.native_code(), native, "{kind:?} native code");
            assert_eq!(kind.aws_code(), aws, "{kind:?} aws code");
            let aws_status = if status >= 500 { 500 } else { 400 };
            assert_eq!(
                kind.aws_status().as_u16(),
                aws_status,
                "{kind:?} SSM status"
            );
        }
    }

    /// A framework answer's status picks the codes the fallback layer has always shown.
    #[test]
    fn framework_statuses_map_to_the_codes_they_had() {
        let table = [
            (404, "NotFound", "ValidationException"),
            (405, "MethodNotAllowed", "UnknownOperationException"),
            (401, "Unauthorized", "ValidationException"),
            (403, "AccessDenied", "AccessDeniedException"),
            (429, "TooManyRequests", "ThrottlingException"),
            (503, "Unavailable", "InternalServerError"),
            (500, "InternalError", "InternalServerError"),
            (502, "InternalError", "InternalServerError"),
            (400, "InvalidRequest", "SerializationException"),
            (408, "InvalidRequest", "ValidationException"),
            (413, "InvalidRequest", "ValidationException"),
            (415, "InvalidRequest", "ValidationException"),
            (422, "InvalidRequest", "ValidationException"),
        ];
        for (status, native, aws) in table {
            let code = Code::from_status(StatusCode::from_u16(status).unwrap());
            assert_eq!(
                (code.native_code(), code.aws_code()),
                (native, aws),
                "{status}"
            );
        }
    }

    /// One error through each door: its status, code, wording, Retry-After and audit code.
    #[test]
    fn both_doors_render_one_error_with_its_headers() {
        use crate::api::Native;
        use crate::ssm::Ssm;
        let e = Error::new(Code::TooManyFailedAuthentications, "locked; retry in 5 s")
            .retry_after(Duration::from_millis(4_200));
        let native = render::<Native>(e.clone());
        assert_eq!(native.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(native.headers()[header::RETRY_AFTER], "4");
        assert_eq!(native.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            native.extensions().get::<ErrorCode>().map(|c| c.0),
            Some("TooManyFailedAuthentications")
        );
        let ssm = render::<Ssm>(e);
        assert_eq!(ssm.status(), StatusCode::BAD_REQUEST);
        assert_eq!(ssm.headers()[header::RETRY_AFTER], "4");
        assert_eq!(
            ssm.headers()[header::CONTENT_TYPE],
            "application/x-amz-json-1.1"
        );
        assert_eq!(
            ssm.extensions().get::<ErrorCode>().map(|c| c.0),
            Some("ThrottlingException")
        );
        assert_eq!(
            Ssm::message(Code::TooManyRequests, "x".into()),
            "Rate exceeded: x"
        );
        // A fault's detail stays in the log on both.
        assert!(!Native::message(Code::Internal, "db path /x".into()).contains("/x"));
        assert!(!Ssm::message(Code::Internal, "db path /x".into()).contains("/x"));
    }
}
