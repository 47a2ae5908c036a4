//! API tokens, activations, nodes and their tags.

use super::{Result, Store, edge};
use fleetrun_proto::api::{Activation, Node};
use fleetrun_proto::channel::NodeInfo;
use fleetrun_proto::targets::{TargetExpr, TargetTerm};
use fleetrun_proto::time::now_ms;
use fleetrun_proto::{CommandId, NodeId};
use sqlx::{QueryBuilder, Row, Sqlite};
use std::collections::{BTreeMap, HashMap};

/// A node as authorization policies see it: its id, name and tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRef {
    /// Its id (the entity id).
    pub node_id: NodeId,
    /// Its name (`resource.name`).
    pub name: String,
    /// Its tags (Cedar entity tags).
    pub tags: BTreeMap<String, String>,
}

/// Why a registration was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// No activation has this code.
    #[error("unknown activation code")]
    UnknownCode,
    /// The activation has expired.
    #[error("the activation expired at {0}")]
    Expired(String),
    /// The activation's registration limit is used up.
    #[error("the activation's registration limit ({0}) is used up")]
    LimitReached(u64),
    /// The node id asked for (an EC2 instance id) is already a node's, deregistered or not.
    #[error("the node id is already another node's")]
    IdTaken,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] super::StoreError),
}

/// The keys a node may authenticate with (hex Ed25519 public keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeKeys {
    /// Its key; `None` for a node registered with protocol version 1 (it must register again).
    pub current: Option<String>,
    /// The key before the last rotation, until the node proves the new one.
    pub previous: Option<String>,
    /// Whether the node was deregistered.
    pub deregistered: bool,
}

/// A node's row, as stored (`edge::node` presents it).
#[derive(Clone, Debug)]
pub(crate) struct NodeRecord {
    pub(crate) node_id: NodeId,
    pub(crate) name: String,
    pub(crate) hostname: String,
    pub(crate) os: String,
    pub(crate) platform: String,
    pub(crate) arch: String,
    pub(crate) ips: Vec<String>,
    pub(crate) agent_version: String,
    pub(crate) tags: BTreeMap<String, String>,
    pub(crate) activation_id: String,
    /// Epoch ms.
    pub(crate) registered_at: i64,
    /// Epoch ms: the last connect, or the last time a connection was seen alive.
    pub(crate) last_seen_at: i64,
    /// Hex Ed25519 public key; `None` for a node registered with protocol version 1.
    pub(crate) public_key: Option<String>,
    /// Epoch ms of the last key rotation, if any.
    pub(crate) key_rotated_at: Option<i64>,
}

/// An activation's row, as stored (`edge::activation` presents it).
#[derive(Clone, Debug)]
pub(crate) struct ActivationRecord {
    pub(crate) activation_id: String,
    pub(crate) tags: BTreeMap<String, String>,
    pub(crate) limit: u64,
    pub(crate) registrations: u64,
    pub(crate) description: String,
    /// Epoch ms.
    pub(crate) created_at: i64,
    /// Epoch ms.
    pub(crate) expires_at: i64,
    pub(crate) default_instance_name: String,
    pub(crate) iam_role: String,
}

/// A node to create at registration.
pub struct NewNode {
    /// Its id.
    pub node_id: NodeId,
    /// Its Ed25519 public key, hex.
    pub public_key: String,
    /// What its agent reported.
    pub info: NodeInfo,
    /// Tags the agent asked for (the activation's are added, and win on conflict).
    pub tags: BTreeMap<String, String>,
}

impl Store {
    /// Whether any API token exists (first start creates the admin token).
    pub async fn has_api_tokens(&self) -> Result<bool> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_tokens")
            .fetch_one(&self.sqlite()?.read)
            .await?;
        Ok(n > 0)
    }

    /// Creates an activation.
    #[allow(clippy::too_many_arguments)]
    pub async fn insert_activation(
        &self,
        activation_id: &str,
        code_hash: &str,
        tags: &BTreeMap<String, String>,
        limit: u64,
        description: &str,
        created_at: i64,
        expires_at: i64,
        names: (&str, &str),
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO activations (activation_id, code_hash, tags, reg_limit, description, created_at, expires_at,
                                      default_instance_name, iam_role)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(activation_id)
        .bind(code_hash)
        .bind(serde_json::to_string(tags)?)
        .bind(limit as i64)
        .bind(description)
        .bind(created_at)
        .bind(expires_at)
        .bind(names.0)
        .bind(names.1)
        .execute(&self.sqlite()?.write)
        .await?;
        Ok(())
    }

    /// Deletes an activation: no node registers with it from then on (those that did stay);
    /// false when there was none.
    pub async fn delete_activation(&self, activation_id: &str) -> Result<bool> {
        Ok(
            sqlx::query("DELETE FROM activations WHERE activation_id = ?")
                .bind(activation_id)
                .execute(&self.sqlite()?.write)
                .await?
                .rows_affected()
                == 1,
        )
    }

    /// Every activation, newest first (codes are not stored, so `code` is empty).
    pub async fn list_activations(&self) -> Result<Vec<Activation>> {
        let rows = sqlx::query(
            "SELECT activation_id, tags, reg_limit, registrations, description, created_at, expires_at,
                    default_instance_name, iam_role
             FROM activations ORDER BY created_at DESC",
        )
        .fetch_all(&self.sqlite()?.read)
        .await?;
        let now = now_ms();
        rows.iter()
            .map(|r| Ok(edge::activation(activation_record(r)?, now)))
            .collect()
    }

    /// Registers a node with an activation code, in one transaction: the activation's count and the
    /// node row move together, so a limit is never exceeded.
    pub async fn register_node(&self, code_hash: &str, node: NewNode) -> Result<(), RegisterError> {
        let mut tx = self
            .sqlite()?
            .write
            .begin()
            .await
            .map_err(super::StoreError::from)?;
        let row = sqlx::query(
            "SELECT activation_id, tags, reg_limit, registrations, expires_at, default_instance_name FROM activations WHERE code_hash = ?",
        )
        .bind(code_hash)
        .fetch_optional(&mut *tx)
        .await
        .map_err(super::StoreError::from)?
        .ok_or(RegisterError::UnknownCode)?;
        let now = now_ms();
        let expires_at: i64 = row.get("expires_at");
        if expires_at <= now {
            return Err(RegisterError::Expired(edge::expired_at(expires_at)));
        }
        let limit = row.get::<i64, _>("reg_limit");
        if row.get::<i64, _>("registrations") >= limit {
            return Err(RegisterError::LimitReached(limit as u64));
        }
        let activation_id: String = row.get("activation_id");
        // An EC2 instance id is the node's own: one already in the table (a deregistered node's
        // too, whose history keeps it) is refused before the activation is counted.
        let taken = sqlx::query("SELECT 1 FROM nodes WHERE node_id = ?")
            .bind(node.node_id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(super::StoreError::from)?;
        if taken.is_some() {
            return Err(RegisterError::IdTaken);
        }
        // SSM's DefaultInstanceName names every node of the activation.
        let default_name: String = row.get("default_instance_name");
        let name = if default_name.is_empty() {
            node.info.name.clone()
        } else {
            default_name
        };
        let mut tags = node.tags;
        let activation_tags: BTreeMap<String, String> =
            serde_json::from_str(row.get("tags")).map_err(super::StoreError::from)?;
        tags.extend(activation_tags);
        let q = async {
            sqlx::query(
                "UPDATE activations SET registrations = registrations + 1 WHERE activation_id = ?",
            )
            .bind(&activation_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO nodes (node_id, public_key, name, hostname, os, arch, ips, agent_version, tags,
                                    activation_id, registered_at, last_seen_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(node.node_id.as_str())
            .bind(&node.public_key)
            .bind(&name)
            .bind(&node.info.hostname)
            .bind(&node.info.os)
            .bind(&node.info.arch)
            .bind(serde_json::to_string(&node.info.ips).unwrap_or_else(|_| "[]".into()))
            .bind(&node.info.agent_version)
            .bind(serde_json::to_string(&tags).unwrap_or_else(|_| "{}".into()))
            .bind(&activation_id)
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            for (k, v) in &tags {
                sqlx::query("INSERT INTO node_tags (node_id, key, value) VALUES (?, ?, ?)")
                    .bind(node.node_id.as_str())
                    .bind(k)
                    .bind(v)
                    .execute(&mut *tx)
                    .await?;
            }
            Ok::<_, sqlx::Error>(())
        };
        q.await.map_err(super::StoreError::from)?;
        tx.commit().await.map_err(super::StoreError::from)?;
        Ok(())
    }

    /// The keys a node may authenticate with, if the node exists.
    pub async fn node_keys(&self, node_id: &NodeId) -> Result<Option<NodeKeys>> {
        let row: Option<(Option<String>, Option<String>, Option<i64>)> = sqlx::query_as(
            "SELECT public_key, previous_public_key, deregistered_at FROM nodes WHERE node_id = ?",
        )
        .bind(node_id.as_str())
        .fetch_optional(&self.sqlite()?.read)
        .await?;
        Ok(row.map(|(current, previous, d)| NodeKeys {
            current,
            previous,
            deregistered: d.is_some(),
        }))
    }

    /// The node proved `public_key` (a `Hello` or `KeyConfirmed` with its current key): the previous
    /// key of a rotation is no longer accepted.
    pub async fn node_key_proven(&self, node_id: &NodeId, public_key: &str) -> Result<()> {
        sqlx::query(
            "UPDATE nodes SET previous_public_key = NULL
             WHERE node_id = ? AND public_key = ? AND previous_public_key IS NOT NULL",
        )
        .bind(node_id.as_str())
        .bind(public_key)
        .execute(&self.sqlite()?.write)
        .await?;
        Ok(())
    }

    /// Replaces a node's key with `new` for a session authenticated with `old`, which stays accepted
    /// as the previous key until the new one is proven. Idempotent: a rotation to the current key
    /// changes nothing. `Ok(false)` when `old` is no longer one of the node's keys.
    pub async fn rotate_node_key(
        &self,
        node_id: &NodeId,
        old: &str,
        new: &str,
        now: i64,
    ) -> Result<bool> {
        // One statement: the check and the change cannot interleave with another rotation.
        let r = sqlx::query(
            "UPDATE nodes SET
                 previous_public_key = CASE WHEN public_key = ?2 THEN previous_public_key ELSE ?1 END,
                 key_rotated_at = CASE WHEN public_key = ?2 THEN key_rotated_at ELSE ?3 END,
                 public_key = ?2
             WHERE node_id = ?4 AND deregistered_at IS NULL
               AND (public_key = ?2 OR public_key = ?1 OR previous_public_key = ?1)",
        )
        .bind(old)
        .bind(new)
        .bind(now)
        .bind(node_id.as_str())
        .execute(&self.sqlite()?.write)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Marks a node deregistered (its row stays, for history). False when it was not registered.
    pub async fn deregister_node(&self, node_id: &NodeId, now: i64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE nodes SET deregistered_at = ? WHERE node_id = ? AND deregistered_at IS NULL",
        )
        .bind(now)
        .bind(node_id.as_str())
        .execute(&self.sqlite()?.write)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Records a connect: what the agent reports now, and the time.
    pub async fn node_connected(&self, node_id: &NodeId, info: &NodeInfo) -> Result<()> {
        sqlx::query(
            // A node of an activation with a default instance name keeps that name.
            "UPDATE nodes SET name = CASE WHEN COALESCE((SELECT default_instance_name FROM activations a
                                                          WHERE a.activation_id = nodes.activation_id), '') = ''
                                          THEN ?1 ELSE name END,
                              hostname = ?2, os = ?3, arch = ?4, ips = ?5, agent_version = ?6, last_seen_at = ?7
             WHERE node_id = ?8",
        )
        .bind(&info.name)
        .bind(&info.hostname)
        .bind(&info.os)
        .bind(&info.arch)
        .bind(serde_json::to_string(&info.ips)?)
        .bind(&info.agent_version)
        .bind(now_ms())
        .bind(node_id.as_str())
        .execute(&self.sqlite()?.write)
        .await?;
        Ok(())
    }

    /// Records the time a node was last connected.
    pub async fn node_seen(&self, node_id: &NodeId) -> Result<()> {
        sqlx::query("UPDATE nodes SET last_seen_at = ? WHERE node_id = ?")
            .bind(now_ms())
            .bind(node_id.as_str())
            .execute(&self.sqlite()?.write)
            .await?;
        Ok(())
    }

    /// Every node, by name; `online` tells the ping status.
    pub async fn list_nodes(&self, online: impl Fn(&NodeId) -> bool) -> Result<Vec<Node>> {
        let rows = sqlx::query(NODE_SELECT_ALL)
            .fetch_all(&self.sqlite()?.read)
            .await?;
        let now = now_ms();
        rows.iter()
            .map(|r| {
                let rec = node_record(r)?;
                let online = online(&rec.node_id);
                Ok(edge::node(rec, online, now))
            })
            .collect()
    }

    /// One node.
    pub async fn get_node(
        &self,
        node_id: &NodeId,
        online: impl Fn(&NodeId) -> bool,
    ) -> Result<Option<Node>> {
        let row = sqlx::query(NODE_SELECT_ONE)
            .bind(node_id.as_str())
            .fetch_optional(&self.sqlite()?.read)
            .await?;
        let Some(rec) = row.as_ref().map(node_record).transpose()? else {
            return Ok(None);
        };
        let online = online(&rec.node_id);
        Ok(Some(edge::node(rec, online, now_ms())))
    }

    /// Nodes as policies see them (crate::authz): these ids, or every node ever registered (deregistered
    /// ones too: their history stays readable to whom it was).
    pub async fn node_refs(&self, ids: Option<&[NodeId]>) -> Result<Vec<NodeRef>> {
        let Some(ids) = ids else {
            let rows = sqlx::query("SELECT node_id, name, tags FROM nodes")
                .fetch_all(&self.sqlite()?.read)
                .await?;
            return rows.iter().map(node_ref).collect();
        };
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("SELECT node_id, name, tags FROM nodes WHERE node_id IN (");
            let mut sep = qb.separated(", ");
            for id in chunk {
                sep.push_bind(id.as_str());
            }
            qb.push(")");
            for r in qb.build().fetch_all(&self.sqlite()?.read).await? {
                out.push(node_ref(&r)?);
            }
        }
        Ok(out)
    }

    /// The nodes of a command's invocations, as policies see them.
    pub async fn command_node_refs(&self, command: &CommandId) -> Result<Vec<NodeRef>> {
        let rows = sqlx::query(
            "SELECT n.node_id, n.name, n.tags FROM invocations i JOIN nodes n ON n.node_id = i.node_id \
             WHERE i.command_id = ? ORDER BY i.seq",
        )
        .bind(command.as_str())
        .fetch_all(&self.sqlite()?.read)
        .await?;
        rows.iter().map(node_ref).collect()
    }

    /// Node ids and names among `ids` that exist.
    pub async fn node_names(&self, ids: &[NodeId]) -> Result<Vec<(NodeId, String)>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "SELECT node_id, name FROM nodes WHERE deregistered_at IS NULL AND node_id IN (",
            );
            let mut sep = qb.separated(", ");
            for id in chunk {
                sep.push_bind(id.as_str());
            }
            qb.push(")");
            for r in qb.build().fetch_all(&self.sqlite()?.read).await? {
                if let Ok(id) = r.get::<String, _>("node_id").parse() {
                    out.push((id, r.get("name")));
                }
            }
        }
        Ok(out)
    }

    /// Replaces a registered node's tags with `new` if they are still `old` (compare and swap, so
    /// two changes at once never lose one); false when they changed meanwhile or the node is gone.
    /// The listing copy (`nodes.tags`) and the index (`node_tags`) change in one transaction.
    pub async fn swap_node_tags(
        &self,
        id: &NodeId,
        old: &BTreeMap<String, String>,
        new: &BTreeMap<String, String>,
    ) -> Result<bool> {
        let mut tx = self.sqlite()?.write.begin().await?;
        let swapped = sqlx::query(
            "UPDATE nodes SET tags = ? WHERE node_id = ? AND tags = ? AND deregistered_at IS NULL",
        )
        .bind(serde_json::to_string(new)?)
        .bind(id.as_str())
        .bind(serde_json::to_string(old)?)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !swapped {
            return Ok(false);
        }
        sqlx::query("DELETE FROM node_tags WHERE node_id = ?")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        for (k, v) in new {
            sqlx::query("INSERT INTO node_tags (node_id, key, value) VALUES (?, ?, ?)")
                .bind(id.as_str())
                .bind(k)
                .bind(v)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Sets a node's platform. Every agent of channel protocol 5 and before runs on Linux (the
    /// column's default); the agent's handshake does not carry it yet, so only tests set another.
    pub async fn set_node_platform(&self, id: &NodeId, platform: &str) -> Result<()> {
        sqlx::query("UPDATE nodes SET platform = ? WHERE node_id = ?")
            .bind(platform)
            .bind(id.as_str())
            .execute(&self.sqlite()?.write)
            .await?;
        Ok(())
    }

    /// The platform of each of `ids` that is registered (`linux` for nodes that never said).
    pub async fn node_platforms(&self, ids: &[NodeId]) -> Result<HashMap<NodeId, String>> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("SELECT node_id, platform FROM nodes WHERE node_id IN (");
            let mut sep = qb.separated(", ");
            for id in chunk {
                sep.push_bind(id.as_str());
            }
            qb.push(")");
            for r in qb.build().fetch_all(&self.sqlite()?.read).await? {
                if let Ok(id) = r.get::<String, _>("node_id").parse() {
                    out.insert(id, r.get("platform"));
                }
            }
        }
        Ok(out)
    }

    /// Nodes (id, name) matching every term of a target expression, ordered by id. Each term's values
    /// are bound as one JSON array (`json_each`), so a term's size changes neither the number of SQL
    /// variables nor the expression depth; callers bound the terms (`TargetExpr::parse` caps them).
    pub async fn resolve_targets(&self, expr: &TargetExpr) -> Result<Vec<(NodeId, String)>> {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT n.node_id, n.name FROM nodes n WHERE n.deregistered_at IS NULL",
        );
        let json = |v: Vec<&str>| serde_json::Value::from(v).to_string();
        for term in &expr.0 {
            match term {
                TargetTerm::All => {}
                TargetTerm::Tag { key, values } => {
                    qb.push(" AND n.node_id IN (SELECT node_id FROM node_tags WHERE key = ");
                    qb.push_bind(key.clone());
                    qb.push(" AND value IN (SELECT value FROM json_each(");
                    qb.push_bind(json(values.iter().map(String::as_str).collect()));
                    qb.push(")))");
                }
                TargetTerm::TagKey(keys) => {
                    qb.push(
                        " AND n.node_id IN (SELECT node_id FROM node_tags WHERE key IN (SELECT value FROM json_each(",
                    );
                    qb.push_bind(json(keys.iter().map(String::as_str).collect()));
                    qb.push(")))");
                }
                TargetTerm::Ids(ids) => {
                    qb.push(" AND n.node_id IN (SELECT value FROM json_each(");
                    qb.push_bind(json(ids.iter().map(NodeId::as_str).collect()));
                    qb.push("))");
                }
            }
        }
        qb.push(" ORDER BY n.node_id");
        let rows = qb.build().fetch_all(&self.sqlite()?.read).await?;
        Ok(rows
            .iter()
            .filter_map(|r| Some((r.get::<String, _>("node_id").parse().ok()?, r.get("name"))))
            .collect())
    }
}

macro_rules! node_columns {
    () => {
        "node_id, name, hostname, os, arch, ips, agent_version, tags, activation_id, registered_at, last_seen_at, public_key, key_rotated_at, platform"
    };
}
const NODE_SELECT_ALL: &str = concat!(
    "SELECT ",
    node_columns!(),
    " FROM nodes WHERE deregistered_at IS NULL ORDER BY name, node_id"
);
const NODE_SELECT_ONE: &str = concat!(
    "SELECT ",
    node_columns!(),
    " FROM nodes WHERE node_id = ? AND deregistered_at IS NULL"
);

fn node_ref(r: &sqlx::sqlite::SqliteRow) -> Result<NodeRef> {
    let id: String = r.get("node_id");
    Ok(NodeRef {
        node_id: id
            .parse()
            .map_err(|_| super::StoreError::Missing("valid node id"))?,
        name: r.get("name"),
        tags: serde_json::from_str(r.get("tags"))?,
    })
}

fn node_record(r: &sqlx::sqlite::SqliteRow) -> Result<NodeRecord> {
    let id: String = r.get("node_id");
    Ok(NodeRecord {
        node_id: id.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        name: r.get("name"),
        hostname: r.get("hostname"),
        os: r.get("os"),
        platform: r.get("platform"),
        arch: r.get("arch"),
        ips: serde_json::from_str(r.get("ips"))?,
        agent_version: r.get("agent_version"),
        tags: serde_json::from_str(r.get("tags"))?,
        activation_id: r.get("activation_id"),
        registered_at: r.get("registered_at"),
        last_seen_at: r.get("last_seen_at"),
        public_key: r.get("public_key"),
        key_rotated_at: r.get("key_rotated_at"),
    })
}

fn activation_record(r: &sqlx::sqlite::SqliteRow) -> Result<ActivationRecord> {
    Ok(ActivationRecord {
        activation_id: r.get("activation_id"),
        tags: serde_json::from_str(r.get("tags"))?,
        limit: r.get::<i64, _>("reg_limit") as u64,
        registrations: r.get::<i64, _>("registrations") as u64,
        description: r.get("description"),
        created_at: r.get("created_at"),
        expires_at: r.get("expires_at"),
        default_instance_name: r.get("default_instance_name"),
        iam_role: r.get("iam_role"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store with nodes mi-0..mi-(n-1), node i tagged `env=e{i}` and `k{i % 2}=x`.
    async fn store_with_nodes(dir: &std::path::Path, n: u128) -> Store {
        let store = Store::open_sqlite(&dir.join("db.sqlite")).await.unwrap();
        for i in 0..n {
            let id = NodeId::from_random(i);
            sqlx::query(
                "INSERT INTO nodes (node_id, name, hostname, os, arch, ips, agent_version, tags, activation_id, registered_at, last_seen_at)
                 VALUES (?, ?, 'h', 'linux', 'x86_64', '[]', '1', '{}', 'a', 0, 0)",
            )
            .bind(id.as_str())
            .bind(format!("n{i}"))
            .execute(&store.sqlite().unwrap().write)
            .await
            .unwrap();
            for (k, v) in [
                ("env".to_owned(), format!("e{i}")),
                (format!("k{}", i % 2), "x".into()),
            ] {
                sqlx::query("INSERT INTO node_tags (node_id, key, value) VALUES (?, ?, ?)")
                    .bind(id.as_str())
                    .bind(k)
                    .bind(v)
                    .execute(&store.sqlite().unwrap().write)
                    .await
                    .unwrap();
            }
        }
        store
    }

    /// 40,000 values in one term (past SQLite's 32,766 variables when each value was bound on its
    /// own: "too many SQL variables", a 500) resolve correctly, whatever the term kind.
    #[tokio::test]
    async fn terms_of_any_size_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_nodes(dir.path(), 6).await;
        let mut values: Vec<String> = (0..40_000).map(|i| format!("e{}", i + 1_000)).collect();
        values.extend(["e1".into(), "e4".into()]);
        let mut ids: Vec<NodeId> = (10_000..50_000u128).map(NodeId::from_random).collect();
        ids.extend([1, 2, 4].map(NodeId::from_random));
        let mut keys: Vec<String> = (0..40_000).map(|i| format!("key{i}")).collect();
        keys.push("k0".into());
        let expr = TargetExpr(vec![
            TargetTerm::Tag {
                key: "env".into(),
                values,
            },
            TargetTerm::Ids(ids),
            TargetTerm::TagKey(keys),
        ]);
        let found: Vec<NodeId> = store
            .resolve_targets(&expr)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(found, vec![NodeId::from_random(4)]);
    }
}
