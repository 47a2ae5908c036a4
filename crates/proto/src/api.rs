//! Bodies of the native JSON API under `/v1` (snake_case keys that scripts can rely on).
//!
//! | route | body | answer |
//! |---|---|---|
//! | `GET /v1/health` (no token) | | [`Health`] |
//! | `POST /v1/activations` | [`CreateActivation`] | [`Activation`] |
//! | `GET /v1/activations` | | `[Activation]` |
//! | `GET /v1/nodes` | | `[Node]` |
//! | `GET /v1/nodes/{node_id}` | | [`Node`] |
//! | `POST /v1/commands` | [`SendCommand`] | [`Command`] (201) |
//! | `GET /v1/commands?limit=N&before=CURSOR` | | `[Command]` newest first, without invocations; CURSOR is a command id (the commands after it: the last id of a page gives the next page) or an RFC 3339 time (commands requested before it) |
//! | `GET /v1/commands/{command_id}` | | [`Command`] with invocations |
//! | `GET /v1/commands/{command_id}/watch` | | NDJSON of [`Command`] (no invocations), one per change, ending when terminal |
//! | `GET /v1/commands/{command_id}/invocations` | | `[Invocation]` |
//! | `GET /v1/commands/{command_id}/invocations/{node_id}/output/{stdout,stderr}[?follow=true]` | | the raw bytes |
//! | `POST /v1/commands/{command_id}/cancel` | [`CancelCommand`] | [`Command`] |
//! | `POST /v1/documents` | [`CreateDocument`] | [`Document`] (201) |
//! | `GET /v1/documents` | | `[Document]` without content, by name |
//! | `GET /v1/documents/{name}[?version=N\|$LATEST\|$DEFAULT]` | | [`Document`] with content (default version by default) |
//! | `PUT /v1/documents/{name}` | [`UpdateDocument`] | [`Document`]: the new version |
//! | `PUT /v1/documents/{name}/default-version` | [`SetDefaultVersion`] | [`Document`] |
//! | `DELETE /v1/documents/{name}` | | 204 |
//! | `GET /v1/storage` | | [`Storage`] |
//! | `POST /v1/access-keys` | [`CreateAccessKey`] | [`AccessKey`] (201; the only time the secret is shown) |
//! | `GET /v1/access-keys` | | `[AccessKey]` without secrets |
//! | `DELETE /v1/nodes/{node_id}` | | [`Node`]: deregistered (gone from listings, channel refused) |
//! | `GET /v1/sessions?active=true&limit=N&before=ID` | | `[Session]` newest first, on the nodes one may `shell` on |
//! | `GET /v1/sessions/{session_id}` | | [`Session`] |
//! | `POST /v1/sessions/{session_id}/terminate` | | [`Session`] as it was; the `terminate-session` action (409 when not running) |
//! | `GET /v1/sessions/{session_id}/recording` | | an ended session's recording, asciicast v2 (`application/x-asciicast`), streamed; 409 `RecordingNotReady` while it runs, 404 `RecordingNotFound` without one |
//! | `GET /v1/nodes/{node_id}/exec` | WebSocket upgrade: a live one-shot command ([`crate::stream::client`]); the `shell` action | |
//! | `GET /v1/audit?principal=&action=&node=&since=&until=&limit=` | | `[AuditRecord]` newest first ([`AuditQuery`]) |
//! | `POST /v1/audit/verify` | | [`AuditVerify`] |
//! | `GET /v1/whoami` | | [`WhoAmI`] |
//! | `POST /v1/users` | [`CreateUser`] | [`User`] (201) |
//! | `GET /v1/users` | | `[User]` |
//! | `GET /v1/users/{name}` | | [`User`] |
//! | `PUT /v1/users/{name}` | [`UpdateUser`] | [`User`] |
//! | `DELETE /v1/users/{name}` | | 204 (its tokens and access keys go with it) |
//! | `POST /v1/tokens` | [`CreateToken`] | [`Token`] (201; the only time the token is shown) |
//! | `GET /v1/tokens[?user=NAME]` | | `[Token]` without secrets |
//! | `DELETE /v1/tokens/{id}` | | 204 |
//! | `POST /v1/scripts` | [`CreateScript`] | [`Script`] (201) |
//! | `GET /v1/scripts?after=NAME&limit=N` | | `[Script]` at their latest versions, without bodies, by name |
//! | `GET /v1/scripts/{name}[?version=N]` | | [`Script`] with its body (the latest version by default) |
//! | `PUT /v1/scripts/{name}` | [`UpdateScript`] | [`Script`]: the new version |
//! | `DELETE /v1/scripts/{name}` | | 204 (every version goes) |
//! | `PUT\|GET\|DELETE /v1/params/{name}`, `GET /v1/params` | see [`crate::params`] | |
//! | `POST /` | AWS JSON 1.1, SigV4-signed (the SSM-compatible API) | |
//! | `GET /v1/agent/connect` | WebSocket upgrade: the agent channel (crate::channel) | |
//!
//! Every route but health and the agent channel needs `Authorization: Bearer TOKEN`. Errors are
//! [`ErrorBody`] with a 4xx status (5xx only for faults of the server itself).

use crate::ids::{CommandId, NodeId};
use crate::status::{CommandStatus, InvocationStatus};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// SSM's document for shell scripts: built in, and the default of a send.
pub const DOCUMENT_RUN_SHELL_SCRIPT: &str = "AWS-RunShellScript";
/// The action (plugin) that runs a shell script: the one step of AWS-RunShellScript, and the only
/// action a custom document's step may run on fleetrun nodes.
pub const PLUGIN_RUN_SHELL_SCRIPT: &str = "aws:runShellScript";

/// `Node::ping_status` of a node whose agent is connected.
pub const PING_ONLINE: &str = "Online";
/// `Node::ping_status` of a node whose agent is not connected.
pub const PING_CONNECTION_LOST: &str = "ConnectionLost";

/// Answer of `GET /v1/health`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// Server version.
    pub version: String,
    /// Agent channel protocol version.
    pub protocol_version: u32,
}

/// Error answer of every route.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Machine-readable code, e.g. `InvalidTarget`, `CommandNotFound`, `Unauthorized`.
    pub code: String,
    /// One line naming what is wrong.
    pub message: String,
}

/// Body of `POST /v1/activations`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateActivation {
    /// Tags given to every node that registers with the activation.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Most nodes that may register with it (default 1, as SSM).
    #[serde(default)]
    pub limit: Option<u64>,
    /// Seconds until it expires (default 24 h, as SSM; at most 30 days).
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
    /// A note for operators.
    #[serde(default)]
    pub description: String,
    /// The name every node registering with it gets ('' keeps each agent's own).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub default_instance_name: String,
}

/// An activation: a code agents register with.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Activation {
    /// Public id of the activation.
    pub activation_id: String,
    /// The secret code; shown only when created (empty in listings).
    pub code: String,
    /// Tags given to registering nodes.
    pub tags: BTreeMap<String, String>,
    /// Most registrations.
    pub limit: u64,
    /// Registrations so far.
    pub registrations: u64,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Expiry time (RFC 3339).
    pub expires_at: String,
    /// Whether it has expired.
    pub expired: bool,
    /// A note for operators.
    pub description: String,
    /// SHA-256 of the server's CA certificate ([`crate::tls::fingerprint`]), for the agent's
    /// `--ca-fingerprint` on first contact; only in the answer to a create, when the server made
    /// its own CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_fingerprint: Option<String>,
    /// The name every node registering with it gets ('' keeps each agent's own).
    #[serde(default)]
    pub default_instance_name: String,
    /// The IAM role an SSM CreateActivation named (kept to show back; fleetrun has no IAM).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub iam_role: String,
}

/// A managed node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Node {
    /// `mi-...`.
    pub node_id: NodeId,
    /// Display name.
    pub name: String,
    /// `Online` or `ConnectionLost`.
    pub ping_status: String,
    /// Last time the node was connected (RFC 3339).
    pub last_seen: String,
    /// Hostname.
    pub hostname: String,
    /// OS.
    pub os: String,
    /// The platform the agent runs on (`linux`, `macos`): what a saved script's platform must match.
    #[serde(default)]
    pub platform: String,
    /// Architecture.
    pub arch: String,
    /// IP addresses.
    pub ips: Vec<String>,
    /// Agent version.
    pub agent_version: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// The activation it registered with.
    pub activation_id: String,
    /// Registration time (RFC 3339).
    pub registered_at: String,
    /// Fingerprint of the node's current public key (`SHA256:` + 32 hex digits).
    #[serde(default)]
    pub key_fingerprint: String,
    /// When the node last rotated its key (RFC 3339), if it ever did.
    #[serde(default)]
    pub key_rotated_at: Option<String>,
}

/// Body of `POST /v1/commands`: run a shell script on nodes. Fields follow SSM's SendCommand.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendCommand {
    /// Nodes by id.
    #[serde(default)]
    pub node_ids: Vec<NodeId>,
    /// A target expression (crate::targets), e.g. `tag:env=prod`.
    #[serde(default)]
    pub targets: Option<String>,
    /// The document (default `AWS-RunShellScript`).
    #[serde(default)]
    pub document_name: Option<String>,
    /// The document's version: `N`, `$LATEST` or `$DEFAULT` (the default).
    #[serde(default)]
    pub document_version: Option<String>,
    /// The document's parameters by name (SSM's `Parameters`); each value is a list, as in SSM.
    #[serde(default)]
    pub parameters: BTreeMap<String, Vec<String>>,
    /// Shorthand for AWS-RunShellScript's `commands` parameter: lines of the script (required by
    /// that document unless `parameters` has `commands`; not accepted with other documents).
    #[serde(default)]
    pub commands: Vec<String>,
    /// Shorthand for AWS-RunShellScript's `workingDirectory` parameter.
    #[serde(default)]
    pub working_directory: Option<String>,
    /// Shorthand for AWS-RunShellScript's `executionTimeout` parameter, in seconds (default 3600, at
    /// most 172800).
    #[serde(default)]
    pub execution_timeout_secs: Option<u64>,
    /// Delivery timeout, in seconds (SSM's `TimeoutSeconds`; default 3600).
    #[serde(default)]
    pub delivery_timeout_secs: Option<u64>,
    /// `N` or `N%` (default 50).
    #[serde(default)]
    pub max_concurrency: Option<String>,
    /// `N` or `N%` (default 0).
    #[serde(default)]
    pub max_errors: Option<String>,
    /// Up to 100 characters.
    #[serde(default)]
    pub comment: Option<String>,
    /// Run as this user (name or uid) on the nodes; their agents must run as root.
    #[serde(default)]
    pub run_as: Option<String>,
    /// Most memory the command may use on each node, in MiB.
    #[serde(default)]
    pub memory_limit_mb: Option<u64>,
    /// Most CPU the command may use on each node, in percent of one core (150 = 1.5 cores).
    #[serde(default)]
    pub cpu_limit_percent: Option<u32>,
    /// Also write each invocation's full stdout and stderr to this S3 bucket (SSM's
    /// `OutputS3BucketName`), under SSM's key layout (see [`OutputS3`]).
    #[serde(default)]
    pub output_s3_bucket: Option<String>,
    /// The key prefix in that bucket (SSM's `OutputS3KeyPrefix`; needs `output_s3_bucket`).
    #[serde(default)]
    pub output_s3_prefix: Option<String>,
    /// The bucket's region (SSM's `OutputS3Region`; else the server's S3 region).
    #[serde(default)]
    pub output_s3_region: Option<String>,
}

/// Where a command's output is also written: each invocation's stdout and stderr go to
/// `bucket` at `prefix/COMMAND/NODE/awsrunShellScript/STEP/stdout` (and `stderr`), SSM's layout.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputS3 {
    /// The bucket.
    pub bucket: String,
    /// The key prefix as given ("" for none; keys are made with its `/`s at either end trimmed).
    #[serde(default)]
    pub prefix: String,
    /// The bucket's region ("" for the server's).
    #[serde(default)]
    pub region: String,
}

/// A command: one document run sent to some nodes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Command {
    /// UUID.
    pub command_id: CommandId,
    /// The document it runs, e.g. `AWS-RunShellScript`.
    pub document_name: String,
    /// The version of the document it runs (a number; "" for commands sent before documents had
    /// versions).
    #[serde(default)]
    pub document_version: String,
    /// The document's parameters as given (for AWS-RunShellScript: `commands`, `workingDirectory`,
    /// `executionTimeout`, with their defaults).
    pub parameters: BTreeMap<String, Vec<String>>,
    /// Comment.
    pub comment: String,
    /// Node ids asked for.
    pub node_ids: Vec<NodeId>,
    /// Target expression asked for (empty if none).
    pub targets: String,
    /// Rolled-up status.
    pub status: CommandStatus,
    /// Rolled-up status details.
    pub status_details: String,
    /// When it was sent (RFC 3339).
    pub requested_at: String,
    /// `N` or `N%`.
    pub max_concurrency: String,
    /// `N` or `N%`.
    pub max_errors: String,
    /// Delivery timeout, seconds.
    pub delivery_timeout_secs: u64,
    /// Execution timeout, seconds.
    pub execution_timeout_secs: u64,
    /// Run-as user ("" for the agent's).
    pub run_as: String,
    /// Memory limit per node, MiB.
    pub memory_limit_mb: Option<u64>,
    /// CPU limit per node, percent of one core.
    pub cpu_limit_percent: Option<u32>,
    /// Number of invocations.
    pub target_count: u64,
    /// Invocations that reached a terminal status.
    pub completed_count: u64,
    /// Invocations that Failed or timed out while executing.
    pub error_count: u64,
    /// Invocations that were never delivered in time.
    pub delivery_timed_out_count: u64,
    /// Where each invocation's output is also written (S3), if the send asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_s3: Option<OutputS3>,
    /// The invocations: filled by `GET /v1/commands/{id}`; empty in the answer to `POST`, in listings
    /// and in watch lines (a fleet-wide command's would be large).
    #[serde(default)]
    pub invocations: Vec<Invocation>,
}

/// One command on one node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Invocation {
    /// The command.
    pub command_id: CommandId,
    /// The node.
    pub node_id: NodeId,
    /// The node's name.
    pub node_name: String,
    /// Status.
    pub status: InvocationStatus,
    /// Status details.
    pub status_details: String,
    /// Exit code; -1 if it has not ended or never started (SSM's ResponseCode).
    pub exit_code: i32,
    /// Signal that ended it, if any.
    pub signal: Option<i32>,
    /// First stdout bytes (24,000 at most), lossily decoded as UTF-8.
    pub stdout: String,
    /// First stderr bytes (8,000 at most), lossily decoded as UTF-8.
    pub stderr: String,
    /// Whether stdout was longer than its inline copy.
    pub stdout_truncated: bool,
    /// Whether stderr was longer than its inline copy.
    pub stderr_truncated: bool,
    /// Bytes of stdout stored.
    pub stdout_bytes: u64,
    /// Bytes of stderr stored.
    pub stderr_bytes: u64,
    /// When it started (RFC 3339), if it did.
    pub started_at: Option<String>,
    /// When it ended (RFC 3339), if it did.
    pub finished_at: Option<String>,
    /// User CPU, ms.
    pub cpu_user_ms: Option<u64>,
    /// System CPU, ms.
    pub cpu_system_ms: Option<u64>,
    /// Peak RSS, KiB.
    pub max_rss_kb: Option<u64>,
    /// Wall time from start to end, ms.
    pub wall_ms: Option<u64>,
    /// Which mechanism enforced limits on the node: `cgroup2`, `cgroup1`, `rlimit`, `none` ("" if it
    /// has not ended).
    pub limits_applied: String,
    /// A note from the node (why it could not start, which signal ended it).
    pub message: String,
    /// Why this invocation's output is not in its S3 bucket yet (the command's `output_s3`): the
    /// last upload error and the attempts so far; None when written, or when nothing is to write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_s3_pending: Option<String>,
}

/// Answer of `GET /v1/storage`: what the server keeps.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Storage {
    /// Size of the database files, bytes.
    pub database_bytes: u64,
    /// Total size of stored output, bytes.
    pub output_bytes: u64,
    /// Commands kept.
    pub commands: u64,
    /// Invocations kept.
    pub invocations: u64,
    /// Commands older than this many seconds are purged (with their output).
    pub retention_secs: u64,
    /// The oldest command kept (RFC 3339), if any.
    pub oldest_command_at: Option<String>,
    /// Output actors running now (one per invocation receiving output): a gauge of the server's
    /// in-memory state, for operators and leak tests.
    #[serde(default)]
    pub live_output_actors: u64,
    /// Invocation outputs queued for their S3 bucket (`output_s3`), not written yet.
    #[serde(default)]
    pub output_s3_queued: u64,
}

/// Body of `POST /v1/access-keys`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAccessKey {
    /// A note saying what the key is for.
    #[serde(default)]
    pub name: String,
    /// The user the key acts as; the caller when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// A SigV4 access key for the SSM-compatible API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AccessKey {
    /// `FRAK...`, the AWS_ACCESS_KEY_ID.
    pub access_key_id: String,
    /// The AWS_SECRET_ACCESS_KEY; shown only when created (empty in listings).
    pub secret_access_key: String,
    /// The note.
    pub name: String,
    /// The user the key acts as.
    #[serde(default)]
    pub user: String,
    /// Creation time (RFC 3339).
    pub created_at: String,
}

/// Body of `POST /v1/commands/{id}/cancel`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelCommand {
    /// Only these nodes' invocations; all of them when empty.
    #[serde(default)]
    pub node_ids: Vec<NodeId>,
}

/// Body of `POST /v1/documents`: a Command document (SSM schema 1.2, 2.0 or 2.2, JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDocument {
    /// `^[a-zA-Z0-9_.-]{3,128}$`; names starting with `AWS-`, `aws-` or `amazon` are reserved.
    pub name: String,
    /// The document: its JSON or YAML text, or the JSON object itself.
    pub content: serde_json::Value,
    /// A label for this version (`^[a-zA-Z0-9_.-]{1,128}$`).
    #[serde(default)]
    pub version_name: Option<String>,
    /// How the text is written: `JSON` (the default) or `YAML`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document_format: Option<String>,
}

/// Body of `PUT /v1/documents/{name}`: a new version.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateDocument {
    /// The new content: JSON or YAML text, or a JSON object.
    pub content: serde_json::Value,
    /// The version this one replaces: `$LATEST` (the default) or the latest version's number.
    #[serde(default)]
    pub document_version: Option<String>,
    /// A label for the new version.
    #[serde(default)]
    pub version_name: Option<String>,
    /// How the text is written: `JSON` (the default) or `YAML`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document_format: Option<String>,
}

/// Body of `PATCH /v1/nodes/{node_id}/tags`: tags to set (added or changed) and keys to remove.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeTagsChange {
    /// Keys and the values they get.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Keys to remove (a key that is not there is no error).
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Body of `PUT /v1/documents/{name}/default-version`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetDefaultVersion {
    /// A version number of the document.
    pub document_version: String,
}

/// A document version, as `/v1/documents` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Document {
    /// Name.
    pub name: String,
    /// `Command`.
    pub document_type: String,
    /// `JSON`.
    pub document_format: String,
    /// `Amazon` for built-in documents, else the account that owns it (`Self` in listings filters).
    pub owner: String,
    /// The version shown ("1", "2"...).
    pub document_version: String,
    /// Its label, if it has one.
    pub version_name: Option<String>,
    /// The version sends use by default.
    pub default_version: String,
    /// The newest version.
    pub latest_version: String,
    /// `1.2`, `2.0` or `2.2`.
    pub schema_version: String,
    /// The document's description.
    pub description: String,
    /// Hex SHA-256 of the content.
    pub hash: String,
    /// Parameters the document takes.
    pub parameters: Vec<DocumentParameter>,
    /// Whether fleetrun ships it (it cannot be updated or deleted).
    pub built_in: bool,
    /// When the document was created (RFC 3339).
    pub created_at: String,
    /// The content of this version (JSON text); absent in listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One parameter of a document.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DocumentParameter {
    /// Name (`{{ name }}` in the document).
    pub name: String,
    /// `String`, `StringList`, `Boolean`, `Integer`, `StringMap` or `MapList`.
    #[serde(rename = "type")]
    pub param_type: String,
    /// Description.
    pub description: String,
    /// The default as JSON text (absent: the parameter is required).
    pub default_value: Option<String>,
}

/// Query of `GET /v1/audit`; every member is optional and they combine with AND.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only this principal (`admin`, an access key id, a node id, `anonymous`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// Only this action (`commands.send`); a trailing `*` matches a prefix (`ssm.*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Only records naming this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Not before this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Not after this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// At most this many records (1 to 10,000; default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// One record of the audit trail.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain (1, 2, ...).
    pub seq: u64,
    /// When (RFC 3339).
    pub time: String,
    /// Who: an API token's name (`admin`), an access key id, a node id, or `anonymous`.
    pub principal: String,
    /// The client's address.
    pub source: String,
    /// What: `commands.send`, `ssm.SendCommand`, `nodes.deregister`, `agent.hello`...
    pub action: String,
    /// The command acted on (empty when none).
    pub command_id: String,
    /// The nodes acted on.
    pub node_ids: Vec<String>,
    /// The document acted on (empty when none).
    pub document: String,
    /// The request's parameters with secrets redacted (a send's script is kept).
    pub params: serde_json::Value,
    /// The outcome: HTTP status and error code, or the channel's answer.
    pub result: String,
    /// The record's chain hash (hex SHA-256).
    pub hash: String,
}

/// Answer of `POST /v1/audit/verify`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditVerify {
    /// Whether the whole chain is intact.
    pub ok: bool,
    /// Records checked and found intact (before the first bad one).
    pub records: u64,
    /// The first record that does not fit the chain.
    pub first_bad_seq: Option<u64>,
    /// Why, in one line.
    pub reason: Option<String>,
    /// The last intact record: keep it somewhere else and pass it back as an [`AuditAnchor`] next
    /// time, and a removal of the newest records is found too.
    #[serde(default)]
    pub head: Option<AuditAnchor>,
}

/// A record the chain must still hold, unchanged (optional body of `POST /v1/audit/verify`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditAnchor {
    /// Its sequence number.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
}

/// A user's role: the built-in policies it starts from (crates/server/src/authz.rs has their text).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Admin,
    /// Run, cancel and read commands on every node; manage documents and parameters.
    Operator,
    /// Read nodes, commands, output and documents.
    Viewer,
    /// Nothing but what the user's own policy permits.
    None,
}

impl Role {
    /// Every role, for help texts and errors.
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Viewer, Role::None];

    /// The role's name as written in the API and CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::None => "none",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}: expected admin, operator, viewer or none"))
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Body of `POST /v1/users`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// `[A-Za-z0-9_.@-]`, 1 to 64 characters.
    pub name: String,
    /// Built-in role.
    pub role: Role,
    /// Cedar policies added to the role's (see `fleetrun policies validate`).
    #[serde(default)]
    pub policy: String,
}

/// Body of `PUT /v1/users/{name}`: what to change.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    /// New role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// New policy text (empty removes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// A user: a principal that tokens and access keys act as.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct User {
    /// Name.
    pub name: String,
    /// Built-in role.
    pub role: Role,
    /// Its own Cedar policies ('' when none).
    pub policy: String,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// API tokens it has.
    pub tokens: u32,
    /// SigV4 access keys it has.
    pub access_keys: u32,
}

/// Body of `POST /v1/tokens`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// The user the token acts as; the caller when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// A note saying what the token is for.
    #[serde(default)]
    pub name: String,
    /// Seconds until the token stops working; never when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
}

/// An API token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Token {
    /// `tok_` + 16 hex: names the token without revealing it.
    pub id: String,
    /// The user it acts as.
    pub user: String,
    /// The note.
    pub name: String,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// When it stops working (RFC 3339), if ever.
    pub expires_at: Option<String>,
    /// The bearer token: only in the answer that created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Answer of `GET /v1/whoami`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WhoAmI {
    /// The user.
    pub user: String,
    /// Its role.
    pub role: Role,
    /// The credential used: a token id or an access key id.
    pub credential: String,
}

/// Where a session is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SessionStatus {
    /// Running: the agent started it and it has not ended.
    Active,
    /// Ended on its own: it exited, either side left, or it failed.
    Ended,
    /// Ended by the server: terminated by a user, an idle timeout, its maximum duration, or a
    /// server restart.
    Terminated,
    /// Never started: the node was not connected, its agent too old, or the agent refused or
    /// lost the stream before it ran; `end_reason` says why.
    Failed,
}

impl SessionStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Active => "Active",
            SessionStatus::Ended => "Ended",
            SessionStatus::Terminated => "Terminated",
            SessionStatus::Failed => "Failed",
        }
    }
    /// From the stored name; an unknown one reads as `Ended` (a row is never shown as running
    /// by mistake).
    pub fn from_stored(s: &str) -> Self {
        match s {
            "Active" => SessionStatus::Active,
            "Terminated" => SessionStatus::Terminated,
            "Failed" => SessionStatus::Failed,
            _ => SessionStatus::Ended,
        }
    }
}

/// Whether a session is recorded (`GET /v1/sessions/{id}/recording`), and how far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordingStatus {
    /// Not recorded.
    #[default]
    None,
    /// Being written (the session runs); readable once it ends.
    Recording,
    /// Stored.
    Complete,
    /// It could not be written: nothing is stored.
    Failed,
}

impl RecordingStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordingStatus::None => "none",
            RecordingStatus::Recording => "recording",
            RecordingStatus::Complete => "complete",
            RecordingStatus::Failed => "failed",
        }
    }
    /// From the stored name; an unknown one reads as `Failed` (nothing is served).
    pub fn from_stored(s: &str) -> Self {
        match s {
            "none" => RecordingStatus::None,
            "recording" => RecordingStatus::Recording,
            "complete" => RecordingStatus::Complete,
            _ => RecordingStatus::Failed,
        }
    }
}

/// A record of one interactive session on a node (an exec today).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Its id (a UUID).
    pub session_id: String,
    /// What kind: `exec`.
    pub kind: String,
    /// The node.
    pub node_id: NodeId,
    /// Who opened it.
    pub principal: String,
    /// The client's address.
    pub source: String,
    /// The user it runs as (empty: the agent's user).
    pub run_as: String,
    /// What runs.
    pub command: String,
    /// When the agent started it (RFC 3339).
    pub started_at: String,
    /// When it ended (RFC 3339), once it did.
    pub ended_at: Option<String>,
    /// Bytes from the client (stdin).
    pub bytes_in: u64,
    /// Bytes to the client (stdout and stderr).
    pub bytes_out: u64,
    /// Exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Why it ended: `exited`, an error, `terminated by USER`, `idle timeout`, `max duration`,
    /// `server restarted`; empty while active.
    pub end_reason: String,
    /// Where it is.
    pub status: SessionStatus,
    /// Whether it is recorded, and how far.
    #[serde(default)]
    pub recording: RecordingStatus,
    /// The recording's size in bytes, once complete.
    #[serde(default)]
    pub recording_bytes: u64,
}

/// An object kept for users (`fleetrun objects`): script inputs, results, files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectInfo {
    /// Its key: `/`-separated segments (see [`check_object_key`]).
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256 of the bytes, lowercase hex, measured by the server as it wrote them.
    pub sha256: String,
    /// RFC 3339.
    pub created_at: String,
    /// Who wrote it.
    pub created_by: String,
}

/// Longest object key, in bytes (as S3's).
pub const OBJECT_KEY_MAX: usize = 1024;

/// Checks an object key: 1 to [`OBJECT_KEY_MAX`] bytes of `/`-separated segments, none empty, `.`
/// or `..`, each of ASCII letters, digits and `-._+=@,~`. The error says what is wrong.
pub fn check_object_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > OBJECT_KEY_MAX {
        return Err(format!(
            "an object key is 1 to {OBJECT_KEY_MAX} bytes, not {}",
            key.len()
        ));
    }
    for seg in key.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err(format!(
                "bad object key {key:?}: empty, `.` and `..` segments are not allowed"
            ));
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "-._+=@,~".contains(*c)))
        {
            return Err(format!(
                "bad object key {key:?}: {c:?} is not allowed (letters, digits, -._+=@,~ and / between segments)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod object_key_tests {
    use super::*;

    #[test]
    fn object_keys_are_plain_paths() {
        for good in ["a", "inputs/tool-1.2.tar.gz", "r/cmd=1/n@x,y~"] {
            assert_eq!(check_object_key(good), Ok(()), "{good}");
        }
        for bad in [
            "", "/a", "a/", "a//b", "a/../b", "./a", "a b", "a\\b", "ä", "a?b",
        ] {
            assert!(check_object_key(bad).is_err(), "{bad:?}");
        }
        assert!(check_object_key(&"x".repeat(OBJECT_KEY_MAX + 1)).is_err());
    }
}

/// Body of `POST /v1/scripts`: a saved script (see [`check_script`] for the limits).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateScript {
    /// Letters, digits, `-`, `_`, `.`; at most [`SCRIPT_NAME_MAX`].
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: String,
    /// One of [`SCRIPT_PLATFORMS`].
    pub platform: String,
    /// The input file: `s3://bucket/key`, an object key in the store, or an `https://` URL.
    #[serde(default)]
    pub input: Option<String>,
    /// The output file, relative to the run's temp dir.
    #[serde(default)]
    pub output: Option<String>,
    /// The script; may use `${INPUT}` and `${OUTPUT}`.
    pub body: String,
}

/// Body of `PUT /v1/scripts/{name}`: a new version. Members left out keep the latest version's
/// value; `input` or `output` given as `""` clears it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateScript {
    /// New description.
    #[serde(default)]
    pub description: Option<String>,
    /// New platform.
    #[serde(default)]
    pub platform: Option<String>,
    /// New input URI (`""`: none).
    #[serde(default)]
    pub input: Option<String>,
    /// New output path (`""`: none).
    #[serde(default)]
    pub output: Option<String>,
    /// New body.
    #[serde(default)]
    pub body: Option<String>,
}

/// One version of a saved script, as `/v1/scripts` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Script {
    /// Name.
    pub name: String,
    /// The version shown.
    pub version: u64,
    /// The newest version.
    pub latest_version: u64,
    /// Description.
    pub description: String,
    /// Platform.
    pub platform: String,
    /// Input URI.
    pub input: Option<String>,
    /// Output path.
    pub output: Option<String>,
    /// Hex SHA-256 of the body.
    pub sha256: String,
    /// The body's size in bytes.
    pub size: u64,
    /// When the script was created (RFC 3339).
    pub created_at: String,
    /// Who created it.
    pub created_by: String,
    /// When this version was made (RFC 3339).
    pub updated_at: String,
    /// Who made this version.
    pub updated_by: String,
    /// The body; absent in listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// Longest script name.
pub const SCRIPT_NAME_MAX: usize = 128;
/// Longest script description.
pub const SCRIPT_DESCRIPTION_MAX: usize = 1024;
/// Longest input URI.
pub const SCRIPT_INPUT_MAX: usize = 2048;
/// Longest output path.
pub const SCRIPT_OUTPUT_MAX: usize = 1024;
/// Platforms a saved script may name.
pub const SCRIPT_PLATFORMS: &[&str] = &["linux"];

/// Checks a script name: 1 to [`SCRIPT_NAME_MAX`] of letters, digits, `-`, `_`, `.`.
pub fn check_script_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > SCRIPT_NAME_MAX {
        return Err(format!(
            "a script name is 1 to {SCRIPT_NAME_MAX} characters, not {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(*c)))
    {
        return Err(format!(
            "bad script name {name:?}: {c:?} is not allowed (letters, digits, - _ .)"
        ));
    }
    Ok(())
}

/// The saved script a command ran (`GET /v1/commands/{id}/script`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptRun {
    /// The command.
    pub command_id: CommandId,
    /// The script's name.
    pub name: String,
    /// The version that ran.
    pub version: u64,
    /// The output files it shipped into the object store, one per node that produced one, by
    /// node (download with `fleetrun objects get KEY`).
    #[serde(default)]
    pub results: Vec<ScriptResult>,
}

/// A node's output file of a saved script run, kept as an object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptResult {
    /// The node.
    pub node_id: NodeId,
    /// The object's key (`results/COMMAND/NODE/NAME`).
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

/// Checks a script's description, platform, input URI, output path and body (its name apart); the
/// error names the member and what is wrong.
pub fn check_script(
    description: &str,
    platform: &str,
    input: Option<&str>,
    output: Option<&str>,
    body: &str,
) -> Result<(), String> {
    if description.chars().count() > SCRIPT_DESCRIPTION_MAX {
        return Err(format!(
            "description: at most {SCRIPT_DESCRIPTION_MAX} characters, got {}",
            description.chars().count()
        ));
    }
    if !SCRIPT_PLATFORMS.contains(&platform) {
        return Err(format!(
            "platform {platform:?} is not supported (allowed: {})",
            SCRIPT_PLATFORMS.join(", ")
        ));
    }
    if let Some(uri) = input {
        check_script_input(uri).map_err(|e| format!("input: {e}"))?;
    }
    if let Some(path) = output {
        check_script_output(path).map_err(|e| format!("output: {e}"))?;
    }
    if body.trim().is_empty() {
        return Err("body: the script is empty".to_owned());
    }
    if body.len() > crate::limits::SCRIPT_MAX {
        return Err(format!(
            "body: at most {} bytes, got {}",
            crate::limits::SCRIPT_MAX,
            body.len()
        ));
    }
    Ok(())
}

/// An input URI: `s3://bucket/key`, `https://host/...`, or an object key of the store.
pub fn check_script_input(uri: &str) -> Result<(), String> {
    if uri.is_empty() || uri.len() > SCRIPT_INPUT_MAX {
        return Err(format!(
            "a URI is 1 to {SCRIPT_INPUT_MAX} bytes, not {}",
            uri.len()
        ));
    }
    if let Some(c) = uri.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!("bad URI {uri:?}: {c:?} is not allowed"));
    }
    if let Some(rest) = uri.strip_prefix("s3://") {
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && !bucket.starts_with(['.', '-'])
            && !bucket.ends_with(['.', '-']);
        if !bucket_ok {
            return Err(format!(
                "bad URI {uri:?}: the bucket must be 3 to 63 of a-z 0-9 . - (s3://bucket/key)"
            ));
        }
        if key.is_empty() {
            return Err(format!("bad URI {uri:?}: no key (s3://bucket/key)"));
        }
        return Ok(());
    }
    if let Some(rest) = uri.strip_prefix("https://") {
        let host = rest.split(['/', '?', '#']).next().unwrap_or("");
        if host.is_empty() || host.contains('@') {
            return Err(format!(
                "bad URI {uri:?}: an https URL needs a host (and no user info)"
            ));
        }
        return Ok(());
    }
    if uri.contains("://") {
        return Err(format!(
            "bad URI {uri:?}: the input is s3://bucket/key, https://..., or an object key"
        ));
    }
    check_object_key(uri)
}

/// An output path: a relative file name inside the run's temp dir (no `..`, no leading `/`).
pub fn check_script_output(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > SCRIPT_OUTPUT_MAX {
        return Err(format!(
            "a path is 1 to {SCRIPT_OUTPUT_MAX} bytes, not {}",
            path.len()
        ));
    }
    if path.starts_with('/') {
        return Err(format!(
            "{path:?} is absolute; give a file name relative to the run's temp dir"
        ));
    }
    if path.contains('\0') || path.contains('\n') {
        return Err(format!("{path:?} holds a NUL or newline"));
    }
    for seg in path.split('/') {
        if seg == ".." {
            return Err(format!(
                "{path:?} has a `..` segment; the output stays inside the run's temp dir"
            ));
        }
        if seg.is_empty() || seg == "." {
            return Err(format!("{path:?} has an empty or `.` segment"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod script_tests {
    use super::*;

    #[test]
    fn script_members_are_checked() {
        assert!(check_script_name("collect-logs_1.2").is_ok());
        for bad in ["", "a b", "x/y", &"n".repeat(129)] {
            assert!(check_script_name(bad).is_err(), "{bad:?}");
        }
        for good in [
            "s3://my-bucket/tools/t.tar.gz",
            "https://example.com/t.sh",
            "inputs/tool.bin",
        ] {
            assert!(check_script_input(good).is_ok(), "{good}");
        }
        for bad in [
            "s3://B/k",
            "s3://bucket",
            "s3://bucket/",
            "https://",
            "http://x/y",
            "ftp://x",
            "a/../b",
            "with space",
        ] {
            assert!(check_script_input(bad).is_err(), "{bad}");
        }
        assert!(check_script_output("out/result.json").is_ok());
        for bad in ["/etc/passwd", "../x", "a/../../x", "", "a//b"] {
            assert!(check_script_output(bad).is_err(), "{bad}");
        }
        let e = check_script("", "windows", None, None, "echo").expect_err("windows");
        assert!(e.contains("allowed: linux"), "{e}");
        let big = "x".repeat(crate::limits::SCRIPT_MAX + 1);
        assert!(check_script("", "linux", None, None, &big).is_err());
        assert!(check_script("", "linux", None, None, "echo ok").is_ok());
    }
}
