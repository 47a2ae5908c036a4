//! API tokens, activations, nodes and their tags.

use super::{Columns, Dialect, Lock, Result, Sql, Store, StoreError, edge, serialize, with_pool};
use fleetrun_proto::api::{Activation, Node};
use fleetrun_proto::channel::NodeInfo;
use fleetrun_proto::targets::{TargetExpr, TargetTerm};
use fleetrun_proto::time::now_ms;
use fleetrun_proto::{CommandId, NodeId};
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
    Store(#[from] StoreError),
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
    /// The replica holding its connection ('' for none), as last recorded.
    pub(crate) connected_to: String,
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
        Ok(with_pool!(self, read, |pool| {
            sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM api_tokens)")
                .fetch_one(pool)
                .await?
        }))
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
        let tags = serde_json::to_string(tags)?;
        with_pool!(self, write, |pool| {
            sqlx::query(
                "INSERT INTO activations (activation_id, code_hash, tags, reg_limit, description, created_at,
                                          expires_at, default_instance_name, iam_role)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(activation_id)
            .bind(code_hash)
            .bind(&tags)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(description)
            .bind(created_at)
            .bind(expires_at)
            .bind(names.0)
            .bind(names.1)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Deletes an activation: no node registers with it from then on (those that did stay);
    /// false when there was none.
    pub async fn delete_activation(&self, activation_id: &str) -> Result<bool> {
        let n = with_pool!(self, write, |pool| {
            sqlx::query("DELETE FROM activations WHERE activation_id = $1")
                .bind(activation_id)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(n == 1)
    }

    /// Every activation, newest first (codes are not stored, so `code` is empty).
    pub async fn list_activations(&self) -> Result<Vec<Activation>> {
        let now = now_ms();
        with_pool!(self, read, |pool| {
            sqlx::query(
                "SELECT activation_id, tags, reg_limit, registrations, description, created_at, expires_at,
                        default_instance_name, iam_role
                 FROM activations ORDER BY created_at DESC, activation_id DESC",
            )
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| Ok(edge::activation(activation_record(r)?, now)))
            .collect()
        })
    }

    /// Registers a node with an activation code, in one transaction: the activation's count and the
    /// node row move together, so a limit is never exceeded.
    pub async fn register_node(&self, code_hash: &str, node: NewNode) -> Result<(), RegisterError> {
        let now = now_ms();
        let ips = serde_json::to_string(&node.info.ips).map_err(StoreError::from)?;
        with_pool!(self, write, |pool, d| {
            let mut tx = pool.begin().await.map_err(StoreError::from)?;
            // The limit and the taken ids are read, then written: two registrations at once (server
            // replicas on one PostgreSQL) must not both pass them.
            serialize!(tx, d, Lock::Registrations);
            let row = sqlx::query(
                "SELECT activation_id, tags, reg_limit, registrations, expires_at, default_instance_name
                 FROM activations WHERE code_hash = $1",
            )
            .bind(code_hash)
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::from)?
            .ok_or(RegisterError::UnknownCode)?;
            let expires_at = row.int("expires_at");
            if expires_at <= now {
                return Err(RegisterError::Expired(edge::expired_at(expires_at)));
            }
            let limit = row.int("reg_limit");
            if row.int("registrations") >= limit {
                return Err(RegisterError::LimitReached(limit.max(0) as u64));
            }
            let activation_id = row.text("activation_id");
            // An EC2 instance id is the node's own: one already in the table (a deregistered node's
            // too, whose history keeps it) is refused before the activation is counted.
            let taken: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM nodes WHERE node_id = $1)")
                    .bind(node.node_id.as_str())
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
            if taken {
                return Err(RegisterError::IdTaken);
            }
            // SSM's DefaultInstanceName names every node of the activation.
            let default_name = row.text("default_instance_name");
            let name = if default_name.is_empty() {
                node.info.name.clone()
            } else {
                default_name
            };
            let mut tags = node.tags;
            let activation_tags: BTreeMap<String, String> =
                serde_json::from_str(&row.text("tags")).map_err(StoreError::from)?;
            tags.extend(activation_tags);
            let tags_json = serde_json::to_string(&tags).map_err(StoreError::from)?;
            let q = async {
                sqlx::query(
                    "UPDATE activations SET registrations = registrations + 1 WHERE activation_id = $1",
                )
                .bind(&activation_id)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO nodes (node_id, public_key, name, hostname, os, arch, ips, agent_version, tags,
                                        activation_id, registered_at, last_seen_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                )
                .bind(node.node_id.as_str())
                .bind(&node.public_key)
                .bind(&name)
                .bind(&node.info.hostname)
                .bind(&node.info.os)
                .bind(&node.info.arch)
                .bind(&ips)
                .bind(&node.info.agent_version)
                .bind(&tags_json)
                .bind(&activation_id)
                .bind(now)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                for (k, v) in &tags {
                    sqlx::query("INSERT INTO node_tags (node_id, key, value) VALUES ($1, $2, $3)")
                        .bind(node.node_id.as_str())
                        .bind(k)
                        .bind(v)
                        .execute(&mut *tx)
                        .await?;
                }
                Ok::<_, sqlx::Error>(())
            };
            q.await.map_err(StoreError::from)?;
            tx.commit().await.map_err(StoreError::from)?;
        });
        Ok(())
    }

    /// The keys a node may authenticate with, if the node exists.
    pub async fn node_keys(&self, node_id: &NodeId) -> Result<Option<NodeKeys>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(
                "SELECT public_key, previous_public_key, deregistered_at FROM nodes WHERE node_id = $1",
            )
            .bind(node_id.as_str())
            .fetch_optional(pool)
            .await?
            .map(|r| NodeKeys {
                current: r.opt_text("public_key"),
                previous: r.opt_text("previous_public_key"),
                deregistered: r.opt_int("deregistered_at").is_some(),
            })
        }))
    }

    /// The node proved `public_key` (a `Hello` or `KeyConfirmed` with its current key): the previous
    /// key of a rotation is no longer accepted.
    pub async fn node_key_proven(&self, node_id: &NodeId, public_key: &str) -> Result<()> {
        with_pool!(self, write, |pool| {
            sqlx::query(
                "UPDATE nodes SET previous_public_key = NULL
                 WHERE node_id = $1 AND public_key = $2 AND previous_public_key IS NOT NULL",
            )
            .bind(node_id.as_str())
            .bind(public_key)
            .execute(pool)
            .await?;
        });
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
        // One statement: the check and the change cannot interleave with another rotation (on
        // PostgreSQL a second UPDATE of the row waits, then checks the row the first left).
        let n = with_pool!(self, write, |pool| {
            sqlx::query(
                "UPDATE nodes SET
                     previous_public_key = CASE WHEN public_key = $2 THEN previous_public_key ELSE $1 END,
                     key_rotated_at = CASE WHEN public_key = $2 THEN key_rotated_at ELSE $3 END,
                     public_key = $2
                 WHERE node_id = $4 AND deregistered_at IS NULL
                   AND (public_key = $2 OR public_key = $1 OR previous_public_key = $1)",
            )
            .bind(old)
            .bind(new)
            .bind(now)
            .bind(node_id.as_str())
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n > 0)
    }

    /// Marks a node deregistered (its row stays, for history). False when it was not registered.
    pub async fn deregister_node(&self, node_id: &NodeId, now: i64) -> Result<bool> {
        let n = with_pool!(self, write, |pool| {
            sqlx::query(
                "UPDATE nodes SET deregistered_at = $1 WHERE node_id = $2 AND deregistered_at IS NULL",
            )
            .bind(now)
            .bind(node_id.as_str())
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(n > 0)
    }

    /// Records a connect: what the agent reports now, and the time.
    pub async fn node_connected(
        &self,
        node_id: &NodeId,
        info: &NodeInfo,
        replica_id: &str,
    ) -> Result<()> {
        let ips = serde_json::to_string(&info.ips)?;
        with_pool!(self, write, |pool| {
            sqlx::query(
                // A node of an activation with a default instance name keeps that name.
                "UPDATE nodes SET name = CASE WHEN COALESCE((SELECT default_instance_name FROM activations a
                                                              WHERE a.activation_id = nodes.activation_id), '') = ''
                                              THEN $1 ELSE name END,
                                  hostname = $2, os = $3, arch = $4, ips = $5, agent_version = $6, last_seen_at = $7,
                                  connected_to = $9
                 WHERE node_id = $8",
            )
            .bind(&info.name)
            .bind(&info.hostname)
            .bind(&info.os)
            .bind(&info.arch)
            .bind(&ips)
            .bind(&info.agent_version)
            .bind(now_ms())
            .bind(node_id.as_str())
            .bind(replica_id)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Records the time a node was last connected, its connection to replica `replica_id`
    /// ended (unless it has connected to another since).
    pub async fn node_seen(&self, node_id: &NodeId, replica_id: &str) -> Result<()> {
        with_pool!(self, write, |pool| {
            sqlx::query(
                "UPDATE nodes SET last_seen_at = $1,
                    connected_to = CASE WHEN connected_to = $3 THEN '' ELSE connected_to END
                 WHERE node_id = $2",
            )
            .bind(now_ms())
            .bind(node_id.as_str())
            .bind(replica_id)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Every node, by name; `online` tells the ping status from the node's id and the replica
    /// last recorded as holding its connection ('' for none).
    pub async fn list_nodes(&self, online: impl Fn(&NodeId, &str) -> bool) -> Result<Vec<Node>> {
        let recs = with_pool!(self, read, |pool| {
            sqlx::query(NODE_SELECT_ALL)
                .fetch_all(pool)
                .await?
                .iter()
                .map(node_record)
                .collect::<Result<Vec<_>>>()?
        });
        let now = now_ms();
        Ok(recs
            .into_iter()
            .map(|rec| {
                let online = online(&rec.node_id, &rec.connected_to);
                edge::node(rec, online, now)
            })
            .collect())
    }

    /// One node.
    pub async fn get_node(
        &self,
        node_id: &NodeId,
        online: impl Fn(&NodeId, &str) -> bool,
    ) -> Result<Option<Node>> {
        let rec = with_pool!(self, read, |pool| {
            sqlx::query(NODE_SELECT_ONE)
                .bind(node_id.as_str())
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(node_record)
                .transpose()?
        });
        let Some(rec) = rec else {
            return Ok(None);
        };
        let online = online(&rec.node_id, &rec.connected_to);
        Ok(Some(edge::node(rec, online, now_ms())))
    }

    /// Nodes as policies see them (crate::authz), by id: these ids, or every node ever registered
    /// (deregistered ones too: their history stays readable to whom it was).
    pub async fn node_refs(&self, ids: Option<&[NodeId]>) -> Result<Vec<NodeRef>> {
        let ids = ids.map(ids_json);
        with_pool!(self, read, |pool, d| {
            let sql = format!(
                "SELECT node_id, name, tags FROM nodes WHERE $1 IS NULL OR node_id IN ({})
                 ORDER BY node_id",
                d.json_strings("$1")
            );
            // Only the dialect's fixed fragment is formatted in; the ids are bound.
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(&ids)
                .fetch_all(pool)
                .await?
                .iter()
                .map(node_ref)
                .collect()
        })
    }

    /// The nodes of a command's invocations, as policies see them, in dispatch order.
    pub async fn command_node_refs(&self, command: &CommandId) -> Result<Vec<NodeRef>> {
        with_pool!(self, read, |pool| {
            sqlx::query(
                "SELECT n.node_id, n.name, n.tags FROM invocations i JOIN nodes n ON n.node_id = i.node_id
                 WHERE i.command_id = $1 ORDER BY i.seq, n.node_id",
            )
            .bind(command.as_str())
            .fetch_all(pool)
            .await?
            .iter()
            .map(node_ref)
            .collect()
        })
    }

    /// Node ids and names among `ids` that are registered, by id.
    pub async fn node_names(&self, ids: &[NodeId]) -> Result<Vec<(NodeId, String)>> {
        self.column_of_nodes(
            ids,
            "name",
            "deregistered_at IS NULL AND node_id IN ({ids}) ORDER BY node_id",
        )
        .await
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
        let (new_json, old_json) = (serde_json::to_string(new)?, serde_json::to_string(old)?);
        with_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            // The conditional UPDATE is the compare: on PostgreSQL a second swap of the row waits
            // for this transaction, then finds the tags changed.
            let swapped = sqlx::query(
                "UPDATE nodes SET tags = $1 WHERE node_id = $2 AND tags = $3 AND deregistered_at IS NULL",
            )
            .bind(&new_json)
            .bind(id.as_str())
            .bind(&old_json)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if !swapped {
                return Ok(false);
            }
            sqlx::query("DELETE FROM node_tags WHERE node_id = $1")
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
            for (k, v) in new {
                sqlx::query("INSERT INTO node_tags (node_id, key, value) VALUES ($1, $2, $3)")
                    .bind(id.as_str())
                    .bind(k)
                    .bind(v)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(true)
    }

    /// Sets a node's platform. Every agent of channel protocol 5 and before runs on Linux (the
    /// column's default); the agent's handshake does not carry it yet, so only tests set another.
    pub async fn set_node_platform(&self, id: &NodeId, platform: &str) -> Result<()> {
        with_pool!(self, write, |pool| {
            sqlx::query("UPDATE nodes SET platform = $1 WHERE node_id = $2")
                .bind(platform)
                .bind(id.as_str())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The platform of each of `ids` that is registered (`linux` for nodes that never said).
    pub async fn node_platforms(&self, ids: &[NodeId]) -> Result<HashMap<NodeId, String>> {
        let found = self
            .column_of_nodes(ids, "platform", "node_id IN ({ids})")
            .await?;
        Ok(found.into_iter().collect())
    }

    /// (id, `column`) of the nodes that `filter` picks, where `{ids}` in it stands for the ids
    /// of `ids` (one bound JSON array, so a list of any length is one value).
    async fn column_of_nodes(
        &self,
        ids: &[NodeId],
        column: &'static str,
        filter: &'static str,
    ) -> Result<Vec<(NodeId, String)>> {
        let ids = ids_json(ids);
        Ok(with_pool!(self, read, |pool, d| {
            let sql = format!(
                "SELECT node_id, {column} FROM nodes WHERE {}",
                filter.replace("{ids}", &d.json_strings("$1"))
            );
            // Only fixed fragments (the column, the filter, the dialect's) are formatted in; the
            // ids are bound.
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(&ids)
                .fetch_all(pool)
                .await?
                .iter()
                .filter_map(|r| Some((r.text("node_id").parse().ok()?, r.text(column))))
                .collect()
        }))
    }

    /// Nodes (id, name) matching every term of a target expression, ordered by id. Each term's values
    /// are bound as one JSON array (`Dialect::json_strings`), so a term's size changes neither the
    /// number of bound values nor the expression depth; the terms go `TERMS_PER_QUERY` to a query
    /// (`TargetExpr::parse` allows fewer), whose answers are intersected.
    pub async fn resolve_targets(&self, expr: &TargetExpr) -> Result<Vec<(NodeId, String)>> {
        // No term: one query, for every node.
        let groups: Vec<&[TargetTerm]> = if expr.0.is_empty() {
            vec![&[]]
        } else {
            expr.0.chunks(TERMS_PER_QUERY).collect()
        };
        let mut found: Option<BTreeMap<String, String>> = None;
        for terms in groups {
            let rows: BTreeMap<String, String> = with_pool!(self, read, |pool, d| {
                targets_sql(terms, d)
                    .query()
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|r| (r.text("node_id"), r.text("name")))
                    .collect()
            });
            found = Some(match found {
                None => rows,
                Some(before) => before
                    .into_iter()
                    .filter(|(id, _)| rows.contains_key(id))
                    .collect(),
            });
        }
        Ok(found
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(id, name)| Some((id.parse().ok()?, name)))
            .collect())
    }
}

/// Most target terms one resolving query holds: two bound values each, far below either
/// database's limit (SQLite 32,766, PostgreSQL 65,535), and a shallow expression.
const TERMS_PER_QUERY: usize = 64;

/// The query of the registered nodes matching every one of `terms`.
fn targets_sql(terms: &[TargetTerm], d: Dialect) -> Sql {
    let mut sql = Sql::new("SELECT n.node_id, n.name FROM nodes n WHERE n.deregistered_at IS NULL");
    let json = |v: Vec<&str>| serde_json::Value::from(v).to_string();
    for term in terms {
        match term {
            TargetTerm::All => {}
            TargetTerm::Tag { key, values } => {
                sql.push(" AND n.node_id IN (SELECT node_id FROM node_tags WHERE key = ")
                    .bind(key.as_str());
                let values = sql.param(json(values.iter().map(String::as_str).collect()));
                sql.push(&format!(" AND value IN ({}))", d.json_strings(&values)));
            }
            TargetTerm::TagKey(keys) => {
                let keys = sql.param(json(keys.iter().map(String::as_str).collect()));
                sql.push(&format!(
                    " AND n.node_id IN (SELECT node_id FROM node_tags WHERE key IN ({}))",
                    d.json_strings(&keys)
                ));
            }
            TargetTerm::Ids(ids) => {
                let ids = sql.param(json(ids.iter().map(NodeId::as_str).collect()));
                sql.push(&format!(" AND n.node_id IN ({})", d.json_strings(&ids)));
            }
        }
    }
    sql.push(" ORDER BY n.node_id");
    sql
}

/// Node ids as one JSON array: one bound value however many there are.
fn ids_json(ids: &[NodeId]) -> String {
    serde_json::Value::from(ids.iter().map(NodeId::as_str).collect::<Vec<_>>()).to_string()
}

macro_rules! node_columns {
    () => {
        "node_id, name, hostname, os, arch, ips, agent_version, tags, activation_id, registered_at, last_seen_at, public_key, key_rotated_at, platform, connected_to"
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
    " FROM nodes WHERE node_id = $1 AND deregistered_at IS NULL"
);

fn node_ref(r: &impl Columns) -> Result<NodeRef> {
    Ok(NodeRef {
        node_id: r
            .text("node_id")
            .parse()
            .map_err(|_| StoreError::Missing("valid node id"))?,
        name: r.text("name"),
        tags: serde_json::from_str(&r.text("tags"))?,
    })
}

fn node_record(r: &impl Columns) -> Result<NodeRecord> {
    Ok(NodeRecord {
        node_id: r
            .text("node_id")
            .parse()
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        name: r.text("name"),
        hostname: r.text("hostname"),
        os: r.text("os"),
        platform: r.text("platform"),
        arch: r.text("arch"),
        ips: serde_json::from_str(&r.text("ips"))?,
        agent_version: r.text("agent_version"),
        tags: serde_json::from_str(&r.text("tags"))?,
        activation_id: r.text("activation_id"),
        registered_at: r.int("registered_at"),
        last_seen_at: r.int("last_seen_at"),
        connected_to: r.text("connected_to"),
        public_key: r.opt_text("public_key"),
        key_rotated_at: r.opt_int("key_rotated_at"),
    })
}

fn activation_record(r: &impl Columns) -> Result<ActivationRecord> {
    Ok(ActivationRecord {
        activation_id: r.text("activation_id"),
        tags: serde_json::from_str(&r.text("tags"))?,
        limit: r.int("reg_limit").max(0) as u64,
        registrations: r.int("registrations").max(0) as u64,
        description: r.text("description"),
        created_at: r.int("created_at"),
        expires_at: r.int("expires_at"),
        default_instance_name: r.text("default_instance_name"),
        iam_role: r.text("iam_role"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetrun_proto::api::{PING_CONNECTION_LOST, PING_ONLINE};

    /// Adds nodes mi-0..mi-(n-1) as rows, node i named `n{i}` and tagged `env=e{i}` and
    /// `k{i % 2}=x` (in the index only, as a hand-made row would be).
    async fn seed_nodes(store: &Store, n: u128) {
        for i in 0..n {
            let id = NodeId::from_random(i);
            with_pool!(store, write, |pool| {
                sqlx::query(
                    "INSERT INTO nodes (node_id, name, hostname, os, arch, ips, agent_version, tags,
                                        activation_id, registered_at, last_seen_at)
                     VALUES ($1, $2, 'h', 'linux', 'x86_64', '[]', '1', '{}', 'a', 0, 0)",
                )
                .bind(id.as_str())
                .bind(format!("n{i}"))
                .execute(pool)
                .await
                .expect("node row");
                for (k, v) in [
                    ("env".to_owned(), format!("e{i}")),
                    (format!("k{}", i % 2), "x".into()),
                ] {
                    sqlx::query("INSERT INTO node_tags (node_id, key, value) VALUES ($1, $2, $3)")
                        .bind(id.as_str())
                        .bind(k)
                        .bind(v)
                        .execute(pool)
                        .await
                        .expect("tag row");
                }
            });
        }
    }

    async fn resolved(store: &Store, expr: &TargetExpr) -> Vec<NodeId> {
        store
            .resolve_targets(expr)
            .await
            .expect("resolve")
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    fn ids(of: &[u128]) -> Vec<NodeId> {
        of.iter().map(|i| NodeId::from_random(*i)).collect()
    }

    /// 40,000 values in one term (past SQLite's 32,766 variables when each value was bound on its
    /// own: "too many SQL variables", a 500) resolve correctly, whatever the term kind, on both
    /// databases; so do more terms than one query holds.
    #[tokio::test]
    async fn terms_of_any_size_resolve() {
        let (_dir, stores) = crate::testing::stores().await;
        for (db, store) in stores {
            seed_nodes(&store, 6).await;
            let mut values: Vec<String> = (0..40_000).map(|i| format!("e{}", i + 1_000)).collect();
            values.extend(["e1".into(), "e4".into()]);
            let mut many: Vec<NodeId> = (10_000..50_000u128).map(NodeId::from_random).collect();
            many.extend(ids(&[1, 2, 4]));
            let mut keys: Vec<String> = (0..40_000).map(|i| format!("key{i}")).collect();
            keys.push("k0".into());
            let expr = TargetExpr(vec![
                TargetTerm::Tag {
                    key: "env".into(),
                    values,
                },
                TargetTerm::Ids(many),
                TargetTerm::TagKey(keys),
            ]);
            // One value per term's list, one for the tag's key.
            assert_eq!(targets_sql(&expr.0, Dialect::Sqlite).binds(), 4);
            assert_eq!(resolved(&store, &expr).await, ids(&[4]), "{db}");

            // 200 terms, four queries: even nodes (k0) among 1, 2, 4 and 5, with `All` between.
            let mut terms = vec![TargetTerm::TagKey(vec!["k0".into()]); 100];
            terms.push(TargetTerm::All);
            terms.extend(vec![TargetTerm::Ids(ids(&[1, 2, 4, 5])); 99]);
            let expr = TargetExpr(terms);
            assert!(expr.0.len() > 3 * TERMS_PER_QUERY);
            assert_eq!(resolved(&store, &expr).await, ids(&[2, 4]), "{db}");

            // No term is every registered node, by id; a deregistered one never resolves.
            assert_eq!(
                resolved(&store, &TargetExpr(vec![])).await,
                ids(&[0, 1, 2, 3, 4, 5])
            );
            assert!(
                store
                    .deregister_node(&NodeId::from_random(2), 1)
                    .await
                    .expect("dereg")
            );
            assert_eq!(resolved(&store, &expr).await, ids(&[4]), "{db}");
            let tag = TargetExpr(vec![TargetTerm::Tag {
                key: "k1".into(),
                values: vec!["x".into(), "y".into()],
            }]);
            assert_eq!(resolved(&store, &tag).await, ids(&[1, 3, 5]), "{db}");
        }
    }

    fn new_node(i: u128, name: &str, tags: &[(&str, &str)]) -> NewNode {
        NewNode {
            node_id: NodeId::from_random(i),
            public_key: format!("{i:064x}"),
            info: NodeInfo {
                name: name.into(),
                hostname: format!("{name}.local"),
                os: "linux".into(),
                arch: "x86_64".into(),
                ips: vec!["10.0.0.1".into()],
                agent_version: "1.0".into(),
            },
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    /// An activation of `limit` registrations, expiring an hour from now.
    async fn activation(store: &Store, id: &str, limit: u64, default_name: &str) {
        let tags = BTreeMap::from([("env".to_owned(), "prod".to_owned())]);
        store
            .insert_activation(
                id,
                &format!("hash-{id}"),
                &tags,
                limit,
                "lab",
                1_000,
                now_ms() + 3_600_000,
                (default_name, "role"),
            )
            .await
            .expect("activation");
    }

    /// Registration refuses an unknown code, an expired activation, a used-up limit and a taken
    /// id (a deregistered node's too), in that order; it counts, names and tags the node.
    #[tokio::test]
    async fn registration_checks_counts_names_and_tags() {
        let (_dir, stores) = crate::testing::stores().await;
        for (db, store) in stores {
            assert!(!store.has_api_tokens().await.expect("tokens"), "{db}");
            activation(&store, "act-a", 2, "").await;
            activation(&store, "act-b", 5, "fixed").await;
            store
                .insert_activation(
                    "act-old",
                    "hash-act-old",
                    &BTreeMap::new(),
                    5,
                    "",
                    500,
                    now_ms() - 1,
                    ("", ""),
                )
                .await
                .expect("activation");

            let r = store.register_node("nope", new_node(1, "a", &[])).await;
            assert!(matches!(r, Err(RegisterError::UnknownCode)), "{db}: {r:?}");
            let r = store
                .register_node("hash-act-old", new_node(1, "a", &[]))
                .await;
            assert!(matches!(r, Err(RegisterError::Expired(_))), "{db}: {r:?}");

            // The activation's tags win over the agent's.
            let mine = [("env", "dev"), ("team", "web")];
            store
                .register_node("hash-act-a", new_node(1, "web-1", &mine))
                .await
                .expect("first");
            let r = store
                .register_node("hash-act-b", new_node(1, "web-1", &[]))
                .await;
            assert!(matches!(r, Err(RegisterError::IdTaken)), "{db}: {r:?}");
            store
                .register_node("hash-act-a", new_node(2, "web-2", &[]))
                .await
                .expect("second");
            let r = store
                .register_node("hash-act-a", new_node(3, "web-3", &[]))
                .await;
            assert!(
                matches!(r, Err(RegisterError::LimitReached(2))),
                "{db}: {r:?}"
            );

            // A deregistered node's id stays taken; a default instance name names the node.
            assert!(
                store
                    .deregister_node(&NodeId::from_random(2), 5)
                    .await
                    .expect("dereg")
            );
            let r = store
                .register_node("hash-act-b", new_node(2, "again", &[]))
                .await;
            assert!(matches!(r, Err(RegisterError::IdTaken)), "{db}: {r:?}");
            store
                .register_node("hash-act-b", new_node(4, "own-name", &[]))
                .await
                .expect("third");

            let n1 = store
                .get_node(&NodeId::from_random(1), |_, _| false)
                .await
                .expect("get")
                .expect("node 1");
            assert_eq!(n1.name, "web-1");
            assert_eq!(n1.hostname, "web-1.local");
            assert_eq!(n1.ips, ["10.0.0.1"]);
            assert_eq!(n1.activation_id, "act-a");
            assert_eq!(
                n1.tags,
                BTreeMap::from([("env".into(), "prod".into()), ("team".into(), "web".into())])
            );
            let n4 = store
                .get_node(&NodeId::from_random(4), |_, _| true)
                .await
                .expect("get")
                .expect("node 4");
            assert_eq!(n4.name, "fixed");
            // The tags are in the index that targets read.
            let prod = TargetExpr(vec![TargetTerm::Tag {
                key: "env".into(),
                values: vec!["prod".into()],
            }]);
            assert_eq!(resolved(&store, &prod).await, ids(&[1, 4]), "{db}");
            let counts: Vec<(String, u64, u64, bool)> = store
                .list_activations()
                .await
                .expect("activations")
                .into_iter()
                .map(|a| (a.activation_id, a.registrations, a.limit, a.expired))
                .collect();
            // Newest first; act-a and act-b were created at the same time: by id, descending.
            assert_eq!(
                counts,
                [
                    ("act-b".into(), 1, 5, false),
                    ("act-a".into(), 2, 2, false),
                    ("act-old".into(), 0, 5, true),
                ],
                "{db}"
            );
            assert!(store.delete_activation("act-b").await.expect("delete"));
            assert!(!store.delete_activation("act-b").await.expect("delete"));
            let r = store
                .register_node("hash-act-b", new_node(5, "late", &[]))
                .await;
            assert!(matches!(r, Err(RegisterError::UnknownCode)), "{db}: {r:?}");
            // Its nodes stay.
            assert!(
                store
                    .get_node(&NodeId::from_random(4), |_, _| false)
                    .await
                    .expect("get")
                    .is_some()
            );
        }
    }

    /// Registrations racing for the last places of an activation (as server replicas on one
    /// PostgreSQL do) never pass its limit; nor do two racing for one node id both pass.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_registrations_respect_the_limit() {
        let (_dir, stores) = crate::testing::stores().await;
        for (db, store) in stores {
            activation(&store, "act", 3, "").await;
            activation(&store, "other", 100, "").await;
            let racers = 16u128;
            let start = std::sync::Arc::new(tokio::sync::Barrier::new(racers as usize));
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..racers {
                let (store, start) = (store.clone(), start.clone());
                tasks.spawn(async move {
                    start.wait().await;
                    // Half race for the limit with ids of their own, half for one id.
                    let (code, node) = if i % 2 == 0 {
                        ("hash-act", new_node(100 + i, "n", &[]))
                    } else {
                        ("hash-other", new_node(1, "n", &[]))
                    };
                    (i % 2, store.register_node(code, node).await)
                });
            }
            let (mut limited, mut taken) = (BTreeMap::new(), BTreeMap::new());
            while let Some(done) = tasks.join_next().await {
                let (kind, r) = done.expect("task");
                let outcome = match r {
                    Ok(()) => "registered",
                    Err(RegisterError::LimitReached(3)) => "limit",
                    Err(RegisterError::IdTaken) => "taken",
                    Err(e) => panic!("{db}: {e}"),
                };
                let tally = if kind == 0 { &mut limited } else { &mut taken };
                *tally.entry(outcome).or_insert(0) += 1;
            }
            assert_eq!(
                limited,
                BTreeMap::from([("registered", 3), ("limit", 5)]),
                "{db}"
            );
            assert_eq!(
                taken,
                BTreeMap::from([("registered", 1), ("taken", 7)]),
                "{db}"
            );
            let acts = store.list_activations().await.expect("activations");
            let regs: Vec<(&str, u64)> = acts
                .iter()
                .map(|a| (a.activation_id.as_str(), a.registrations))
                .collect();
            assert_eq!(regs, [("other", 1), ("act", 3)], "{db}");
            assert_eq!(
                store.list_nodes(|_, _| false).await.expect("nodes").len(),
                4
            );
        }
    }

    /// A rotation keeps the old key as the previous one until the new one is proven; it is
    /// idempotent, refuses a key that is no longer the node's, and a deregistered node's.
    #[tokio::test]
    async fn node_keys_rotate_prove_and_deregister() {
        let (_dir, stores) = crate::testing::stores().await;
        for (db, store) in stores {
            activation(&store, "act", 10, "").await;
            let node = new_node(1, "web", &[]);
            let (id, k1) = (node.node_id.clone(), node.public_key.clone());
            store
                .register_node("hash-act", node)
                .await
                .expect("register");
            let keys = |c: Option<&str>, p: Option<&str>, d: bool| NodeKeys {
                current: c.map(str::to_owned),
                previous: p.map(str::to_owned),
                deregistered: d,
            };
            assert_eq!(
                store.node_keys(&id).await.expect("keys"),
                Some(keys(Some(&k1), None, false)),
                "{db}"
            );
            assert_eq!(
                store
                    .node_keys(&NodeId::from_random(9))
                    .await
                    .expect("keys"),
                None
            );

            assert!(
                store
                    .rotate_node_key(&id, &k1, "k2", 7_000)
                    .await
                    .expect("rotate")
            );
            // Again (a retry): nothing changes.
            assert!(
                store
                    .rotate_node_key(&id, &k1, "k2", 8_000)
                    .await
                    .expect("rotate")
            );
            assert_eq!(
                store.node_keys(&id).await.expect("keys"),
                Some(keys(Some("k2"), Some(&k1), false)),
                "{db}"
            );
            let shown = store
                .get_node(&id, |_, _| false)
                .await
                .expect("get")
                .expect("node");
            assert_eq!(
                shown.key_rotated_at.as_deref(),
                Some("1970-01-01T00:00:07.000Z")
            );
            // A stale key proves nothing; the current one retires the previous.
            store.node_key_proven(&id, &k1).await.expect("prove");
            assert_eq!(
                store
                    .node_keys(&id)
                    .await
                    .expect("keys")
                    .and_then(|k| k.previous),
                Some(k1.clone())
            );
            store.node_key_proven(&id, "k2").await.expect("prove");
            assert_eq!(
                store.node_keys(&id).await.expect("keys"),
                Some(keys(Some("k2"), None, false)),
                "{db}"
            );
            assert!(
                !store
                    .rotate_node_key(&id, &k1, "k3", 9_000)
                    .await
                    .expect("rotate")
            );

            assert!(store.deregister_node(&id, 10).await.expect("dereg"));
            assert!(!store.deregister_node(&id, 11).await.expect("dereg"));
            assert!(
                !store
                    .rotate_node_key(&id, "k2", "k3", 12)
                    .await
                    .expect("rotate")
            );
            assert_eq!(
                store.node_keys(&id).await.expect("keys"),
                Some(keys(Some("k2"), None, true)),
                "{db}"
            );
            assert!(
                store
                    .get_node(&id, |_, _| false)
                    .await
                    .expect("get")
                    .is_none()
            );
        }
    }

    /// Listings by name then id, connects and sightings, lookups by id, platforms, and tags swapped
    /// only from what they still are, with their index.
    #[tokio::test]
    async fn nodes_list_look_up_and_swap_tags() {
        let (_dir, stores) = crate::testing::stores().await;
        for (db, store) in stores {
            activation(&store, "act", 10, "").await;
            activation(&store, "named", 10, "fixed").await;
            // Two of one name: by id.
            for (i, name) in [(3, "b"), (2, "a"), (1, "b")] {
                store
                    .register_node("hash-act", new_node(i, name, &[]))
                    .await
                    .expect("register");
            }
            store
                .register_node("hash-named", new_node(4, "zz", &[]))
                .await
                .expect("register");
            let listed: Vec<(String, NodeId, String)> = store
                .list_nodes(|n, _| *n == NodeId::from_random(1))
                .await
                .expect("list")
                .into_iter()
                .map(|n| (n.name, n.node_id, n.ping_status))
                .collect();
            let lost = PING_CONNECTION_LOST.to_owned();
            assert_eq!(
                listed,
                [
                    ("a".into(), NodeId::from_random(2), lost.clone()),
                    ("b".into(), NodeId::from_random(1), PING_ONLINE.to_owned()),
                    ("b".into(), NodeId::from_random(3), lost.clone()),
                    ("fixed".into(), NodeId::from_random(4), lost.clone()),
                ],
                "{db}"
            );

            // A connect reports anew; a default instance name stays.
            let info = NodeInfo {
                name: "renamed".into(),
                hostname: "h2".into(),
                os: "debian".into(),
                arch: "aarch64".into(),
                ips: vec!["10.0.0.9".into(), "fd00::9".into()],
                agent_version: "2.0".into(),
            };
            for i in [2, 4] {
                store
                    .node_connected(&NodeId::from_random(i), &info, "r")
                    .await
                    .expect("connected");
            }
            let n2 = store
                .get_node(&NodeId::from_random(2), |_, _| false)
                .await
                .expect("get")
                .expect("n2");
            assert_eq!(
                (n2.name.as_str(), n2.hostname.as_str(), n2.os.as_str()),
                ("renamed", "h2", "debian"),
                "{db}"
            );
            assert_eq!(
                (n2.arch.as_str(), n2.agent_version.as_str()),
                ("aarch64", "2.0")
            );
            assert_eq!(n2.ips, info.ips);
            let n4 = store
                .get_node(&NodeId::from_random(4), |_, _| false)
                .await
                .expect("get")
                .expect("n4");
            assert_eq!((n4.name.as_str(), n4.hostname.as_str()), ("fixed", "h2"));
            let before = n4.last_seen.clone();
            store
                .node_seen(&NodeId::from_random(4), "r")
                .await
                .expect("seen");
            let n4 = store
                .get_node(&NodeId::from_random(4), |_, _| false)
                .await
                .expect("get")
                .expect("n4");
            assert!(n4.last_seen >= before, "{db}");
            // The replica holding a connection is recorded at connect and cleared by the same
            // replica at disconnect, never by another.
            let held_by = |id| {
                let store = &store;
                async move {
                    let at = std::sync::Mutex::new(String::new());
                    store
                        .get_node(&NodeId::from_random(id), |_, to| {
                            *at.lock().unwrap() = to.to_owned();
                            false
                        })
                        .await
                        .expect("get");
                    at.into_inner().unwrap()
                }
            };
            assert_eq!(held_by(4).await, "", "{db}");
            assert_eq!(held_by(2).await, "r", "{db}");
            store
                .node_seen(&NodeId::from_random(2), "other")
                .await
                .expect("seen");
            assert_eq!(held_by(2).await, "r", "{db}");

            // Lookups by id: a deregistered node is a policy's still, not a name.
            assert!(
                store
                    .deregister_node(&NodeId::from_random(3), 1)
                    .await
                    .expect("dereg")
            );
            let asked = ids(&[4, 3, 9, 1]);
            let refs: Vec<(NodeId, String)> = store
                .node_refs(Some(&asked))
                .await
                .expect("refs")
                .into_iter()
                .map(|r| (r.node_id, r.name))
                .collect();
            assert_eq!(
                refs,
                [
                    (NodeId::from_random(1), "b".into()),
                    (NodeId::from_random(3), "b".into()),
                    (NodeId::from_random(4), "fixed".into()),
                ],
                "{db}"
            );
            let every = store.node_refs(None).await.expect("refs");
            assert_eq!(every.len(), 4);
            assert_eq!(every[3].tags.get("env").map(String::as_str), Some("prod"));
            assert_eq!(
                store.node_names(&asked).await.expect("names"),
                [
                    (NodeId::from_random(1), "b".to_owned()),
                    (NodeId::from_random(4), "fixed".to_owned()),
                ],
                "{db}"
            );
            assert!(store.node_names(&[]).await.expect("names").is_empty());
            // Ids past SQLite's limit on bound values, in one lookup.
            let mut big: Vec<NodeId> = (1_000..41_000u128).map(NodeId::from_random).collect();
            big.push(NodeId::from_random(2));
            assert_eq!(
                store.node_names(&big).await.expect("names").len(),
                1,
                "{db}"
            );
            assert_eq!(store.node_refs(Some(&big)).await.expect("refs").len(), 1);

            store
                .set_node_platform(&NodeId::from_random(2), "windows")
                .await
                .expect("platform");
            assert_eq!(
                store.node_platforms(&big).await.expect("platforms"),
                HashMap::from([(NodeId::from_random(2), "windows".to_owned())])
            );
            assert_eq!(
                store
                    .node_platforms(&ids(&[1, 9]))
                    .await
                    .expect("platforms"),
                HashMap::from([(NodeId::from_random(1), "linux".to_owned())])
            );

            // Tags: swapped from what they are, not from what they were.
            let id = NodeId::from_random(1);
            let prod = BTreeMap::from([("env".to_owned(), "prod".to_owned())]);
            let new = BTreeMap::from([("role".to_owned(), "db".to_owned())]);
            assert!(!store.swap_node_tags(&id, &new, &prod).await.expect("swap"));
            assert!(store.swap_node_tags(&id, &prod, &new).await.expect("swap"));
            assert!(!store.swap_node_tags(&id, &prod, &new).await.expect("swap"));
            // A deregistered node's tags stay.
            let gone = NodeId::from_random(3);
            assert!(
                !store
                    .swap_node_tags(&gone, &prod, &new)
                    .await
                    .expect("swap")
            );
            let shown = store
                .get_node(&id, |_, _| false)
                .await
                .expect("get")
                .expect("node");
            assert_eq!(shown.tags, new, "{db}");
            let role = TargetExpr(vec![TargetTerm::Tag {
                key: "role".into(),
                values: vec!["db".into()],
            }]);
            assert_eq!(resolved(&store, &role).await, ids(&[1]), "{db}");
            let env = TargetExpr(vec![TargetTerm::TagKey(vec!["env".into()])]);
            assert_eq!(resolved(&store, &env).await, ids(&[2, 4]), "{db}");
        }
    }

    /// A command's nodes, in dispatch order, as policies see them.
    #[tokio::test]
    async fn command_node_refs_in_dispatch_order() {
        let (_dir, stores) = crate::testing::stores().await;
        for (db, store) in stores {
            seed_nodes(&store, 3).await;
            let cid = CommandId::from_random(5);
            for (seq, node) in [(0i64, 2u128), (1, 0), (2, 1)] {
                with_pool!(store, write, |pool| {
                    sqlx::query(
                        "INSERT INTO invocations (command_id, node_id, seq, node_name, status, status_details)
                         VALUES ($1, $2, $3, 'n', 'Pending', 'Pending')",
                    )
                    .bind(cid.as_str())
                    .bind(NodeId::from_random(node).as_str())
                    .bind(seq)
                    .execute(pool)
                    .await
                    .expect("invocation");
                });
            }
            let refs: Vec<NodeId> = store
                .command_node_refs(&cid)
                .await
                .expect("refs")
                .into_iter()
                .map(|r| r.node_id)
                .collect();
            assert_eq!(refs, ids(&[2, 0, 1]), "{db}");
            let other = store
                .command_node_refs(&CommandId::from_random(6))
                .await
                .expect("refs");
            assert!(other.is_empty());
        }
    }
}
