//! The store's edge: plain rows (epoch ms, typed ids and statuses, optionals as stored) become the
//! API types of `fleetrun_proto::api` here, and only here.
//!
//! The SQL modules decode rows and decide nothing about presentation; RFC 3339 times, the ping
//! status, truncation flags and key fingerprints are decided once in this file, so a second SQL
//! dialect (PostgreSQL) decodes its rows into the same records and presents them identically.

use crate::audit::AuditLogRow;
use crate::commands::{CommandRecord, InvocationRecord};
use crate::nodes::{ActivationRecord, NodeRecord};
use crate::principals::{TokenRecord, UserRecord, token_id};
use fleetrun_proto::api::{
    Activation, AuditRecord, Command, Invocation, Node, PING_CONNECTION_LOST, PING_ONLINE, Token,
    User,
};
use fleetrun_proto::auth::fingerprint;
use fleetrun_proto::limits::{INLINE_STDERR_MAX, INLINE_STDOUT_MAX};
use fleetrun_proto::time::rfc3339;
use std::collections::BTreeMap;

/// A node as the API shows it. `online` is whether it is connected now: then it was last seen
/// `now`, else when its last connection ended.
pub(crate) fn node(r: NodeRecord, online: bool, now: i64) -> Node {
    Node {
        ping_status: if online {
            PING_ONLINE
        } else {
            PING_CONNECTION_LOST
        }
        .into(),
        last_seen: rfc3339(if online { now } else { r.last_seen_at }),
        node_id: r.node_id,
        name: r.name,
        hostname: r.hostname,
        os: r.os,
        arch: r.arch,
        ips: r.ips,
        agent_version: r.agent_version,
        tags: r.tags,
        activation_id: r.activation_id,
        registered_at: rfc3339(r.registered_at),
        // A key that is not hex (hand-edited row) shows no fingerprint rather than failing the listing.
        key_fingerprint: r
            .public_key
            .and_then(|k| hex::decode(k).ok())
            .map(|k| fingerprint(&k))
            .unwrap_or_default(),
        key_rotated_at: r.key_rotated_at.map(rfc3339),
    }
}

/// An activation as the API lists it: expired from `now` on; its code is not stored, so it is empty.
pub(crate) fn activation(r: ActivationRecord, now: i64) -> Activation {
    Activation {
        activation_id: r.activation_id,
        code: String::new(),
        tags: r.tags,
        limit: r.limit,
        registrations: r.registrations,
        created_at: rfc3339(r.created_at),
        expires_at: rfc3339(r.expires_at),
        expired: r.expires_at <= now,
        description: r.description,
        ca_fingerprint: None,
    }
}

/// When an activation expired, as a registration refusal says it.
pub(crate) fn expired_at(expires_at: i64) -> String {
    rfc3339(expires_at)
}

impl From<CommandRecord> for Command {
    fn from(r: CommandRecord) -> Self {
        let parameters = r.parameters.unwrap_or_else(|| {
            // Stored before commands kept their parameters: AWS-RunShellScript's, from the script.
            BTreeMap::from([
                ("commands".to_owned(), r.commands),
                ("workingDirectory".to_owned(), vec![r.working_dir]),
                (
                    "executionTimeout".to_owned(),
                    vec![r.execution_timeout.to_string()],
                ),
            ])
        });
        Command {
            command_id: r.command_id,
            document_name: r.document_name,
            document_version: r.document_version,
            parameters,
            comment: r.comment,
            node_ids: r.node_ids,
            targets: r.targets,
            status: r.status,
            status_details: r.status_details,
            requested_at: rfc3339(r.requested_at),
            max_concurrency: r.max_concurrency,
            max_errors: r.max_errors,
            delivery_timeout_secs: r.delivery_timeout,
            execution_timeout_secs: r.execution_timeout,
            run_as: r.run_as,
            memory_limit_mb: r.memory_limit_mb,
            cpu_limit_percent: r.cpu_limit_percent,
            target_count: r.target_count,
            completed_count: r.completed_count,
            error_count: r.error_count,
            delivery_timed_out_count: r.delivery_timed_out_count,
            invocations: Vec::new(),
        }
    }
}

impl From<InvocationRecord> for Invocation {
    fn from(r: InvocationRecord) -> Self {
        let (stdout_bytes, stdout_inline) = r.output.stdout;
        let (stderr_bytes, stderr_inline) = r.output.stderr;
        Invocation {
            command_id: r.command_id,
            node_id: r.node_id,
            node_name: r.node_name,
            status: r.status,
            status_details: r.status_details,
            exit_code: r.exit_code,
            signal: r.signal,
            stdout: String::from_utf8_lossy(&stdout_inline).into_owned(),
            stderr: String::from_utf8_lossy(&stderr_inline).into_owned(),
            // The inline copy holds the first bytes; more were stored when the length exceeds it.
            stdout_truncated: stdout_bytes > INLINE_STDOUT_MAX as u64,
            stderr_truncated: stderr_bytes > INLINE_STDERR_MAX as u64,
            stdout_bytes,
            stderr_bytes,
            started_at: r.started_at.map(rfc3339),
            finished_at: r.finished_at.map(rfc3339),
            wall_ms: r
                .started_at
                .zip(r.finished_at)
                .map(|(s, f)| f.saturating_sub(s).max(0) as u64),
            limits_applied: r.limits_applied,
            cpu_user_ms: r.cpu_user_ms,
            cpu_system_ms: r.cpu_system_ms,
            max_rss_kb: r.max_rss_kb,
            message: r.message,
        }
    }
}

impl From<UserRecord> for User {
    fn from(r: UserRecord) -> Self {
        User {
            name: r.user.name,
            role: r.user.role,
            policy: r.user.policy,
            created_at: rfc3339(r.created_at),
            tokens: r.tokens,
            access_keys: r.access_keys,
        }
    }
}

impl From<TokenRecord> for Token {
    /// Without its secret, which is not stored (only its hash, which names it).
    fn from(r: TokenRecord) -> Self {
        Token {
            id: token_id(&r.token_hash),
            user: r.user,
            name: r.name,
            created_at: rfc3339(r.created_at),
            expires_at: r.expires_at.map(rfc3339),
            token: None,
        }
    }
}

impl From<AuditLogRow> for AuditRecord {
    fn from(r: AuditLogRow) -> Self {
        AuditRecord {
            seq: r.seq as u64,
            time: rfc3339(r.at),
            principal: r.principal,
            source: r.source,
            action: r.action,
            command_id: r.command_id,
            node_ids: r.node_ids,
            document: r.document,
            params: r.params,
            result: r.result,
            hash: r.hash,
        }
    }
}
