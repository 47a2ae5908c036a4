//! The durable queue of output exports to S3 (SSM's `OutputS3BucketName`): a row per ended
//! invocation of a command that asked for it, written with its end (see `finish_invocations`),
//! drained by the server's exporter, and deleted only once the output is in the bucket.

use super::{Columns, Result, Store, with_pool};
use fleetrun_proto::api::OutputS3;
use fleetrun_proto::{CommandId, NodeId};
use std::collections::HashMap;

/// Longest upload error kept with a row (the rest is cut).
pub const EXPORT_ERROR_MAX: usize = 1000;

/// A queued export, with where it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportRow {
    /// The command.
    pub command_id: CommandId,
    /// The node.
    pub node_id: NodeId,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Bucket, prefix, region.
    pub target: OutputS3,
    /// The key part after the node id (`awsrunShellScript/0.awsrunShellScript`).
    pub plugin_dir: String,
}

/// Where an export that has not succeeded yet stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportState {
    /// Failed attempts so far (0: not tried yet).
    pub attempts: u32,
    /// The last attempt's error ("" before the first).
    pub last_error: String,
    /// Epoch ms of the next attempt.
    pub next_attempt_at: i64,
}

/// An export that has not succeeded yet, in words: queued, or the last error and the next try.
pub fn pending_text(attempts: u32, last_error: &str, next_attempt_at: i64) -> String {
    if attempts == 0 {
        return "queued: the output is not in its S3 bucket yet".to_owned();
    }
    format!(
        "not in its S3 bucket yet: attempt {attempts} failed: {last_error}; next attempt at {}",
        fleetrun_proto::time::rfc3339(next_attempt_at)
    )
}

impl ExportState {
    /// This state in words (see `pending_text`).
    pub fn text(&self) -> String {
        pending_text(self.attempts, &self.last_error, self.next_attempt_at)
    }
}

fn attempts(r: &impl Columns) -> u32 {
    r.int("attempts").clamp(0, i64::from(u32::MAX)) as u32
}

impl Store {
    /// Up to `limit` queued exports due at `due_by` (epoch ms) or before, the oldest due first.
    pub async fn due_exports(&self, due_by: i64, limit: u32) -> Result<Vec<ExportRow>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(
                "SELECT e.command_id, e.node_id, e.attempts, c.output_s3_bucket,
                        c.output_s3_prefix, c.output_s3_region, c.output_s3_plugin_dir
                 FROM s3_exports e JOIN commands c ON c.command_id = e.command_id
                 WHERE e.next_attempt_at <= $1 ORDER BY e.next_attempt_at LIMIT $2",
            )
            .bind(due_by)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
            .iter()
            .filter_map(|r| {
                Some(ExportRow {
                    command_id: r.text("command_id").parse().ok()?,
                    node_id: r.text("node_id").parse().ok()?,
                    attempts: attempts(r),
                    target: OutputS3 {
                        bucket: r.text("output_s3_bucket"),
                        prefix: r.text("output_s3_prefix"),
                        region: r.text("output_s3_region"),
                    },
                    plugin_dir: r.text("output_s3_plugin_dir"),
                })
            })
            .collect()
        }))
    }

    /// Epoch ms of the earliest next attempt after `after` (epoch ms), if any is queued.
    pub async fn next_export_after(&self, after: i64) -> Result<Option<i64>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query_scalar(
                "SELECT MIN(next_attempt_at) FROM s3_exports WHERE next_attempt_at > $1",
            )
            .bind(after)
            .fetch_one(pool)
            .await?
        }))
    }

    /// How many exports are queued.
    pub async fn queued_exports(&self) -> Result<u64> {
        let n: i64 = with_pool!(self, read, |pool| {
            sqlx::query_scalar("SELECT COUNT(*) FROM s3_exports")
                .fetch_one(pool)
                .await?
        });
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The export is done: its row goes.
    pub async fn export_done(&self, id: &CommandId, node: &NodeId) -> Result<()> {
        with_pool!(self, write, |pool| {
            sqlx::query("DELETE FROM s3_exports WHERE command_id = $1 AND node_id = $2")
                .bind(id.as_str())
                .bind(node.as_str())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// An attempt failed: counted, its error kept (cut to [`EXPORT_ERROR_MAX`] bytes), the next
    /// one due at `next_attempt_at`.
    pub async fn export_failed(
        &self,
        id: &CommandId,
        node: &NodeId,
        error: &str,
        next_attempt_at: i64,
    ) -> Result<()> {
        let mut cut = error.len().min(EXPORT_ERROR_MAX);
        while !error.is_char_boundary(cut) {
            cut -= 1;
        }
        with_pool!(self, write, |pool| {
            sqlx::query(
                "UPDATE s3_exports SET attempts = attempts + 1, last_error = $1,
                   next_attempt_at = $2
                 WHERE command_id = $3 AND node_id = $4",
            )
            .bind(&error[..cut])
            .bind(next_attempt_at)
            .bind(id.as_str())
            .bind(node.as_str())
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// The exports of a command's invocations that have not succeeded yet, by node.
    pub async fn export_states(&self, id: &CommandId) -> Result<HashMap<NodeId, ExportState>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(
                "SELECT node_id, attempts, last_error, next_attempt_at FROM s3_exports
                 WHERE command_id = $1",
            )
            .bind(id.as_str())
            .fetch_all(pool)
            .await?
            .iter()
            .filter_map(|r| {
                let node = r.text("node_id").parse().ok()?;
                let state = ExportState {
                    attempts: attempts(r),
                    last_error: r.text("last_error"),
                    next_attempt_at: r.int("next_attempt_at"),
                };
                Some((node, state))
            })
            .collect()
        }))
    }

    /// The notify the exporter waits on; [`Store::wake_exports`] fires it.
    pub fn exports_notify(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.exports.clone()
    }

    /// Tells the exporter rows may have been queued (called once their output is flushed).
    pub fn wake_exports(&self) {
        self.exports.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::tests::{command_on, new_command};
    use crate::{Finish, S3Output};
    use fleetrun_proto::InvocationStatus;
    use fleetrun_proto::status::details;

    /// An invocation of a command with a bucket is queued by its end, in the same transaction;
    /// a command without one queues nothing; failures count and keep their error; done deletes;
    /// deleting the command drops its rows.
    #[tokio::test]
    async fn an_end_queues_the_export_of_a_command_with_a_bucket() {
        let (_dir, stores) = crate::testing::stores().await;
        for (_, store) in stores {
            end_queues_export(&store).await;
        }
    }

    async fn end_queues_export(store: &Store) {
        let end = |n: &NodeId| {
            vec![(
                n.clone(),
                Finish::without_running(InvocationStatus::Success, details::SUCCESS, 5, ""),
            )]
        };
        let (plain, plain_nodes) = command_on(store, 1).await;
        store
            .finish_invocations(&plain, &end(&plain_nodes[0]), None)
            .await
            .unwrap();
        assert_eq!(store.queued_exports().await.unwrap(), 0);

        let id = CommandId::from_random(7);
        let (node, other) = (NodeId::from_random(70), NodeId::from_random(71));
        let target = OutputS3 {
            bucket: "out".into(),
            prefix: "runs".into(),
            region: String::new(),
        };
        let mut c = new_command(&id, &[node.clone(), other.clone()]);
        c.output_s3 = Some(S3Output {
            target: target.clone(),
            plugin_dir: "awsrunShellScript/0.awsrunShellScript".into(),
        });
        store.insert_command(&c).await.unwrap();
        let shown = store.get_command(&id).await.unwrap().unwrap();
        assert_eq!(shown.output_s3.as_ref(), Some(&target));
        assert_eq!(store.due_exports(i64::MAX, 10).await.unwrap(), vec![]);
        store
            .finish_invocations(&id, &end(&node), None)
            .await
            .unwrap();
        // A second end changes nothing (and queues nothing twice).
        store
            .finish_invocations(&id, &end(&node), None)
            .await
            .unwrap();
        let due = store.due_exports(i64::MAX, 10).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(
            (&due[0].node_id, &due[0].target, due[0].attempts),
            (&node, &target, 0)
        );
        assert_eq!(due[0].plugin_dir, "awsrunShellScript/0.awsrunShellScript");

        let long = "é".repeat(EXPORT_ERROR_MAX);
        store.export_failed(&id, &node, &long, 1000).await.unwrap();
        assert_eq!(store.due_exports(999, 10).await.unwrap(), vec![]);
        assert_eq!(store.next_export_after(5).await.unwrap(), Some(1000));
        assert_eq!(store.next_export_after(1000).await.unwrap(), None);
        let st = &store.export_states(&id).await.unwrap()[&node];
        assert_eq!((st.attempts, st.last_error.len()), (1, EXPORT_ERROR_MAX));
        store.export_done(&id, &node).await.unwrap();
        assert_eq!(store.queued_exports().await.unwrap(), 0);
        assert_eq!(store.next_export_after(0).await.unwrap(), None);

        store
            .finish_invocations(&id, &end(&other), None)
            .await
            .unwrap();
        assert_eq!(store.queued_exports().await.unwrap(), 1);
        store.delete_commands(&[id]).await.unwrap();
        assert_eq!(store.queued_exports().await.unwrap(), 0);
    }
}
