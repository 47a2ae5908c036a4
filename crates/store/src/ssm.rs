//! Queries of the SSM-compatible API: access keys, and command/invocation listings with SSM's filters
//! and offset pagination.

use super::commands::visible_json;
use super::{Columns, Dialect, Result, Sql, Store, with_pool};
use fleetrun_proto::api::{Command, Invocation};
use fleetrun_proto::time::now_ms;
use fleetrun_proto::{CommandId, NodeId};
use std::collections::HashSet;

/// Which commands (or their invocations) a listing wants.
#[derive(Default, Debug)]
pub struct CommandQuery {
    /// Only this command.
    pub command_id: Option<CommandId>,
    /// Only commands with an invocation on this node (for invocations: only this node's).
    pub node_id: Option<NodeId>,
    /// Requested at or after (epoch ms).
    pub invoked_after: Option<i64>,
    /// Requested at or before (epoch ms).
    pub invoked_before: Option<i64>,
    /// Status (of the command, or of the invocation when listing invocations).
    pub status: Option<String>,
    /// Document name.
    pub document_name: Option<String>,
    /// `Some(true)`: ended; `Some(false)`: still running.
    pub complete: Option<bool>,
    /// Only these nodes' invocations (and commands with one): what the caller may read.
    pub visible: Option<HashSet<NodeId>>,
}

/// A command's members that SSM shows with each invocation.
pub struct CommandMeta {
    /// Comment.
    pub comment: String,
    /// Document.
    pub document_name: String,
    /// Epoch ms.
    pub requested_at: i64,
    /// SSM-only members.
    pub ssm_extra: serde_json::Value,
    /// Where the output is also written (S3), if the send asked for it.
    pub output_s3: Option<super::S3Output>,
}

const TERMINAL: &str = "('Success', 'Failed', 'TimedOut', 'Cancelled')";

impl Store {
    /// Stores an access key (its secret sealed).
    pub async fn insert_access_key(
        &self,
        id: &str,
        nonce: &[u8],
        sealed: &[u8],
        name: &str,
        user: &str,
    ) -> Result<()> {
        with_pool!(self, write, |pool| {
            sqlx::query(
                "INSERT INTO access_keys (access_key_id, secret_nonce, secret_enc, name, created_at, user_name)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id)
            .bind(nonce)
            .bind(sealed)
            .bind(name)
            .bind(now_ms())
            .bind(user)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// The sealed secret of an access key and the user it acts as: (nonce, ciphertext, user).
    pub async fn access_key_secret(&self, id: &str) -> Result<Option<(Vec<u8>, Vec<u8>, String)>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(
                "SELECT secret_nonce, secret_enc, user_name FROM access_keys WHERE access_key_id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?
            .map(|r| {
                (
                    r.opt_bytes("secret_nonce").unwrap_or_default(),
                    r.opt_bytes("secret_enc").unwrap_or_default(),
                    r.text("user_name"),
                )
            })
        }))
    }

    /// Access keys: (id, name, user, created_at ms), newest first; only `user`'s when given.
    pub async fn list_access_keys(
        &self,
        user: Option<&str>,
    ) -> Result<Vec<(String, String, String, i64)>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(
                "SELECT access_key_id, name, user_name, created_at FROM access_keys
                 WHERE $1 IS NULL OR user_name = $1 ORDER BY created_at DESC, access_key_id DESC",
            )
            .bind(user)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| {
                (
                    r.text("access_key_id"),
                    r.text("name"),
                    r.text("user_name"),
                    r.int("created_at"),
                )
            })
            .collect()
        }))
    }

    /// Commands matching `q`, newest first, `limit` from `offset`, each with its SSM-only members.
    pub async fn query_commands(
        &self,
        q: &CommandQuery,
        offset: u64,
        limit: u32,
    ) -> Result<Vec<(Command, serde_json::Value)>> {
        with_pool!(self, read, |pool, d| {
            let mut sql = Sql::new("SELECT c.* FROM commands c WHERE 1 = 1");
            push_command_filters(&mut sql, d, q, true);
            sql.push(" ORDER BY c.requested_at DESC, c.command_id DESC");
            push_page(&mut sql, offset, limit);
            sql.query()
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| Ok((super::commands::command_record(r)?.into(), extra(r))))
                .collect()
        })
    }

    /// Invocations matching `q` (newest command first, then dispatch order), with their command's
    /// members SSM shows beside each.
    pub async fn query_invocations(
        &self,
        q: &CommandQuery,
        offset: u64,
        limit: u32,
    ) -> Result<Vec<(Invocation, CommandMeta)>> {
        with_pool!(self, read, |pool, d| {
            let mut sql = Sql::new(
                "SELECT i.*, c.comment AS c_comment, c.document_name AS c_document, c.requested_at AS c_requested,
                        c.ssm_extra AS ssm_extra, c.output_s3_bucket, c.output_s3_prefix, c.output_s3_region,
                        c.output_s3_plugin_dir, e.attempts AS e_attempts, e.last_error AS e_error,
                        e.next_attempt_at AS e_next
                 FROM invocations i JOIN commands c ON c.command_id = i.command_id
                 LEFT JOIN s3_exports e ON e.command_id = i.command_id AND e.node_id = i.node_id
                 WHERE 1 = 1",
            );
            push_command_filters(&mut sql, d, q, false);
            sql.push(" ORDER BY c.requested_at DESC, c.command_id DESC, i.seq, i.node_id");
            push_page(&mut sql, offset, limit);
            sql.query()
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| {
                    let meta = CommandMeta {
                        comment: r.text("c_comment"),
                        document_name: r.text("c_document"),
                        requested_at: r.int("c_requested"),
                        ssm_extra: extra(r),
                        output_s3: output_s3(r),
                    };
                    let mut inv: Invocation = super::commands::invocation_record(r)?.into();
                    inv.output_s3_pending = export_pending(r);
                    Ok((inv, meta))
                })
                .collect()
        })
    }
}

/// `LIMIT` and `OFFSET`, bound.
fn push_page(sql: &mut Sql, offset: u64, limit: u32) {
    sql.push(" LIMIT ")
        .bind(i64::from(limit))
        .push(" OFFSET ")
        .bind(i64::try_from(offset).unwrap_or(i64::MAX));
}

fn output_s3(r: &impl Columns) -> Option<super::S3Output> {
    let bucket = r.text("output_s3_bucket");
    (!bucket.is_empty()).then(|| super::S3Output {
        target: fleetrun_proto::api::OutputS3 {
            bucket,
            prefix: r.text("output_s3_prefix"),
            region: r.text("output_s3_region"),
        },
        plugin_dir: r.text("output_s3_plugin_dir"),
    })
}

/// An invocation's export that has not succeeded yet, in words (from the joined `s3_exports` row).
fn export_pending(r: &impl Columns) -> Option<String> {
    let attempts = r.opt_int("e_attempts")?;
    let error = r.opt_text("e_error").unwrap_or_default();
    let next = r.opt_int("e_next").unwrap_or_default();
    Some(super::exports::pending_text(
        u32::try_from(attempts.max(0)).unwrap_or(u32::MAX),
        &error,
        next,
    ))
}

fn extra(r: &impl Columns) -> serde_json::Value {
    serde_json::from_str(&r.text("ssm_extra")).unwrap_or_default()
}

/// Adds `q`'s filters; `on_command` says whether status filters apply to the command or the
/// invocation (`i`).
fn push_command_filters(sql: &mut Sql, d: Dialect, q: &CommandQuery, on_command: bool) {
    if let Some(id) = &q.command_id {
        sql.push(" AND c.command_id = ").bind(id.as_str());
    }
    if let Some(node) = &q.node_id {
        if on_command {
            sql.push(" AND c.command_id IN (SELECT command_id FROM invocations WHERE node_id = ")
                .bind(node.as_str())
                .push(")");
        } else {
            sql.push(" AND i.node_id = ").bind(node.as_str());
        }
    }
    if let Some(t) = q.invoked_after {
        sql.push(" AND c.requested_at >= ").bind(t);
    }
    if let Some(t) = q.invoked_before {
        sql.push(" AND c.requested_at <= ").bind(t);
    }
    if let Some(doc) = &q.document_name {
        sql.push(" AND c.document_name = ").bind(doc.as_str());
    }
    let status_col = if on_command { "c.status" } else { "i.status" };
    if let Some(s) = &q.status {
        sql.push(&format!(" AND {status_col} = ")).bind(s.as_str());
    }
    if let Some(json) = visible_json(q.visible.as_ref()) {
        let nodes = d.json_strings(&sql.param(json));
        if on_command {
            sql.push(&format!(
                " AND c.command_id IN (SELECT command_id FROM invocations WHERE node_id IN ({nodes}))"
            ));
        } else {
            sql.push(&format!(" AND i.node_id IN ({nodes})"));
        }
    }
    match q.complete {
        Some(true) => {
            sql.push(&format!(" AND {status_col} IN {TERMINAL}"));
        }
        Some(false) => {
            sql.push(&format!(" AND {status_col} NOT IN {TERMINAL}"));
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principals::UserRow;
    use fleetrun_proto::api::Role;
    use fleetrun_proto::{CommandStatus, InvocationStatus};

    /// Access keys keep their sealed secret and user; listings are newest first, per user when
    /// asked; a key's user must exist.
    #[tokio::test]
    async fn access_keys_store_secrets_and_list_per_user() {
        let (_dir, stores) = crate::testing::stores().await;
        for (db, store) in stores {
            let bob = UserRow {
                name: "bob".into(),
                role: Role::Operator,
                policy: String::new(),
            };
            store.create_user(&bob).await.expect("user");
            // Created in id order, so newest first is the same when two share a millisecond.
            for (id, user) in [("AKIA1", "admin"), ("AKIA2", "bob"), ("AKIA3", "admin")] {
                let sealed = [id.as_bytes(), &[0, 0xff]].concat();
                store
                    .insert_access_key(id, &[1, 2, 3], &sealed, &format!("{id}-name"), user)
                    .await
                    .expect("insert");
            }
            assert!(
                store
                    .insert_access_key("AKIA4", &[1], &[2], "n", "nobody")
                    .await
                    .is_err(),
                "{db}"
            );
            assert_eq!(
                store.access_key_secret("AKIA2").await.expect("secret"),
                Some((vec![1, 2, 3], b"AKIA2\0\xff".to_vec(), "bob".to_owned())),
                "{db}"
            );
            assert_eq!(
                store.access_key_secret("AKIA9").await.expect("secret"),
                None
            );
            let listed =
                |keys: Vec<(String, String, String, i64)>| -> Vec<(String, String, String)> {
                    keys.into_iter()
                        .map(|(id, name, user, _)| (id, name, user))
                        .collect()
                };
            let all = store.list_access_keys(None).await.expect("list");
            assert!(all.windows(2).all(|w| w[0].3 >= w[1].3), "{db}: {all:?}");
            assert!(all.iter().all(|k| k.3 > 0));
            let key = |id: &str, user: &str| (id.to_owned(), format!("{id}-name"), user.to_owned());
            assert_eq!(
                listed(all),
                [
                    key("AKIA3", "admin"),
                    key("AKIA2", "bob"),
                    key("AKIA1", "admin")
                ],
                "{db}"
            );
            assert_eq!(
                listed(store.list_access_keys(Some("admin")).await.expect("list")),
                [key("AKIA3", "admin"), key("AKIA1", "admin")],
                "{db}"
            );
            assert!(
                store
                    .list_access_keys(Some("carol"))
                    .await
                    .expect("list")
                    .is_empty()
            );
        }
    }

    const T: i64 = 1_700_000_000_000;

    /// Commands c1 (at T: Success on n1, n2), c2 (at T+10: InProgress on n2, Pending on n3; output
    /// to S3, n2's export retried) and c3 (at T+10: Failed on n3), as rows.
    async fn seed(store: &Store) -> [CommandId; 3] {
        let c = [1, 2, 3].map(CommandId::from_random);
        // (command, at, document, status, ssm_extra, bucket)
        let commands = [
            (&c[0], T, "AWS-RunShellScript", "Success", r#"{"a":1}"#, ""),
            (&c[1], T + 10, "Custom", "InProgress", "{}", "bucket"),
            (&c[2], T + 10, "AWS-RunShellScript", "Failed", "{}", ""),
        ];
        // (command, node, seq, status)
        let invocations = [
            (&c[0], 1, 0, "Success"),
            (&c[0], 2, 1, "Success"),
            (&c[1], 2, 0, "InProgress"),
            (&c[1], 3, 1, "Pending"),
            (&c[2], 3, 0, "Failed"),
        ];
        with_pool!(store, write, |pool| {
            for (id, at, doc, status, extra, bucket) in commands {
                sqlx::query(
                    "INSERT INTO commands (command_id, document_name, commands, working_dir, execution_timeout,
                        delivery_timeout, comment, node_ids, targets, max_concurrency, max_errors, status,
                        status_details, requested_at, target_count, ssm_extra, parameters, output_s3_bucket,
                        output_s3_prefix, output_s3_region, output_s3_plugin_dir)
                     VALUES ($1, $2, '[\"uptime\"]', '/tmp', 60, 600, $3, '[]', '', '50', '0', $4, $4, $5, 2,
                        $6, '{\"commands\":[\"uptime\"]}', $7, 'out', 'eu-west-1', 'awsrunShellScript/0')",
                )
                .bind(id.as_str())
                .bind(doc)
                .bind(format!("comment of {doc}"))
                .bind(status)
                .bind(at)
                .bind(extra)
                .bind(bucket)
                .execute(pool)
                .await
                .expect("command row");
            }
            for (id, node, seq, status) in invocations {
                sqlx::query(
                    "INSERT INTO invocations (command_id, node_id, seq, node_name, status, status_details,
                        exit_code, signal, stdout_inline, stdout_bytes, started_at)
                     VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8, $9, $10)",
                )
                .bind(id.as_str())
                .bind(NodeId::from_random(node).as_str())
                .bind(seq)
                .bind(format!("n{node}"))
                .bind(status)
                .bind(if status == "Failed" { 137i64 } else { 0 })
                .bind((status == "Failed").then_some(9i64))
                .bind(b"hi".to_vec())
                .bind(2i64)
                .bind(T + 1)
                .execute(pool)
                .await
                .expect("invocation row");
            }
            sqlx::query(
                "INSERT INTO s3_exports (command_id, node_id, queued_at, attempts, next_attempt_at, last_error)
                 VALUES ($1, $2, $3, 2, $4, 'AccessDenied')",
            )
            .bind(c[1].as_str())
            .bind(NodeId::from_random(2).as_str())
            .bind(T)
            .bind(T + 60_000)
            .execute(pool)
            .await
            .expect("export row");
        });
        c
    }

    /// An invocation in a listing: its command and node.
    type Row = (CommandId, NodeId);

    fn visible(nodes: &[u128]) -> Option<HashSet<NodeId>> {
        Some(nodes.iter().map(|n| NodeId::from_random(*n)).collect())
    }

    /// Every filter of the SSM command listing, alone and together, and its paging, on both
    /// databases: newest first, by id (descending) within a millisecond.
    #[tokio::test]
    async fn query_commands_filters_and_pages() {
        let (_dir, stores) = crate::testing::stores().await;
        for (db, store) in stores {
            let [c1, c2, c3] = seed(&store).await;
            assert!(c3.as_str() > c2.as_str());
            let n = NodeId::from_random;
            // (query, offset, limit, commands)
            let table: Vec<(CommandQuery, u64, u32, Vec<&CommandId>)> = vec![
                (CommandQuery::default(), 0, 50, vec![&c3, &c2, &c1]),
                (CommandQuery::default(), 1, 1, vec![&c2]),
                (CommandQuery::default(), 2, 5, vec![&c1]),
                (CommandQuery::default(), 3, 5, vec![]),
                (CommandQuery::default(), u64::MAX, 5, vec![]),
                (
                    CommandQuery {
                        command_id: Some(c2.clone()),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![&c2],
                ),
                (
                    CommandQuery {
                        node_id: Some(n(2)),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![&c2, &c1],
                ),
                (
                    CommandQuery {
                        invoked_after: Some(T + 10),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![&c3, &c2],
                ),
                (
                    CommandQuery {
                        invoked_before: Some(T),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![&c1],
                ),
                (
                    CommandQuery {
                        invoked_after: Some(T + 1),
                        invoked_before: Some(T + 9),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![],
                ),
                (
                    CommandQuery {
                        status: Some("Success".into()),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![&c1],
                ),
                (
                    CommandQuery {
                        document_name: Some("Custom".into()),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![&c2],
                ),
                (
                    CommandQuery {
                        complete: Some(true),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![&c3, &c1],
                ),
                (
                    CommandQuery {
                        complete: Some(false),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![&c2],
                ),
                (
                    CommandQuery {
                        visible: visible(&[3]),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![&c3, &c2],
                ),
                (
                    CommandQuery {
                        visible: visible(&[]),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![],
                ),
                (
                    CommandQuery {
                        node_id: Some(n(3)),
                        complete: Some(false),
                        visible: visible(&[1, 3]),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![&c2],
                ),
                (
                    CommandQuery {
                        document_name: Some("AWS-RunShellScript".into()),
                        visible: visible(&[1, 2, 3]),
                        ..Default::default()
                    },
                    1,
                    50,
                    vec![&c1],
                ),
            ];
            for (q, offset, limit, want) in table {
                let got = store
                    .query_commands(&q, offset, limit)
                    .await
                    .expect("query");
                let got: Vec<&CommandId> = got.iter().map(|(c, _)| &c.command_id).collect();
                assert_eq!(got, want, "{db}: {q:?} from {offset}, {limit}");
            }
            let all = store
                .query_commands(&CommandQuery::default(), 0, 50)
                .await
                .expect("query");
            let (cmd, extra) = &all[2];
            assert_eq!(extra, &serde_json::json!({"a": 1}), "{db}");
            assert_eq!(cmd.status, CommandStatus::Success);
            assert_eq!(cmd.comment, "comment of AWS-RunShellScript");
            assert_eq!(cmd.parameters["commands"], ["uptime"]);
            assert_eq!((cmd.execution_timeout_secs, cmd.target_count), (60, 2));
            assert_eq!(cmd.output_s3, None);
            assert_eq!(
                all[1].0.output_s3.as_ref().map(|o| o.bucket.as_str()),
                Some("bucket")
            );
            assert_eq!(all[1].1, serde_json::json!({}));
        }
    }

    /// Every filter of the SSM invocation listing (statuses are the invocation's), its paging, and
    /// the command's members beside each, on both databases.
    #[tokio::test]
    async fn query_invocations_filters_pages_and_meta() {
        let (_dir, stores) = crate::testing::stores().await;
        for (db, store) in stores {
            let [c1, c2, c3] = seed(&store).await;
            let n = NodeId::from_random;
            let row = |c: &CommandId, node: u128| (c.clone(), n(node));
            // (query, offset, limit, invocations)
            let table: Vec<(CommandQuery, u64, u32, Vec<Row>)> = vec![
                (
                    CommandQuery::default(),
                    0,
                    50,
                    vec![
                        row(&c3, 3),
                        row(&c2, 2),
                        row(&c2, 3),
                        row(&c1, 1),
                        row(&c1, 2),
                    ],
                ),
                (
                    CommandQuery::default(),
                    2,
                    2,
                    vec![row(&c2, 3), row(&c1, 1)],
                ),
                (CommandQuery::default(), 5, 2, vec![]),
                (
                    CommandQuery {
                        command_id: Some(c1.clone()),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![row(&c1, 1), row(&c1, 2)],
                ),
                (
                    CommandQuery {
                        node_id: Some(n(2)),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![row(&c2, 2), row(&c1, 2)],
                ),
                (
                    CommandQuery {
                        status: Some("Pending".into()),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![row(&c2, 3)],
                ),
                (
                    CommandQuery {
                        complete: Some(false),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![row(&c2, 2), row(&c2, 3)],
                ),
                (
                    CommandQuery {
                        complete: Some(true),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![row(&c3, 3), row(&c1, 1), row(&c1, 2)],
                ),
                (
                    CommandQuery {
                        visible: visible(&[1]),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![row(&c1, 1)],
                ),
                (
                    CommandQuery {
                        document_name: Some("Custom".into()),
                        invoked_after: Some(T + 10),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![row(&c2, 2), row(&c2, 3)],
                ),
                (
                    CommandQuery {
                        invoked_before: Some(T),
                        visible: visible(&[2, 3]),
                        ..Default::default()
                    },
                    0,
                    50,
                    vec![row(&c1, 2)],
                ),
            ];
            for (q, offset, limit, want) in table {
                let got: Vec<(CommandId, NodeId)> = store
                    .query_invocations(&q, offset, limit)
                    .await
                    .expect("query")
                    .into_iter()
                    .map(|(i, _)| (i.command_id, i.node_id))
                    .collect();
                assert_eq!(got, want, "{db}: {q:?} from {offset}, {limit}");
            }
            let all = store
                .query_invocations(&CommandQuery::default(), 0, 50)
                .await
                .expect("query");
            let (failed, meta) = &all[0];
            assert_eq!((failed.exit_code, failed.signal), (137, Some(9)), "{db}");
            assert_eq!(failed.status, InvocationStatus::Failed);
            assert_eq!((failed.stdout.as_str(), failed.stdout_bytes), ("hi", 2));
            assert_eq!(failed.node_name, "n3");
            assert_eq!(failed.output_s3_pending, None);
            assert_eq!(meta.document_name, "AWS-RunShellScript");
            assert!(meta.output_s3.is_none());
            let (exporting, meta) = &all[1];
            assert!(
                exporting
                    .output_s3_pending
                    .as_deref()
                    .is_some_and(|p| p.contains("AccessDenied")),
                "{db}: {:?}",
                exporting.output_s3_pending
            );
            assert_eq!(
                (
                    meta.comment.as_str(),
                    meta.document_name.as_str(),
                    meta.requested_at
                ),
                ("comment of Custom", "Custom", T + 10)
            );
            let s3 = meta.output_s3.as_ref().expect("output to S3");
            assert_eq!(
                (
                    s3.target.bucket.as_str(),
                    s3.target.prefix.as_str(),
                    s3.target.region.as_str()
                ),
                ("bucket", "out", "eu-west-1")
            );
            assert_eq!(s3.plugin_dir, "awsrunShellScript/0");
            assert_eq!(all[2].0.output_s3_pending, None);
            assert_eq!(all[3].1.ssm_extra, serde_json::json!({"a": 1}));
        }
    }
}
