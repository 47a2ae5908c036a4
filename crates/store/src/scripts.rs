//! Saved scripts and their versions, numbered from 1 like documents' ([`super::documents`]): a
//! script's versions are added and its latest pointer moved in one transaction each.

use super::{Columns, Lock, Result, Store, serialize, with_pool};
use fleetrun_proto::time::now_ms;

/// Most saved scripts.
pub const SCRIPTS_MAX: i64 = 1_000;
/// Most versions of one script.
pub const SCRIPT_VERSIONS_MAX: i64 = 1_000;
/// Largest page of a listing.
pub const SCRIPTS_PAGE_MAX: i64 = 1_000;

/// One version of a saved script, with its script's facts.
#[derive(Clone, Debug)]
pub struct ScriptRow {
    /// Name.
    pub name: String,
    /// This version's number.
    pub version: i64,
    /// The newest version.
    pub latest_version: i64,
    /// Description.
    pub description: String,
    /// `linux`.
    pub platform: String,
    /// Where the input comes from.
    pub input_uri: Option<String>,
    /// The output file, relative to the run's temp dir.
    pub output_path: Option<String>,
    /// The script body.
    pub body: String,
    /// Hex SHA-256 of the body.
    pub hash: String,
    /// When the script was created (epoch ms).
    pub created_at: i64,
    /// Who created it.
    pub created_by: String,
    /// When this version was made (epoch ms).
    pub updated_at: i64,
    /// Who made this version.
    pub updated_by: String,
}

/// Outcome of storing a new script or version.
pub enum ScriptWrite {
    /// Stored as this version.
    Ok(i64),
    /// A script has that name (create).
    Exists,
    /// No such script (update).
    Missing,
    /// There are [`SCRIPTS_MAX`] scripts, or the script has [`SCRIPT_VERSIONS_MAX`] versions.
    LimitExceeded,
}

fn script_row(r: &impl Columns) -> ScriptRow {
    ScriptRow {
        name: r.text("name"),
        version: r.int("version"),
        latest_version: r.int("latest_version"),
        description: r.text("description"),
        platform: r.text("platform"),
        input_uri: r.opt_text("input_uri"),
        output_path: r.opt_text("output_path"),
        body: r.text("body"),
        hash: r.text("hash"),
        created_at: r.int("created_at"),
        created_by: r.text("created_by"),
        updated_at: r.int("v_created_at"),
        updated_by: r.text("v_created_by"),
    }
}

macro_rules! script_select {
    () => {
        "SELECT s.name, s.latest_version, s.created_at, s.created_by, v.version, v.description,
                v.platform, v.input_uri, v.output_path, v.body, v.hash,
                v.created_at AS v_created_at, v.created_by AS v_created_by
           FROM scripts s JOIN script_versions v ON v.name = s.name"
    };
}

/// Inserts a version of script `$v.name` in the transaction `$tx`.
macro_rules! insert_script_version {
    ($tx:expr, $version:expr, $at:expr, $by:expr, $v:expr) => {{
        let v: &ScriptRow = $v;
        sqlx::query(
            "INSERT INTO script_versions (name, version, description, platform, input_uri,
                 output_path, body, hash, created_at, created_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&v.name)
        .bind($version)
        .bind(&v.description)
        .bind(&v.platform)
        .bind(&v.input_uri)
        .bind(&v.output_path)
        .bind(&v.body)
        .bind(&v.hash)
        .bind($at)
        .bind($by)
        .execute(&mut *$tx)
        .await?;
    }};
}

impl Store {
    /// Stores a new script as its version 1 (`v.name`, `v.created_by` and the version's fields).
    pub async fn insert_script(&self, v: &ScriptRow) -> Result<ScriptWrite> {
        with_pool!(self, write, |pool, d| {
            let mut tx = pool.begin().await?;
            serialize!(tx, d, Lock::Scripts);
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM scripts WHERE name = $1)")
                    .bind(&v.name)
                    .fetch_one(&mut *tx)
                    .await?;
            if exists {
                return Ok(ScriptWrite::Exists);
            }
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM scripts")
                .fetch_one(&mut *tx)
                .await?;
            if n >= SCRIPTS_MAX {
                return Ok(ScriptWrite::LimitExceeded);
            }
            let now = now_ms();
            sqlx::query(
                "INSERT INTO scripts (name, latest_version, created_at, created_by)
                 VALUES ($1, 1, $2, $3)",
            )
            .bind(&v.name)
            .bind(now)
            .bind(&v.created_by)
            .execute(&mut *tx)
            .await?;
            insert_script_version!(tx, 1i64, now, &v.created_by, v);
            tx.commit().await?;
            Ok(ScriptWrite::Ok(1))
        })
    }

    /// Adds a version to a script, made by `by`.
    pub async fn add_script_version(&self, v: &ScriptRow, by: &str) -> Result<ScriptWrite> {
        with_pool!(self, write, |pool, d| {
            let mut tx = pool.begin().await?;
            serialize!(tx, d, Lock::Scripts);
            let latest: Option<i64> =
                sqlx::query_scalar("SELECT latest_version FROM scripts WHERE name = $1")
                    .bind(&v.name)
                    .fetch_optional(&mut *tx)
                    .await?;
            let Some(latest) = latest else {
                return Ok(ScriptWrite::Missing);
            };
            if latest >= SCRIPT_VERSIONS_MAX {
                return Ok(ScriptWrite::LimitExceeded);
            }
            let version = latest + 1;
            insert_script_version!(tx, version, now_ms(), by, v);
            sqlx::query("UPDATE scripts SET latest_version = $1 WHERE name = $2")
                .bind(version)
                .bind(&v.name)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(ScriptWrite::Ok(version))
        })
    }

    /// One version of a script (None: the latest); None when either does not exist.
    pub async fn get_script(&self, name: &str, version: Option<i64>) -> Result<Option<ScriptRow>> {
        Ok(with_pool!(self, read, |pool| {
            match version {
                Some(n) => {
                    sqlx::query(concat!(
                        script_select!(),
                        " WHERE s.name = $1 AND v.version = $2"
                    ))
                    .bind(name)
                    .bind(n)
                    .fetch_optional(pool)
                    .await?
                }
                None => {
                    sqlx::query(concat!(
                        script_select!(),
                        " WHERE s.name = $1 AND v.version = s.latest_version"
                    ))
                    .bind(name)
                    .fetch_optional(pool)
                    .await?
                }
            }
            .as_ref()
            .map(script_row)
        }))
    }

    /// Scripts at their latest versions, by name: at most `limit` after the name `after`.
    pub async fn list_scripts(&self, after: Option<&str>, limit: i64) -> Result<Vec<ScriptRow>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(concat!(
                script_select!(),
                " AND v.version = s.latest_version WHERE s.name > $1 ORDER BY s.name LIMIT $2"
            ))
            .bind(after.unwrap_or(""))
            .bind(limit.clamp(1, SCRIPTS_PAGE_MAX))
            .fetch_all(pool)
            .await?
            .iter()
            .map(script_row)
            .collect()
        }))
    }

    /// Deletes a script and all its versions; false when there was none.
    pub async fn delete_script(&self, name: &str) -> Result<bool> {
        with_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM script_versions WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            let r = sqlx::query("DELETE FROM scripts WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(r.rows_affected() > 0)
        })
    }
}

impl Store {
    /// The saved script (name, version) a command ran, if it ran one.
    pub async fn script_run(
        &self,
        command_id: &fleetrun_proto::CommandId,
    ) -> Result<Option<(String, i64)>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query("SELECT name, version FROM script_runs WHERE command_id = $1")
                .bind(command_id.as_str())
                .fetch_optional(pool)
                .await?
                .map(|r| (r.text("name"), r.int("version")))
        }))
    }

    /// The files of the script run a command is, when it has an input or an output.
    pub async fn script_files(
        &self,
        command_id: &fleetrun_proto::CommandId,
    ) -> Result<Option<crate::ScriptFiles>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query("SELECT input_uri, output_path FROM script_runs WHERE command_id = $1")
                .bind(command_id.as_str())
                .fetch_optional(pool)
                .await?
                .map(|r| crate::ScriptFiles {
                    input: r.opt_text("input_uri"),
                    output: r.opt_text("output_path"),
                })
        })
        .filter(crate::ScriptFiles::any))
    }

    /// Records the temp dir made on a node for a script run (phase `made`), before anything
    /// goes into it, so it is removed even if the server stops next.
    pub async fn script_node_made(
        &self,
        command_id: &fleetrun_proto::CommandId,
        node_id: &fleetrun_proto::NodeId,
        dir: &str,
    ) -> Result<()> {
        with_pool!(self, write, |pool| {
            sqlx::query(
                "INSERT INTO script_run_nodes (command_id, node_id, dir, phase)
                 VALUES ($1, $2, $3, 'made')
                 ON CONFLICT (command_id, node_id) DO UPDATE SET dir = excluded.dir, phase = 'made'",
            )
            .bind(command_id.as_str())
            .bind(node_id.as_str())
            .bind(dir)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// The temp dir of a node's script run and its phase.
    pub async fn script_node(
        &self,
        command_id: &fleetrun_proto::CommandId,
        node_id: &fleetrun_proto::NodeId,
    ) -> Result<Option<ScriptNodeDir>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(
                "SELECT command_id, node_id, dir, phase FROM script_run_nodes
                 WHERE command_id = $1 AND node_id = $2",
            )
            .bind(command_id.as_str())
            .bind(node_id.as_str())
            .fetch_optional(pool)
            .await?
            .as_ref()
            .and_then(script_node_row)
        }))
    }

    /// A node's script run temp dir was removed.
    pub async fn script_node_removed(
        &self,
        command_id: &fleetrun_proto::CommandId,
        node_id: &fleetrun_proto::NodeId,
    ) -> Result<()> {
        with_pool!(self, write, |pool| {
            sqlx::query(
                "UPDATE script_run_nodes SET phase = 'removed'
                 WHERE command_id = $1 AND node_id = $2",
            )
            .bind(command_id.as_str())
            .bind(node_id.as_str())
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Temp dirs still on nodes whose invocation has ended (so nothing uses them any more), at
    /// most [`SCRIPT_NODES_BATCH`].
    pub async fn script_nodes_to_clean(&self) -> Result<Vec<ScriptNodeDir>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(
                "SELECT s.command_id, s.node_id, s.dir, s.phase FROM script_run_nodes s
                 JOIN invocations i ON i.command_id = s.command_id AND i.node_id = s.node_id
                 WHERE s.phase = 'made'
                   AND i.status IN ('Success', 'Failed', 'TimedOut', 'Cancelled')
                 LIMIT $1",
            )
            .bind(SCRIPT_NODES_BATCH)
            .fetch_all(pool)
            .await?
            .iter()
            .filter_map(script_node_row)
            .collect()
        }))
    }
}

/// Most temp dirs one cleanup pass looks at.
pub const SCRIPT_NODES_BATCH: i64 = 100;

/// A script run's temp dir on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScriptNodeDir {
    /// The command.
    pub command_id: fleetrun_proto::CommandId,
    /// The node.
    pub node_id: fleetrun_proto::NodeId,
    /// The dir's absolute path on the node.
    pub dir: String,
    /// `made` or `removed`.
    pub phase: String,
}

fn script_node_row(r: &impl Columns) -> Option<ScriptNodeDir> {
    Some(ScriptNodeDir {
        command_id: r.text("command_id").parse().ok()?,
        node_id: r.text("node_id").parse().ok()?,
        dir: r.text("dir"),
        phase: r.text("phase"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, body: &str) -> ScriptRow {
        ScriptRow {
            name: name.to_owned(),
            version: 0,
            latest_version: 0,
            description: "d".to_owned(),
            platform: "linux".to_owned(),
            input_uri: None,
            output_path: Some("out.txt".to_owned()),
            body: body.to_owned(),
            hash: format!("h-{body}"),
            created_at: 0,
            created_by: "admin".to_owned(),
            updated_at: 0,
            updated_by: String::new(),
        }
    }

    #[tokio::test]
    async fn versions_are_kept_until_delete() {
        let (_dir, stores) = crate::testing::stores().await;
        for (_, store) in stores {
            versions_kept(store).await;
        }
    }

    async fn versions_kept(store: Store) {
        assert!(matches!(
            store
                .insert_script(&row("a", "echo 1"))
                .await
                .expect("insert"),
            ScriptWrite::Ok(1)
        ));
        assert!(matches!(
            store
                .insert_script(&row("a", "echo x"))
                .await
                .expect("insert"),
            ScriptWrite::Exists
        ));
        assert!(matches!(
            store
                .add_script_version(&row("a", "echo 2"), "op")
                .await
                .expect("add"),
            ScriptWrite::Ok(2)
        ));
        assert!(matches!(
            store
                .add_script_version(&row("b", "echo 2"), "op")
                .await
                .expect("add"),
            ScriptWrite::Missing
        ));
        let latest = store.get_script("a", None).await.expect("get").expect("a");
        assert_eq!((latest.version, latest.body.as_str()), (2, "echo 2"));
        assert_eq!(
            (latest.created_by.as_str(), latest.updated_by.as_str()),
            ("admin", "op")
        );
        let first = store
            .get_script("a", Some(1))
            .await
            .expect("get")
            .expect("v1");
        assert_eq!((first.body.as_str(), first.latest_version), ("echo 1", 2));
        store.insert_script(&row("b", "echo b")).await.expect("b");
        let page = store.list_scripts(None, 1).await.expect("list");
        assert_eq!(page.len(), 1);
        assert_eq!((page[0].name.as_str(), page[0].version), ("a", 2));
        let next = store.list_scripts(Some("a"), 10).await.expect("list");
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].name, "b");
        assert!(store.delete_script("a").await.expect("delete"));
        assert!(!store.delete_script("a").await.expect("delete"));
        assert!(store.get_script("a", Some(1)).await.expect("get").is_none());
    }
}
