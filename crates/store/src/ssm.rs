//! Queries of the SSM-compatible API: access keys, and command/invocation listings with SSM's filters
//! and offset pagination.

use super::commands::{command_record, invocation_record, visible_json};
use super::{Result, Store};
use fleetrun_proto::api::{Command, Invocation};
use fleetrun_proto::time::now_ms;
use fleetrun_proto::{CommandId, NodeId};
use sqlx::{QueryBuilder, Row, Sqlite};
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
        sqlx::query("INSERT INTO access_keys (access_key_id, secret_nonce, secret_enc, name, created_at, user_name) VALUES (?, ?, ?, ?, ?, ?)")
            .bind(id)
            .bind(nonce)
            .bind(sealed)
            .bind(name)
            .bind(now_ms())
            .bind(user)
            .execute(&self.sqlite()?.write)
            .await?;
        Ok(())
    }

    /// The sealed secret of an access key and the user it acts as: (nonce, ciphertext, user).
    pub async fn access_key_secret(&self, id: &str) -> Result<Option<(Vec<u8>, Vec<u8>, String)>> {
        let row = sqlx::query(
            "SELECT secret_nonce, secret_enc, user_name FROM access_keys WHERE access_key_id = ?",
        )
        .bind(id)
        .fetch_optional(&self.sqlite()?.read)
        .await?;
        Ok(row.map(|r| {
            (
                r.get("secret_nonce"),
                r.get("secret_enc"),
                r.get("user_name"),
            )
        }))
    }

    /// Access keys: (id, name, user, created_at ms), newest first; only `user`'s when given.
    pub async fn list_access_keys(
        &self,
        user: Option<&str>,
    ) -> Result<Vec<(String, String, String, i64)>> {
        let rows = sqlx::query(
            "SELECT access_key_id, name, user_name, created_at FROM access_keys \
             WHERE ?1 IS NULL OR user_name = ?1 ORDER BY created_at DESC",
        )
        .bind(user)
        .fetch_all(&self.sqlite()?.read)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get("access_key_id"),
                    r.get("name"),
                    r.get("user_name"),
                    r.get("created_at"),
                )
            })
            .collect())
    }

    /// Commands matching `q`, newest first, `limit` from `offset`, each with its SSM-only members.
    pub async fn query_commands(
        &self,
        q: &CommandQuery,
        offset: u64,
        limit: u32,
    ) -> Result<Vec<(Command, serde_json::Value)>> {
        let mut qb: QueryBuilder<Sqlite> =
            QueryBuilder::new("SELECT c.* FROM commands c WHERE 1 = 1");
        push_command_filters(&mut qb, q, true);
        qb.push(" ORDER BY c.requested_at DESC, c.command_id DESC LIMIT ");
        qb.push_bind(i64::from(limit));
        qb.push(" OFFSET ");
        qb.push_bind(i64::try_from(offset).unwrap_or(i64::MAX));
        let rows = qb.build().fetch_all(&self.sqlite()?.read).await?;
        rows.iter()
            .map(|r| Ok((command_record(r)?.into(), extra(r))))
            .collect()
    }

    /// Invocations matching `q` (newest command first, then dispatch order), with their command's
    /// members SSM shows beside each.
    pub async fn query_invocations(
        &self,
        q: &CommandQuery,
        offset: u64,
        limit: u32,
    ) -> Result<Vec<(Invocation, CommandMeta)>> {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT i.*, c.comment AS c_comment, c.document_name AS c_document, c.requested_at AS c_requested,
                    c.ssm_extra AS ssm_extra, c.output_s3_bucket, c.output_s3_prefix, c.output_s3_region,
                    c.output_s3_plugin_dir, e.attempts AS e_attempts, e.last_error AS e_error,
                    e.next_attempt_at AS e_next
             FROM invocations i JOIN commands c ON c.command_id = i.command_id
             LEFT JOIN s3_exports e ON e.command_id = i.command_id AND e.node_id = i.node_id
             WHERE 1 = 1",
        );
        push_command_filters(&mut qb, q, false);
        qb.push(" ORDER BY c.requested_at DESC, c.command_id DESC, i.seq LIMIT ");
        qb.push_bind(i64::from(limit));
        qb.push(" OFFSET ");
        qb.push_bind(i64::try_from(offset).unwrap_or(i64::MAX));
        let rows = qb.build().fetch_all(&self.sqlite()?.read).await?;
        rows.iter()
            .map(|r| {
                let meta = CommandMeta {
                    comment: r.get("c_comment"),
                    document_name: r.get("c_document"),
                    requested_at: r.get("c_requested"),
                    ssm_extra: extra(r),
                    output_s3: output_s3(r),
                };
                let mut inv: Invocation = invocation_record(r)?.into();
                inv.output_s3_pending = export_pending(r);
                Ok((inv, meta))
            })
            .collect()
    }
}

fn output_s3(r: &sqlx::sqlite::SqliteRow) -> Option<super::S3Output> {
    let bucket: String = r.get("output_s3_bucket");
    (!bucket.is_empty()).then(|| super::S3Output {
        target: fleetrun_proto::api::OutputS3 {
            bucket,
            prefix: r.get("output_s3_prefix"),
            region: r.get("output_s3_region"),
        },
        plugin_dir: r.get("output_s3_plugin_dir"),
    })
}

/// An invocation's export that has not succeeded yet, in words (from the joined `s3_exports` row).
fn export_pending(r: &sqlx::sqlite::SqliteRow) -> Option<String> {
    let attempts: i64 = r.get::<Option<i64>, _>("e_attempts")?;
    let error: String = r.get::<Option<String>, _>("e_error").unwrap_or_default();
    let next: i64 = r.get::<Option<i64>, _>("e_next").unwrap_or_default();
    Some(super::exports::pending_text(
        attempts.max(0) as u32,
        &error,
        next,
    ))
}

fn extra(r: &sqlx::sqlite::SqliteRow) -> serde_json::Value {
    serde_json::from_str(r.get::<&str, _>("ssm_extra")).unwrap_or_default()
}

/// Adds `q`'s filters; `on_command` says whether status filters apply to the command or the
/// invocation (`i`).
fn push_command_filters(qb: &mut QueryBuilder<Sqlite>, q: &CommandQuery, on_command: bool) {
    if let Some(id) = &q.command_id {
        qb.push(" AND c.command_id = ")
            .push_bind(id.as_str().to_owned());
    }
    if let Some(node) = &q.node_id {
        if on_command {
            qb.push(" AND c.command_id IN (SELECT command_id FROM invocations WHERE node_id = ")
                .push_bind(node.as_str().to_owned())
                .push(")");
        } else {
            qb.push(" AND i.node_id = ")
                .push_bind(node.as_str().to_owned());
        }
    }
    if let Some(t) = q.invoked_after {
        qb.push(" AND c.requested_at >= ").push_bind(t);
    }
    if let Some(t) = q.invoked_before {
        qb.push(" AND c.requested_at <= ").push_bind(t);
    }
    if let Some(d) = &q.document_name {
        qb.push(" AND c.document_name = ").push_bind(d.clone());
    }
    let status_col = if on_command { "c.status" } else { "i.status" };
    if let Some(s) = &q.status {
        qb.push(format_args!(" AND {status_col} = "))
            .push_bind(s.clone());
    }
    if let Some(visible) = &q.visible {
        let json = visible_json(Some(visible));
        if on_command {
            qb.push(" AND c.command_id IN (SELECT command_id FROM invocations WHERE node_id IN (SELECT value FROM json_each(")
                .push_bind(json)
                .push(")))");
        } else {
            qb.push(" AND i.node_id IN (SELECT value FROM json_each(")
                .push_bind(json)
                .push("))");
        }
    }
    match q.complete {
        Some(true) => {
            qb.push(format_args!(" AND {status_col} IN {TERMINAL}"));
        }
        Some(false) => {
            qb.push(format_args!(" AND {status_col} NOT IN {TERMINAL}"));
        }
        None => {}
    }
}
