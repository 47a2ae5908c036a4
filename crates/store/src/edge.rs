//! The store's edge: plain rows (epoch ms, typed ids and statuses, optionals as stored) become the
//! API types of `fleetrun_proto::api` here (an audit verdict is not a row; `audit.rs` builds it).
//!
//! The SQL modules decode rows and decide nothing about presentation; RFC 3339 times, the ping
//! status, truncation flags and key fingerprints are decided once in this file, so a second SQL
//! dialect (PostgreSQL) decodes its rows into the same records and presents them identically.

use crate::audit::AuditLogRow;
use crate::commands::{CommandRecord, InvocationRecord};
use crate::nodes::{ActivationRecord, NodeRecord};
use crate::principals::{TokenRecord, UserRecord, token_id};
use crate::sessions::SessionRecord;
use fleetrun_proto::api::{
    Activation, AuditRecord, Command, Invocation, Node, PING_CONNECTION_LOST, PING_ONLINE,
    RecordingStatus, Session, SessionStatus, Token, User,
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
        platform: r.platform,
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
        default_instance_name: r.default_instance_name,
        iam_role: r.iam_role,
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
            output_s3: (!r.output_s3.bucket.is_empty()).then_some(r.output_s3),
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
            output_s3_pending: None,
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

impl From<SessionRecord> for Session {
    fn from(r: SessionRecord) -> Self {
        Session {
            session_id: r.session_id,
            kind: r.kind,
            node_id: r.node_id,
            principal: r.principal,
            source: r.source,
            run_as: r.run_as,
            command: r.command,
            started_at: rfc3339(r.started_at),
            ended_at: r.ended_at.map(rfc3339),
            bytes_in: r.bytes_in.max(0) as u64,
            bytes_out: r.bytes_out.max(0) as u64,
            exit_code: r.exit_code.and_then(|c| i32::try_from(c).ok()),
            end_reason: r.end_reason,
            status: SessionStatus::from_stored(&r.status),
            recording: RecordingStatus::from_stored(&r.recording),
            recording_bytes: r.recording_bytes.max(0) as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::OutputState;
    use crate::principals::UserRow;
    use crate::{AuditEntry, NewNode, Store};
    use fleetrun_proto::api::{AuditQuery, Role};
    use fleetrun_proto::channel::NodeInfo;
    use fleetrun_proto::{CommandId, CommandStatus, InvocationStatus, NodeId};

    /// 2023-11-14T22:13:20.123Z.
    const T: i64 = 1_700_000_000_123;
    const T_TEXT: &str = "2023-11-14T22:13:20.123Z";

    fn node_record() -> NodeRecord {
        NodeRecord {
            node_id: NodeId::from_random(7),
            name: "web-1".into(),
            hostname: "web-1.local".into(),
            os: "linux".into(),
            platform: "linux".into(),
            arch: "x86_64".into(),
            ips: vec!["10.0.0.7".into()],
            agent_version: "1.2.3".into(),
            tags: BTreeMap::from([("env".into(), "prod".into())]),
            activation_id: "act-1".into(),
            registered_at: 0,
            last_seen_at: T,
            connected_to: String::new(),
            public_key: None,
            key_rotated_at: None,
        }
    }

    /// Online: seen now; not online: seen when its connection was last alive. Either way the stored
    /// columns pass through and times are RFC 3339 with milliseconds.
    #[test]
    fn node_ping_status_and_last_seen() {
        let now = T + 60_000;
        // (online, ping status, last seen)
        let table = [
            (true, "Online", "2023-11-14T22:14:20.123Z"),
            (false, "ConnectionLost", T_TEXT),
        ];
        for (online, status, seen) in table {
            let n = node(node_record(), online, now);
            assert_eq!(n.ping_status, status, "online={online}");
            assert_eq!(n.last_seen, seen, "online={online}");
            assert_eq!(n.registered_at, "1970-01-01T00:00:00.000Z");
            assert_eq!(n.node_id, NodeId::from_random(7));
            assert_eq!(
                (n.name.as_str(), n.hostname.as_str()),
                ("web-1", "web-1.local")
            );
            assert_eq!((n.os.as_str(), n.arch.as_str()), ("linux", "x86_64"));
            assert_eq!(n.ips, ["10.0.0.7"]);
            assert_eq!(n.agent_version, "1.2.3");
            assert_eq!(n.tags.get("env").map(String::as_str), Some("prod"));
            assert_eq!(n.activation_id, "act-1");
        }
        assert_eq!(PING_ONLINE, "Online");
        assert_eq!(PING_CONNECTION_LOST, "ConnectionLost");
    }

    /// The key's fingerprint and rotation time, from absent or unreadable to present.
    #[test]
    fn node_key_fingerprint_and_rotation() {
        let key = [0x11u8; 32];
        // (stored key, rotated at, fingerprint, rotated at shown)
        let table = [
            (None, None, String::new(), None),
            (Some("not hex".to_owned()), None, String::new(), None),
            (
                Some(hex::encode(key)),
                Some(T),
                fingerprint(&key),
                Some(T_TEXT),
            ),
        ];
        for (public_key, rotated, fp, rotated_text) in table {
            let n = node(
                NodeRecord {
                    public_key: public_key.clone(),
                    key_rotated_at: rotated,
                    ..node_record()
                },
                false,
                T,
            );
            assert_eq!(n.key_fingerprint, fp, "{public_key:?}");
            assert_eq!(n.key_rotated_at.as_deref(), rotated_text, "{public_key:?}");
        }
        assert!(fingerprint(&key).starts_with("SHA256:"));
    }

    /// An activation is expired from its expiry time on (the boundary included); its code is never
    /// shown.
    #[test]
    fn activation_expiry_boundary() {
        let rec = ActivationRecord {
            activation_id: "act-1".into(),
            tags: BTreeMap::new(),
            limit: 10,
            registrations: 3,
            description: "lab".into(),
            created_at: 0,
            expires_at: T,
            default_instance_name: String::new(),
            iam_role: String::new(),
        };
        // (now, expired)
        for (now, expired) in [(T - 1, false), (T, true), (T + 1, true)] {
            let a = activation(rec.clone(), now);
            assert_eq!(a.expired, expired, "now = expiry {:+}", now - T);
            assert_eq!(a.expires_at, T_TEXT);
            assert_eq!(a.created_at, "1970-01-01T00:00:00.000Z");
            assert_eq!((a.limit, a.registrations), (10, 3));
            assert_eq!((a.code.as_str(), a.description.as_str()), ("", "lab"));
            assert_eq!(a.ca_fingerprint, None);
        }
        assert_eq!(expired_at(T), T_TEXT);
    }

    fn command_record(parameters: Option<BTreeMap<String, Vec<String>>>) -> CommandRecord {
        CommandRecord {
            command_id: CommandId::from_random(1),
            document_name: "AWS-RunShellScript".into(),
            document_version: "1".into(),
            parameters,
            commands: vec!["uptime".into()],
            working_dir: "/tmp".into(),
            comment: "c".into(),
            node_ids: vec![NodeId::from_random(7)],
            targets: String::new(),
            status: CommandStatus::InProgress,
            status_details: "InProgress".into(),
            requested_at: T,
            max_concurrency: "50%".into(),
            max_errors: "0".into(),
            delivery_timeout: 600,
            execution_timeout: 3600,
            run_as: String::new(),
            memory_limit_mb: None,
            cpu_limit_percent: Some(50),
            target_count: 3,
            completed_count: 2,
            error_count: 1,
            delivery_timed_out_count: 0,
            output_s3: Default::default(),
        }
    }

    /// Parameters as given, or (stored before they were kept) AWS-RunShellScript's from the script.
    #[test]
    fn command_parameters_and_times() {
        let given = BTreeMap::from([("commands".to_owned(), vec!["ls".to_owned()])]);
        let legacy = BTreeMap::from([
            ("commands".to_owned(), vec!["uptime".to_owned()]),
            ("workingDirectory".to_owned(), vec!["/tmp".to_owned()]),
            ("executionTimeout".to_owned(), vec!["3600".to_owned()]),
        ]);
        for (stored, shown) in [(Some(given.clone()), given), (None, legacy)] {
            let c = Command::from(command_record(stored));
            assert_eq!(c.parameters, shown);
            assert_eq!(c.requested_at, T_TEXT);
            assert_eq!(c.status, CommandStatus::InProgress);
            assert_eq!(
                (c.delivery_timeout_secs, c.execution_timeout_secs),
                (600, 3600)
            );
            assert_eq!((c.memory_limit_mb, c.cpu_limit_percent), (None, Some(50)));
            assert_eq!(
                (c.target_count, c.completed_count, c.error_count),
                (3, 2, 1)
            );
            assert_eq!(c.max_concurrency, "50%");
            assert!(c.invocations.is_empty());
        }
    }

    fn invocation_record() -> InvocationRecord {
        InvocationRecord {
            command_id: CommandId::from_random(1),
            node_id: NodeId::from_random(7),
            node_name: "web-1".into(),
            status: InvocationStatus::Pending,
            status_details: "Pending".into(),
            exit_code: -1,
            signal: None,
            output: OutputState::default(),
            started_at: None,
            finished_at: None,
            limits_applied: String::new(),
            cpu_user_ms: None,
            cpu_system_ms: None,
            max_rss_kb: None,
            message: String::new(),
        }
    }

    /// Truncated exactly when more was stored than the inline copy can hold.
    #[test]
    fn invocation_truncation_boundary() {
        let (out, err) = (INLINE_STDOUT_MAX as u64, INLINE_STDERR_MAX as u64);
        // (stdout stored, stderr stored, stdout truncated, stderr truncated)
        let table = [
            (0, 0, false, false),
            (out, err, false, false),
            (out + 1, err, true, false),
            (out, err + 1, false, true),
        ];
        for (so, se, to, te) in table {
            let i = Invocation::from(InvocationRecord {
                output: OutputState {
                    stdout: (so, b"hi\xff".to_vec()),
                    stderr: (se, b"oops".to_vec()),
                },
                ..invocation_record()
            });
            assert_eq!(
                (i.stdout_truncated, i.stderr_truncated),
                (to, te),
                "{so} {se}"
            );
            assert_eq!((i.stdout_bytes, i.stderr_bytes), (so, se));
            // Invalid UTF-8 is replaced, not an error.
            assert_eq!(
                (i.stdout.as_str(), i.stderr.as_str()),
                ("hi\u{fffd}", "oops")
            );
        }
    }

    /// Start and end times: absent stay absent; the wall time needs both and is never negative.
    #[test]
    fn invocation_times_and_wall() {
        // (started, finished, started shown, finished shown, wall ms)
        let table = [
            (None, None, None, None, None),
            (Some(T), None, Some(T_TEXT), None, None),
            (None, Some(T), None, Some(T_TEXT), None),
            (
                Some(T),
                Some(T + 1_500),
                Some(T_TEXT),
                Some("2023-11-14T22:13:21.623Z"),
                Some(1_500),
            ),
            // A clock that went back shows zero, not a wrapped duration.
            (
                Some(T),
                Some(T - 5),
                Some(T_TEXT),
                Some("2023-11-14T22:13:20.118Z"),
                Some(0),
            ),
        ];
        for (started, finished, s, f, wall) in table {
            let i = Invocation::from(InvocationRecord {
                started_at: started,
                finished_at: finished,
                ..invocation_record()
            });
            assert_eq!(i.started_at.as_deref(), s, "{started:?} {finished:?}");
            assert_eq!(i.finished_at.as_deref(), f, "{started:?} {finished:?}");
            assert_eq!(i.wall_ms, wall, "{started:?} {finished:?}");
        }
    }

    /// Tokens are named by the prefix of their hash and never carry a secret; users show their
    /// counts; audit records their time.
    #[test]
    fn tokens_users_and_audit_records() {
        let hash = "0123456789abcdef".repeat(4);
        // (expires at, shown)
        for (expires, shown) in [(None, None), (Some(T), Some(T_TEXT))] {
            let t = Token::from(TokenRecord {
                token_hash: hash.clone(),
                user: "alice".into(),
                name: "ci".into(),
                created_at: T,
                expires_at: expires,
            });
            assert_eq!(t.id, "tok_0123456789abcdef");
            assert_eq!((t.user.as_str(), t.name.as_str()), ("alice", "ci"));
            assert_eq!(t.created_at, T_TEXT);
            assert_eq!(t.expires_at.as_deref(), shown);
            assert_eq!(t.token, None);
        }
        let u = User::from(UserRecord {
            user: UserRow {
                name: "alice".into(),
                role: Role::Operator,
                policy: String::new(),
            },
            created_at: T,
            tokens: 2,
            access_keys: 1,
        });
        assert_eq!((u.name.as_str(), u.role), ("alice", Role::Operator));
        assert_eq!(
            (u.created_at.as_str(), u.tokens, u.access_keys),
            (T_TEXT, 2, 1)
        );
        let a = AuditRecord::from(AuditLogRow {
            seq: 42,
            at: T,
            principal: "alice".into(),
            source: "127.0.0.1:1".into(),
            action: "commands.send".into(),
            command_id: String::new(),
            node_ids: vec!["mi-00000000000000007".into()],
            document: "AWS-RunShellScript".into(),
            params: serde_json::json!({"x": 1}),
            result: "201".into(),
            hash: "h".into(),
        });
        assert_eq!((a.seq, a.time.as_str()), (42, T_TEXT));
        assert_eq!(a.params, serde_json::json!({"x": 1}));
        assert_eq!(a.node_ids, ["mi-00000000000000007"]);
    }

    /// Through a real database, each of them: what the SQL modules decode is what the edge presents.
    #[tokio::test]
    async fn store_calls_present_their_rows() {
        let (_dir, stores) = crate::testing::stores().await;
        for (db, store) in stores {
            store_calls_present_their_rows_on(db, store).await;
        }
    }

    async fn store_calls_present_their_rows_on(db: &str, store: Store) {
        let now = fleetrun_proto::time::now_ms();

        store
            .insert_activation(
                "act-1",
                "code-hash",
                &BTreeMap::new(),
                5,
                "lab",
                T,
                now + 3_600_000,
                ("", ""),
            )
            .await
            .unwrap();
        let id = NodeId::from_random(7);
        let key = [0x22u8; 32];
        store
            .register_node(
                "code-hash",
                NewNode {
                    node_id: id.clone(),
                    public_key: hex::encode(key),
                    info: NodeInfo {
                        name: "web-1".into(),
                        ..NodeInfo::default()
                    },
                    tags: BTreeMap::new(),
                },
            )
            .await
            .unwrap();
        let acts = store.list_activations().await.unwrap();
        assert_eq!(acts.len(), 1);
        assert_eq!(
            (acts[0].created_at.as_str(), acts[0].expired),
            (T_TEXT, false),
            "{db}"
        );
        assert_eq!(acts[0].registrations, 1);

        let lost = store.get_node(&id, |_, _| false).await.unwrap().unwrap();
        assert_eq!(lost.ping_status, PING_CONNECTION_LOST, "{db}");
        assert_eq!(lost.key_fingerprint, fingerprint(&key));
        assert_eq!(lost.key_rotated_at, None);
        let online = store.list_nodes(|n, _| *n == id).await.unwrap();
        assert_eq!(online.len(), 1);
        assert_eq!(online[0].ping_status, PING_ONLINE);

        // A command stored before parameters were kept, with one finished invocation.
        let cid = CommandId::from_random(9);
        crate::with_pool!(store, write, |pool| {
            sqlx::query(
                "INSERT INTO commands (command_id, document_name, commands, working_dir, execution_timeout,
                    delivery_timeout, comment, node_ids, targets, max_concurrency, max_errors, status,
                    status_details, requested_at, target_count)
                 VALUES ($1, 'AWS-RunShellScript', '[\"uptime\"]', '', 60, 600, '', '[]', '', '50', '0',
                    'Success', 'Success', $2, 1)",
            )
            .bind(cid.as_str())
            .bind(T)
            .execute(pool)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO invocations (command_id, node_id, seq, node_name, status, status_details,
                    started_at, finished_at, exit_code, stdout_inline, stdout_bytes)
                 VALUES ($1, $2, 0, 'web-1', 'Success', 'Success', $3, $4, 0, $5, 30000)",
            )
            .bind(cid.as_str())
            .bind(id.as_str())
            .bind(T)
            .bind(T + 1_500)
            .bind(b"hi".to_vec())
            .execute(pool)
            .await
            .unwrap();
        });
        // Through the SSM listings (on both databases).
        let all = crate::CommandQuery::default();
        let listed = store.query_commands(&all, 0, 10).await.unwrap();
        assert_eq!(listed.len(), 1, "{db}");
        assert_eq!(listed[0].0.requested_at, T_TEXT);
        assert_eq!(listed[0].0.parameters["executionTimeout"], ["60"]);
        let inv = store.query_invocations(&all, 0, 10).await.unwrap();
        assert_eq!(inv.len(), 1, "{db}");
        assert_eq!(
            (inv[0].0.stdout.as_str(), inv[0].0.stdout_truncated),
            ("hi", true)
        );
        assert_eq!(
            (inv[0].0.started_at.as_deref(), inv[0].0.wall_ms),
            (Some(T_TEXT), Some(1_500))
        );

        let user = UserRow {
            name: "alice".into(),
            role: Role::Operator,
            policy: String::new(),
        };
        store.create_user(&user).await.unwrap();
        let hash = "ab".repeat(32);
        let made = store
            .insert_token(&hash, "alice", "ci", Some(T))
            .await
            .unwrap();
        let listed = store.list_tokens(Some("alice")).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].id.as_str(), listed[0].expires_at.as_deref()),
            ("tok_abababababababab", Some(T_TEXT)),
            "{db}"
        );
        assert_eq!(
            (made.id, made.expires_at),
            (listed[0].id.clone(), listed[0].expires_at.clone())
        );
        assert_eq!(store.get_user("alice").await.unwrap().unwrap().tokens, 1);

        let c = store.get_command(&cid).await.unwrap().unwrap();
        assert_eq!(c.requested_at, T_TEXT);
        assert_eq!(c.parameters["executionTimeout"], ["60"]);
        let inv = store.list_invocations(&cid).await.unwrap();
        assert_eq!(inv.len(), 1);
        assert_eq!(
            (inv[0].stdout.as_str(), inv[0].stdout_truncated),
            ("hi", true)
        );
        assert_eq!(
            (inv[0].started_at.as_deref(), inv[0].wall_ms),
            (Some(T_TEXT), Some(1_500))
        );

        store
            .append_audit(AuditEntry {
                at: T,
                action: "commands.send".into(),
                params: serde_json::json!({}),
                ..AuditEntry::default()
            })
            .await
            .unwrap();
        let recs = store
            .audit_records(&AuditQuery::default(), None, None, 10)
            .await
            .unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!((recs[0].seq, recs[0].time.as_str()), (1, T_TEXT));
    }
}
