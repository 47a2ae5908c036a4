//! Commands and their invocations: creation, state transitions and listings.
//!
//! Every transition of an invocation to a terminal status goes through [`Store::finish_invocations`],
//! which moves the command's counters in the same transaction and only from a non-terminal status,
//! so a counter can never count one invocation twice.

/// SQL true for a command (table alias given) with an invocation on a node in the JSON array bound
/// as `$1`, or for every command when NULL is bound (see [`visible_json`]).
fn visible_clause(d: Dialect, alias: &str) -> String {
    format!(
        "($1 IS NULL OR EXISTS (SELECT 1 FROM invocations vi WHERE vi.command_id = {alias}.command_id
           AND vi.node_id IN ({})))",
        d.json_strings("$1")
    )
}

/// A position in the newest-first listing of commands: listings with it start after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandCursor {
    /// Requested time (ms since the epoch).
    pub requested_at: i64,
    /// Command id; "" for a bare time, which sorts before every id at that millisecond.
    pub command_id: String,
}

use super::leases::{self, Fence, Owner};
use super::writer::WriteOp;
use super::{
    Columns, Conn, Dialect, Result, Store, StoreError, placeholders, value_rows, with_conn,
    with_pool,
};
use fleetrun_proto::api::{Command, Invocation};
use fleetrun_proto::status::details;
use fleetrun_proto::targets::{ParseError, Rate};
use fleetrun_proto::time::now_ms;
use fleetrun_proto::{CommandId, CommandStatus, InvocationStatus, NodeId};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Invocations stored per `INSERT` (6 bound values each).
const INVOCATIONS_PER_INSERT: usize = 200;

/// What a command asks of each node and how it is rolled out: the part of a command the dispatcher
/// works from, the same when it is created and when it is resumed.
#[derive(Clone, Debug)]
pub struct CommandSpec {
    /// Script lines.
    pub commands: Vec<String>,
    /// Working directory ("" for the agent's default).
    pub working_dir: String,
    /// Seconds.
    pub execution_timeout: u64,
    /// Seconds.
    pub delivery_timeout: u64,
    /// Most invocations in flight at once (stored as its `N` or `N%` text).
    pub max_concurrency: Rate,
    /// Errors after which no more invocations start (stored as its `N` or `N%` text).
    pub max_errors: Rate,
    /// Run-as user ("" for the agent's).
    pub run_as: String,
    /// MiB.
    pub memory_limit_mb: Option<u64>,
    /// Percent of one core.
    pub cpu_limit_percent: Option<u32>,
    /// Epoch ms.
    pub requested_at: i64,
}

/// What a command is created with beyond itself, in the same transaction.
#[derive(Clone, Debug, Default)]
pub struct CommandExtras {
    /// Invocations ended at once (nodes the command must not run on: they never see it, even
    /// after a crash).
    pub ended: Vec<(NodeId, Finish)>,
    /// The saved script (name, version) it runs.
    pub script: Option<(String, i64)>,
    /// The script's input URI and output path, when it has them.
    pub script_files: ScriptFiles,
}

/// A saved script run's files, as recorded with its command.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScriptFiles {
    /// Where the input comes from (an object key, `s3://` or `https://`).
    pub input: Option<String>,
    /// The output file's path as the script names it (its basename is what counts).
    pub output: Option<String>,
}

impl ScriptFiles {
    /// Whether the run moves any file.
    pub fn any(&self) -> bool {
        self.input.is_some() || self.output.is_some()
    }
}

/// A command to create, with its resolved targets.
pub struct NewCommand {
    /// Its id.
    pub command_id: CommandId,
    /// The document, e.g. `AWS-RunShellScript`.
    pub document_name: String,
    /// The version of the document that runs.
    pub document_version: String,
    /// The document's parameters as given.
    pub parameters: BTreeMap<String, Vec<String>>,
    /// Comment.
    pub comment: String,
    /// Node ids asked for.
    pub node_ids: Vec<NodeId>,
    /// Target expression asked for.
    pub targets: String,
    /// What to run and how.
    pub spec: CommandSpec,
    /// Resolved targets (id, name), in dispatch order.
    pub invocations: Vec<(NodeId, String)>,
    /// Members only the SSM-compatible API shows (its Targets, DocumentVersion, OutputS3*...).
    pub ssm_extra: Option<serde_json::Value>,
    /// The send's idempotency key, if it had one.
    pub idempotency: Option<IdempotencyKey>,
    /// Where each invocation's output is also written (S3), if asked.
    pub output_s3: Option<S3Output>,
    /// The replica that creates it, owning it (epoch 1) for a first lease; None: owned by
    /// nobody, so any replica's next claim takes it.
    pub owner: Option<Owner>,
}

impl NewCommand {
    /// The fence of its creator's writes, once it is stored (None when it has no owner).
    pub fn fence(&self) -> Option<Fence> {
        self.owner.as_ref().map(|o| Fence {
            owner: o.replica_id.clone(),
            epoch: 1,
        })
    }
}

/// A command's S3 output: the bucket, prefix and region asked for, and the part of each key after
/// the node id that names the plugin and step (`awsrunShellScript/0.awsrunShellScript`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Output {
    /// Bucket, prefix, region.
    pub target: fleetrun_proto::api::OutputS3,
    /// `awsrunShellScript/0.awsrunShellScript` or `awsrunShellScript/STEP`.
    pub plugin_dir: String,
}

/// An idempotency key of a send, scoped to its principal.
#[derive(Clone, Debug)]
pub struct IdempotencyKey {
    /// The principal (user name) the key belongs to.
    pub principal: String,
    /// The key, prefixed with its API (`native:` or `ssm:`).
    pub key: String,
    /// Hex SHA-256 of the request it came with.
    pub request_hash: String,
}

/// Why a command was not inserted.
#[derive(Debug)]
pub enum InsertError {
    /// Its idempotency key is already stored (a concurrent send with the same key won).
    DuplicateKey,
    /// Storage failed.
    Store(super::StoreError),
}

impl From<super::StoreError> for InsertError {
    fn from(e: super::StoreError) -> Self {
        InsertError::Store(e)
    }
}

impl From<sqlx::Error> for InsertError {
    fn from(e: sqlx::Error) -> Self {
        InsertError::Store(e.into())
    }
}

impl From<serde_json::Error> for InsertError {
    fn from(e: serde_json::Error) -> Self {
        InsertError::Store(e.into())
    }
}

/// The parts of a command row the dispatcher needs.
#[derive(Clone, Debug)]
pub struct CommandRow {
    /// Id.
    pub command_id: CommandId,
    /// What to run and how.
    pub spec: CommandSpec,
    /// Status.
    pub status: CommandStatus,
    /// Counters.
    pub target_count: u64,
    /// Counters.
    pub error_count: u64,
    /// Whether an operator cancelled the command.
    pub cancel_requested: bool,
}

/// The parts of an invocation row the dispatcher and the channel need.
#[derive(Clone, Debug)]
pub struct InvocationRow {
    /// Node.
    pub node_id: NodeId,
    /// Status.
    pub status: InvocationStatus,
    /// Whether the Run frame was sent.
    pub delivered: bool,
    /// Whether the node reported the start.
    pub started: bool,
}

/// How an invocation ended.
#[derive(Clone, Debug)]
pub struct Finish {
    /// Terminal status.
    pub status: InvocationStatus,
    /// Status details.
    pub details: &'static str,
    /// Exit code (-1 when it never ran).
    pub exit_code: i32,
    /// Signal, if one ended it.
    pub signal: Option<i32>,
    /// Epoch ms, if it started.
    pub started_at: Option<i64>,
    /// Epoch ms.
    pub finished_at: i64,
    /// Resource use, if it ran.
    pub cpu_user_ms: Option<u64>,
    /// Resource use, if it ran.
    pub cpu_system_ms: Option<u64>,
    /// Resource use, if it ran.
    pub max_rss_kb: Option<u64>,
    /// A note.
    pub message: String,
    /// How the node enforced limits ("" when unknown).
    pub limits_applied: String,
}

impl Finish {
    /// An invocation that ended without running.
    pub fn without_running(
        status: InvocationStatus,
        details: &'static str,
        now: i64,
        message: &str,
    ) -> Self {
        Finish {
            status,
            details,
            exit_code: -1,
            signal: None,
            started_at: None,
            finished_at: now,
            cpu_user_ms: None,
            cpu_system_ms: None,
            max_rss_kb: None,
            message: message.to_owned(),
            limits_applied: String::new(),
        }
    }
    /// Whether it counts against max errors (SSM: Failed, or timed out while executing).
    pub fn is_error(&self) -> bool {
        match self.status {
            InvocationStatus::Failed => true,
            InvocationStatus::TimedOut => self.details != details::DELIVERY_TIMED_OUT,
            _ => false,
        }
    }
}

impl Store {
    /// Creates a command and all its invocations (Pending) in one transaction.
    pub async fn insert_command(&self, c: &NewCommand) -> Result<(), InsertError> {
        self.insert_command_with(c, &CommandExtras::default()).await
    }

    /// Creates a command and all its invocations in one transaction, with what `extras` adds.
    ///
    /// Two sends with the same idempotency key cannot both be stored: the key's unique index
    /// refuses the second `INSERT` (on PostgreSQL it waits for the first transaction's end, and
    /// is refused if that one committed).
    pub async fn insert_command_with(
        &self,
        c: &NewCommand,
        extras: &CommandExtras,
    ) -> Result<(), InsertError> {
        let spec = &c.spec;
        let commands = serde_json::to_string(&spec.commands)?;
        let node_ids = serde_json::to_string(&c.node_ids)?;
        let parameters = serde_json::to_string(&c.parameters)?;
        let ssm_extra = c
            .ssm_extra
            .as_ref()
            .map_or_else(|| "{}".into(), |v| v.to_string());
        let key = c.idempotency.as_ref();
        let s3 = c.output_s3.as_ref();
        // Owned: epoch 1 and a lease from now by the database's clock. Unowned: '', 0 and a lease
        // already over (NULL + now is NULL), so the first claim takes it.
        let (owner, epoch, lease_ms) = match &c.owner {
            Some(o) => (o.replica_id.as_str(), 1i64, Some(i64::from(o.lease_ms))),
            None => ("", 0, None),
        };
        with_pool!(self, write, |pool, d| {
            let mut tx = pool.begin().await?;
            let sql = format!(
                "INSERT INTO commands (command_id, document_name, commands, working_dir,
                    execution_timeout, delivery_timeout, comment, node_ids, targets, max_concurrency,
                    max_errors, run_as, memory_limit_mb, cpu_limit_percent, status, status_details,
                    requested_at, target_count, ssm_extra, document_version, parameters,
                    idempotency_principal, idempotency_key, idempotency_hash, output_s3_bucket,
                    output_s3_prefix, output_s3_region, output_s3_plugin_dir, owner, owner_epoch,
                    lease_until)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 'Pending',
                    'Pending', $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28,
                    COALESCE({} + $29, 0))",
                d.now_ms()
            );
            // Only the dialect's clock is formatted in; values are bound.
            let inserted = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(c.command_id.as_str())
                .bind(&c.document_name)
                .bind(&commands)
                .bind(&spec.working_dir)
                .bind(spec.execution_timeout as i64)
                .bind(spec.delivery_timeout as i64)
                .bind(&c.comment)
                .bind(&node_ids)
                .bind(&c.targets)
                .bind(spec.max_concurrency.to_string())
                .bind(spec.max_errors.to_string())
                .bind(&spec.run_as)
                .bind(spec.memory_limit_mb.map(|v| v as i64))
                .bind(spec.cpu_limit_percent.map(i64::from))
                .bind(spec.requested_at)
                .bind(c.invocations.len() as i64)
                .bind(&ssm_extra)
                .bind(&c.document_version)
                .bind(&parameters)
                .bind(key.map(|k| k.principal.as_str()))
                .bind(key.map(|k| k.key.as_str()))
                .bind(key.map(|k| k.request_hash.as_str()))
                .bind(s3.map_or("", |o| o.target.bucket.as_str()))
                .bind(s3.map_or("", |o| o.target.prefix.as_str()))
                .bind(s3.map_or("", |o| o.target.region.as_str()))
                .bind(s3.map_or("", |o| o.plugin_dir.as_str()))
                .bind(owner)
                .bind(epoch)
                .bind(lease_ms)
                .execute(&mut *tx)
                .await;
            match inserted {
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() && key.is_some() => {
                    return Err(InsertError::DuplicateKey);
                }
                r => r?,
            };
            for (chunk_no, chunk) in c.invocations.chunks(INVOCATIONS_PER_INSERT).enumerate() {
                let sql = format!(
                    "INSERT INTO invocations (command_id, node_id, seq, node_name, status,
                       status_details) VALUES {}",
                    value_rows(chunk.len(), 6)
                );
                // Only placeholders are formatted in; values are bound.
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for (i, (node, name)) in chunk.iter().enumerate() {
                    q = q
                        .bind(c.command_id.as_str())
                        .bind(node.as_str())
                        .bind((chunk_no * INVOCATIONS_PER_INSERT + i) as i64)
                        .bind(name.as_str())
                        .bind("Pending")
                        .bind(details::PENDING);
                }
                q.execute(&mut *tx).await?;
            }
            if !extras.ended.is_empty() {
                finish_invocations(Conn::from(&mut *tx), &c.command_id, &extras.ended).await?;
            }
            if let Some((name, version)) = &extras.script {
                sqlx::query(
                    "INSERT INTO script_runs (command_id, name, version, input_uri, output_path)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(c.command_id.as_str())
                .bind(name)
                .bind(version)
                .bind(extras.script_files.input.as_deref())
                .bind(extras.script_files.output.as_deref())
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// The command a principal's idempotency key made, with the hash of the request it came with.
    pub async fn command_by_idempotency_key(
        &self,
        principal: &str,
        key: &str,
    ) -> Result<Option<(Command, String)>> {
        with_pool!(self, read, |pool| {
            let row = sqlx::query(
                "SELECT * FROM commands WHERE idempotency_principal = $1 AND idempotency_key = $2",
            )
            .bind(principal)
            .bind(key)
            .fetch_optional(pool)
            .await?;
            let Some(row) = row else { return Ok(None) };
            let hash = row
                .opt_text("idempotency_hash")
                .ok_or(StoreError::Missing("idempotency key's request hash"))?;
            Ok(Some((command_record(&row)?.into(), hash)))
        })
    }

    /// Commands, newest first, without invocations.
    /// Only commands with an invocation on a node in `visible`, when given.
    ///
    /// With `before`, only commands that sort after it in that order (requested earlier, or at the
    /// same millisecond with a smaller id): a walk of the `commands_requested` index from there,
    /// so each page costs the same however deep it is.
    pub async fn list_commands(
        &self,
        limit: u32,
        visible: Option<&HashSet<NodeId>>,
        before: Option<&CommandCursor>,
    ) -> Result<Vec<Command>> {
        // No cursor is one past every command, so the condition is always the index's range seek
        // (a `$3 IS NULL OR` would turn it into a scan from the newest).
        let (at, id) = match before {
            Some(c) => (c.requested_at, c.command_id.as_str()),
            None => (i64::MAX, ""),
        };
        let visible = visible_json(visible);
        with_pool!(self, read, |pool, d| {
            let sql = format!(
                "SELECT * FROM commands c WHERE {} AND (c.requested_at, c.command_id) < ($3, $4)
                 ORDER BY requested_at DESC, command_id DESC LIMIT $2",
                visible_clause(d, "c")
            );
            // Only the dialect's fixed fragments are formatted in; values are bound.
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(&visible)
                .bind(i64::from(limit))
                .bind(at)
                .bind(id)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| Ok(command_record(r)?.into()))
                .collect()
        })
    }

    /// Where a command sorts in listings (its requested time and id), for a `before` cursor.
    pub async fn command_cursor(&self, id: &CommandId) -> Result<Option<CommandCursor>> {
        let at: Option<i64> = with_pool!(self, read, |pool| {
            sqlx::query_scalar("SELECT requested_at FROM commands WHERE command_id = $1")
                .bind(id.as_str())
                .fetch_optional(pool)
                .await?
        });
        Ok(at.map(|requested_at| CommandCursor {
            requested_at,
            command_id: id.to_string(),
        }))
    }

    /// One command, without invocations.
    pub async fn get_command(&self, id: &CommandId) -> Result<Option<Command>> {
        with_pool!(self, read, |pool| {
            sqlx::query("SELECT * FROM commands WHERE command_id = $1")
                .bind(id.as_str())
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(|r| command_record(r).map(Command::from))
                .transpose()
        })
    }

    /// The dispatcher's view of a command.
    pub async fn command_row(&self, id: &CommandId) -> Result<Option<CommandRow>> {
        with_pool!(self, read, |pool| {
            sqlx::query("SELECT * FROM commands WHERE command_id = $1")
                .bind(id.as_str())
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(|r| command_row(id, r))
                .transpose()
        })
    }

    /// Ids of commands that have not ended (to resume their dispatch after a restart), oldest
    /// first.
    pub async fn active_command_ids(&self) -> Result<Vec<CommandId>> {
        let ids: Vec<String> = with_pool!(self, read, |pool| {
            sqlx::query_scalar(
                "SELECT command_id FROM commands WHERE status IN ('Pending', 'InProgress', 'Cancelling')
                 ORDER BY requested_at, command_id",
            )
            .fetch_all(pool)
            .await?
        });
        Ok(ids.into_iter().filter_map(|s| s.parse().ok()).collect())
    }

    /// A command's invocations, in dispatch order.
    pub async fn list_invocations(&self, id: &CommandId) -> Result<Vec<Invocation>> {
        with_pool!(self, read, |pool| {
            sqlx::query("SELECT * FROM invocations WHERE command_id = $1 ORDER BY seq")
                .bind(id.as_str())
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| Ok(invocation_record(r)?.into()))
                .collect()
        })
    }

    /// One invocation.
    pub async fn get_invocation(
        &self,
        id: &CommandId,
        node: &NodeId,
    ) -> Result<Option<Invocation>> {
        with_pool!(self, read, |pool| {
            sqlx::query("SELECT * FROM invocations WHERE command_id = $1 AND node_id = $2")
                .bind(id.as_str())
                .bind(node.as_str())
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(|r| invocation_record(r).map(Invocation::from))
                .transpose()
        })
    }

    /// The dispatcher's view of a command's invocations, in dispatch order.
    pub async fn invocation_rows(&self, id: &CommandId) -> Result<Vec<InvocationRow>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(
                "SELECT node_id, status, delivered_at, started_at FROM invocations
                 WHERE command_id = $1 ORDER BY seq",
            )
            .bind(id.as_str())
            .fetch_all(pool)
            .await?
            .iter()
            .filter_map(invocation_row)
            .collect()
        }))
    }

    /// Invocations on a node that have not ended — only those already delivered when
    /// `delivered_only` — as (command, started).
    pub async fn open_invocations(
        &self,
        node: &NodeId,
        delivered_only: bool,
    ) -> Result<Vec<(CommandId, bool)>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(
                "SELECT command_id, started_at FROM invocations WHERE node_id = $1
                   AND (delivered_at IS NOT NULL OR $2 = 0)
                   AND status NOT IN ('Success', 'Failed', 'TimedOut', 'Cancelled')",
            )
            .bind(node.as_str())
            .bind(i64::from(delivered_only))
            .fetch_all(pool)
            .await?
            .iter()
            .filter_map(|r| {
                let id = r.text("command_id").parse().ok()?;
                Some((id, r.opt_int("started_at").is_some()))
            })
            .collect()
        }))
    }

    /// Marks invocations as delivered (their Run frame is about to be sent), and the command as
    /// InProgress. With a fence, only while its owner holds the command (else `Fenced`, and
    /// nothing changes), as for every dispatch write below.
    pub async fn mark_delivered(
        &self,
        id: &CommandId,
        nodes: &[NodeId],
        now: i64,
        fence: Option<&Fence>,
    ) -> Result<()> {
        with_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            leases::hold(Conn::from(&mut *tx), id, fence).await?;
            for chunk in nodes.chunks(500) {
                let sql = format!(
                    "UPDATE invocations SET delivered_at = $1, status_details = $2
                     WHERE command_id = $3 AND status = 'Pending' AND node_id IN ({})",
                    placeholders(4, chunk.len())
                );
                // Only placeholders are formatted in; values are bound.
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(now)
                    .bind(details::DELIVERED)
                    .bind(id.as_str());
                for n in chunk {
                    q = q.bind(n.as_str());
                }
                q.execute(&mut *tx).await?;
            }
            sqlx::query(
                "UPDATE commands SET status = 'InProgress', status_details = 'InProgress'
                 WHERE command_id = $1 AND status = 'Pending'",
            )
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Returns a delivered, not started invocation to Pending (its node lost it before starting).
    pub async fn mark_undelivered(
        &self,
        id: &CommandId,
        node: &NodeId,
        fence: Option<&Fence>,
    ) -> Result<()> {
        with_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            leases::hold(Conn::from(&mut *tx), id, fence).await?;
            sqlx::query(
                "UPDATE invocations SET delivered_at = NULL, status_details = 'Pending'
                 WHERE command_id = $1 AND node_id = $2 AND status = 'Pending'
                   AND started_at IS NULL",
            )
            .bind(id.as_str())
            .bind(node.as_str())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Records that the node started the invocation (a Cancelling one stays Cancelling). Returns
    /// the invocation's stored output when it was updated (None when it has ended or does not exist).
    pub async fn mark_started(
        &self,
        id: &CommandId,
        node: &NodeId,
        started_at: i64,
    ) -> Result<Option<OutputState>> {
        let (id, node) = (id.clone(), node.clone());
        self.writer
            .write(|reply| WriteOp::MarkStarted {
                id,
                node,
                started_at,
                reply,
            })
            .await
    }

    /// Marks invocations Cancelling (a cancel was sent to their nodes).
    pub async fn mark_cancelling(
        &self,
        id: &CommandId,
        nodes: &[NodeId],
        fence: Option<&Fence>,
    ) -> Result<()> {
        with_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            leases::hold(Conn::from(&mut *tx), id, fence).await?;
            for n in nodes {
                sqlx::query(
                    "UPDATE invocations SET status = 'Cancelling', status_details = 'Cancelling'
                     WHERE command_id = $1 AND node_id = $2 AND status IN ('Pending', 'InProgress')",
                )
                .bind(id.as_str())
                .bind(n.as_str())
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query("UPDATE commands SET cancel_requested = 1 WHERE command_id = $1")
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Records that an operator cancelled the command.
    pub async fn mark_cancel_requested(&self, id: &CommandId, fence: Option<&Fence>) -> Result<()> {
        with_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            leases::hold(Conn::from(&mut *tx), id, fence).await?;
            sqlx::query("UPDATE commands SET cancel_requested = 1 WHERE command_id = $1")
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Ends invocations, moving the command's counters in the same transaction. Returns the nodes
    /// whose invocation this call ended (an invocation already terminal is left as it is).
    ///
    /// The dispatcher's ends (timeouts, cancels, skips) carry its fence; results an agent reported
    /// carry none: they are facts about the node, whichever replica holds its connection.
    pub async fn finish_invocations(
        &self,
        id: &CommandId,
        ends: &[(NodeId, Finish)],
        fence: Option<&Fence>,
    ) -> Result<Vec<NodeId>> {
        let (id, ends, fence) = (id.clone(), ends.to_vec(), fence.cloned());
        self.writer
            .write(|reply| WriteOp::Finish {
                id,
                ends,
                fence,
                reply,
            })
            .await
    }

    /// Records how much of an output pipe is stored, and its inline copy (its first bytes).
    pub async fn update_output(
        &self,
        id: &CommandId,
        node: &NodeId,
        stderr: bool,
        stored: u64,
        inline: &[u8],
    ) -> Result<()> {
        let (id, node, inline) = (id.clone(), node.clone(), inline.to_vec());
        self.writer
            .write(|reply| WriteOp::UpdateOutput {
                id,
                node,
                stderr,
                stored,
                inline,
                reply,
            })
            .await
    }

    /// Stored length and inline copy of both pipes of an invocation (empty when it has none).
    pub async fn output_state(&self, id: &CommandId, node: &NodeId) -> Result<OutputState> {
        Ok(self
            .invocation_output_state(id, node)
            .await?
            .unwrap_or_default())
    }

    /// The stored output of an invocation, or None when the node has no invocation of the command.
    pub async fn invocation_output_state(
        &self,
        id: &CommandId,
        node: &NodeId,
    ) -> Result<Option<OutputState>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(
                "SELECT stdout_bytes, stdout_inline, stderr_bytes, stderr_inline FROM invocations
                 WHERE command_id = $1 AND node_id = $2",
            )
            .bind(id.as_str())
            .bind(node.as_str())
            .fetch_optional(pool)
            .await?
            .as_ref()
            .map(output_state_from_row)
        }))
    }

    /// Sets a command's final (or Cancelling) status.
    pub async fn set_command_status(
        &self,
        id: &CommandId,
        status: CommandStatus,
        details: &str,
        fence: Option<&Fence>,
    ) -> Result<()> {
        with_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            leases::hold(Conn::from(&mut *tx), id, fence).await?;
            sqlx::query(
                "UPDATE commands SET status = $1, status_details = $2 WHERE command_id = $3",
            )
            .bind(status.as_str())
            .bind(details)
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Counts of a command's invocations by (status, details).
    pub async fn invocation_tally(&self, id: &CommandId) -> Result<Tally> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(
                "SELECT status, status_details, COUNT(*) AS n FROM invocations WHERE command_id = $1
                 GROUP BY status, status_details",
            )
            .bind(id.as_str())
            .fetch_all(pool)
            .await?
            .iter()
            .filter_map(|r| {
                // A status this build does not know (a hand-edited row) counts as nothing.
                let status = InvocationStatus::parse(&r.text("status"))?;
                Some(((status, r.text("status_details")), r.int("n") as u64))
            })
            .collect()
        }))
    }
}

/// Counts of a command's invocations by (status, details).
pub type Tally = HashMap<(InvocationStatus, String), u64>;

/// A stored rate, parsed. Every row was checked by the same parser when it was sent, so only a
/// hand-edited row fails; it runs with SSM's default (as it always has), with a warning.
fn stored_rate(
    id: &CommandId,
    column: &str,
    text: &str,
    parse: fn(&str) -> std::result::Result<Rate, ParseError>,
    default: Rate,
) -> Rate {
    parse(text).unwrap_or_else(|e| {
        tracing::warn!(command_id = %id, column, error = %e.0, "stored rate does not parse; using {default}");
        default
    })
}

fn parse_command_status(s: &str) -> CommandStatus {
    CommandStatus::parse(s).unwrap_or(CommandStatus::Failed)
}

fn invocation_row(r: &impl Columns) -> Option<InvocationRow> {
    Some(InvocationRow {
        node_id: r.text("node_id").parse().ok()?,
        status: InvocationStatus::parse(&r.text("status"))?,
        delivered: r.opt_int("delivered_at").is_some(),
        started: r.opt_int("started_at").is_some(),
    })
}

/// The dispatcher's view of command `id`'s row.
fn command_row(id: &CommandId, r: &impl Columns) -> Result<CommandRow> {
    Ok(CommandRow {
        command_id: id.clone(),
        spec: CommandSpec {
            commands: serde_json::from_str(&r.text("commands"))?,
            working_dir: r.text("working_dir"),
            execution_timeout: r.int("execution_timeout") as u64,
            delivery_timeout: r.int("delivery_timeout") as u64,
            max_concurrency: stored_rate(
                id,
                "max_concurrency",
                &r.text("max_concurrency"),
                Rate::parse_concurrency,
                Rate::DEFAULT_CONCURRENCY,
            ),
            max_errors: stored_rate(
                id,
                "max_errors",
                &r.text("max_errors"),
                Rate::parse_errors,
                Rate::DEFAULT_ERRORS,
            ),
            run_as: r.text("run_as"),
            memory_limit_mb: r.opt_int("memory_limit_mb").map(|v| v as u64),
            cpu_limit_percent: r.opt_int("cpu_limit_percent").map(|v| v as u32),
            requested_at: r.int("requested_at"),
        },
        status: parse_command_status(&r.text("status")),
        target_count: r.int("target_count") as u64,
        error_count: r.int("error_count") as u64,
        cancel_requested: r.flag("cancel_requested"),
    })
}

fn decode_id<T: std::str::FromStr>(s: String) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    s.parse()
        .map_err(|e: T::Err| sqlx::Error::Decode(Box::new(e)).into())
}

/// A command's row, as stored (`edge` presents it as an API `Command`).
#[derive(Clone, Debug)]
pub(crate) struct CommandRecord {
    pub(crate) command_id: CommandId,
    pub(crate) document_name: String,
    pub(crate) document_version: String,
    /// The document's parameters as given; `None` for a command stored before they were kept.
    pub(crate) parameters: Option<BTreeMap<String, Vec<String>>>,
    /// Script lines.
    pub(crate) commands: Vec<String>,
    pub(crate) working_dir: String,
    pub(crate) comment: String,
    pub(crate) node_ids: Vec<NodeId>,
    pub(crate) targets: String,
    pub(crate) status: CommandStatus,
    pub(crate) status_details: String,
    /// Epoch ms.
    pub(crate) requested_at: i64,
    pub(crate) max_concurrency: String,
    pub(crate) max_errors: String,
    /// Seconds.
    pub(crate) delivery_timeout: u64,
    /// Seconds.
    pub(crate) execution_timeout: u64,
    pub(crate) run_as: String,
    pub(crate) memory_limit_mb: Option<u64>,
    pub(crate) cpu_limit_percent: Option<u32>,
    pub(crate) target_count: u64,
    pub(crate) completed_count: u64,
    pub(crate) error_count: u64,
    pub(crate) delivery_timed_out_count: u64,
    /// Bucket, prefix, region ("" bucket: none).
    pub(crate) output_s3: fleetrun_proto::api::OutputS3,
}

/// An invocation's row, as stored (`edge` presents it as an API `Invocation`).
#[derive(Clone, Debug)]
pub(crate) struct InvocationRecord {
    pub(crate) command_id: CommandId,
    pub(crate) node_id: NodeId,
    pub(crate) node_name: String,
    pub(crate) status: InvocationStatus,
    pub(crate) status_details: String,
    pub(crate) exit_code: i32,
    pub(crate) signal: Option<i32>,
    /// Stored lengths and inline copies of both pipes.
    pub(crate) output: OutputState,
    /// Epoch ms.
    pub(crate) started_at: Option<i64>,
    /// Epoch ms.
    pub(crate) finished_at: Option<i64>,
    pub(crate) limits_applied: String,
    pub(crate) cpu_user_ms: Option<u64>,
    pub(crate) cpu_system_ms: Option<u64>,
    pub(crate) max_rss_kb: Option<u64>,
    pub(crate) message: String,
}

pub(super) fn command_record(r: &impl Columns) -> Result<CommandRecord> {
    let given = r.text("parameters");
    Ok(CommandRecord {
        command_id: decode_id(r.text("command_id"))?,
        document_name: r.text("document_name"),
        document_version: r.text("document_version"),
        parameters: if given.is_empty() {
            None
        } else {
            Some(serde_json::from_str(&given)?)
        },
        commands: serde_json::from_str(&r.text("commands"))?,
        working_dir: r.text("working_dir"),
        comment: r.text("comment"),
        node_ids: serde_json::from_str(&r.text("node_ids"))?,
        targets: r.text("targets"),
        status: parse_command_status(&r.text("status")),
        status_details: r.text("status_details"),
        requested_at: r.int("requested_at"),
        max_concurrency: r.text("max_concurrency"),
        max_errors: r.text("max_errors"),
        delivery_timeout: r.int("delivery_timeout") as u64,
        execution_timeout: r.int("execution_timeout") as u64,
        run_as: r.text("run_as"),
        memory_limit_mb: r.opt_int("memory_limit_mb").map(|v| v as u64),
        cpu_limit_percent: r.opt_int("cpu_limit_percent").map(|v| v as u32),
        target_count: r.int("target_count") as u64,
        completed_count: r.int("completed_count") as u64,
        error_count: r.int("error_count") as u64,
        delivery_timed_out_count: r.int("delivery_timed_out_count") as u64,
        output_s3: fleetrun_proto::api::OutputS3 {
            bucket: r.text("output_s3_bucket"),
            prefix: r.text("output_s3_prefix"),
            region: r.text("output_s3_region"),
        },
    })
}

pub(super) fn invocation_record(r: &impl Columns) -> Result<InvocationRecord> {
    Ok(InvocationRecord {
        command_id: decode_id(r.text("command_id"))?,
        node_id: decode_id(r.text("node_id"))?,
        node_name: r.text("node_name"),
        status: InvocationStatus::parse(&r.text("status")).unwrap_or(InvocationStatus::Failed),
        status_details: r.text("status_details"),
        exit_code: int32(r.int("exit_code")),
        signal: r.opt_int("signal").map(int32),
        output: output_state_from_row(r),
        started_at: r.opt_int("started_at"),
        finished_at: r.opt_int("finished_at"),
        limits_applied: r.text("limits_applied"),
        cpu_user_ms: r.opt_int("cpu_user_ms").map(|v| v as u64),
        cpu_system_ms: r.opt_int("cpu_system_ms").map(|v| v as u64),
        max_rss_kb: r.opt_int("max_rss_kb").map(|v| v as u64),
        message: r.text("message"),
    })
}

/// An INTEGER column the store wrote from an `i32` (exit code, signal); a hand-edited value out of
/// range reads as -1.
fn int32(v: i64) -> i32 {
    i32::try_from(v).unwrap_or(-1)
}

/// Totals for `GET /v1/storage`.
pub struct Totals {
    /// Commands kept.
    pub commands: u64,
    /// Invocations kept.
    pub invocations: u64,
    /// Stored output bytes.
    pub output_bytes: u64,
    /// Epoch ms of the oldest command.
    pub oldest_command_at: Option<i64>,
}

impl Store {
    /// Counts of what is kept.
    pub async fn totals(&self) -> Result<Totals> {
        with_pool!(self, read, |pool| {
            let c = sqlx::query("SELECT COUNT(*) AS n, MIN(requested_at) AS oldest FROM commands")
                .fetch_one(pool)
                .await?;
            // PostgreSQL's SUM of BIGINTs is NUMERIC: cast back, as SQLite's is INTEGER.
            let i = sqlx::query(
                "SELECT COUNT(*) AS n,
                   CAST(COALESCE(SUM(stdout_bytes + stderr_bytes), 0) AS BIGINT) AS bytes
                 FROM invocations",
            )
            .fetch_one(pool)
            .await?;
            Ok(Totals {
                commands: c.int("n") as u64,
                oldest_command_at: c.opt_int("oldest"),
                invocations: i.int("n") as u64,
                output_bytes: i.int("bytes") as u64,
            })
        })
    }

    /// Up to `limit` ended commands requested before `before` (epoch ms), oldest first.
    pub async fn expired_commands(&self, before: i64, limit: u32) -> Result<Vec<CommandId>> {
        let ids: Vec<String> = with_pool!(self, read, |pool| {
            sqlx::query_scalar(
                "SELECT command_id FROM commands
                 WHERE requested_at < $1 AND status IN ('Success', 'Failed', 'TimedOut', 'Cancelled')
                 ORDER BY requested_at, command_id LIMIT $2",
            )
            .bind(before)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        });
        Ok(ids.into_iter().filter_map(|s| s.parse().ok()).collect())
    }

    /// Deletes commands and their invocations (their output objects must be deleted first).
    pub async fn delete_commands(&self, ids: &[CommandId]) -> Result<()> {
        with_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            for id in ids {
                for q in [
                    "DELETE FROM s3_exports WHERE command_id = $1",
                    "DELETE FROM invocations WHERE command_id = $1",
                    "DELETE FROM commands WHERE command_id = $1",
                ] {
                    sqlx::query(q).bind(id.as_str()).execute(&mut *tx).await?;
                }
            }
            tx.commit().await?;
        });
        Ok(())
    }
}

/// Stored length and inline copy of both pipes of an invocation.
#[derive(Clone, Debug, Default)]
pub struct OutputState {
    /// Stdout: stored length, inline copy.
    pub stdout: (u64, Vec<u8>),
    /// Stderr: stored length, inline copy.
    pub stderr: (u64, Vec<u8>),
}

impl OutputState {
    /// One pipe's stored length and inline copy.
    pub fn pipe(self, pipe: fleetrun_proto::channel::Pipe) -> (u64, Vec<u8>) {
        match pipe {
            fleetrun_proto::channel::Pipe::Stdout => self.stdout,
            fleetrun_proto::channel::Pipe::Stderr => self.stderr,
        }
    }
}

fn output_state_from_row(r: &impl Columns) -> OutputState {
    OutputState {
        stdout: (
            r.int("stdout_bytes") as u64,
            r.opt_bytes("stdout_inline").unwrap_or_default(),
        ),
        stderr: (
            r.int("stderr_bytes") as u64,
            r.opt_bytes("stderr_inline").unwrap_or_default(),
        ),
    }
}

pub(super) async fn mark_started(
    conn: Conn<'_>,
    id: &CommandId,
    node: &NodeId,
    started_at: i64,
) -> Result<Option<OutputState>> {
    Ok(with_conn!(conn, |c| {
        sqlx::query(
            "UPDATE invocations SET started_at = COALESCE(started_at, $1),
                 status = CASE status WHEN 'Cancelling' THEN 'Cancelling' ELSE 'InProgress' END,
                 status_details = CASE status WHEN 'Cancelling' THEN 'Cancelling' ELSE 'InProgress' END
             WHERE command_id = $2 AND node_id = $3 AND status IN ('Pending', 'InProgress', 'Cancelling')
             RETURNING stdout_bytes, stdout_inline, stderr_bytes, stderr_inline",
        )
        .bind(started_at)
        .bind(id.as_str())
        .bind(node.as_str())
        .fetch_optional(c)
        .await?
        .as_ref()
        .map(output_state_from_row)
    }))
}

pub(super) async fn update_output(
    conn: Conn<'_>,
    id: &CommandId,
    node: &NodeId,
    stderr: bool,
    stored: u64,
    inline: &[u8],
) -> Result<()> {
    let q = if stderr {
        "UPDATE invocations SET stderr_bytes = $1, stderr_inline = $2 WHERE command_id = $3 AND node_id = $4"
    } else {
        "UPDATE invocations SET stdout_bytes = $1, stdout_inline = $2 WHERE command_id = $3 AND node_id = $4"
    };
    with_conn!(conn, |c| {
        sqlx::query(q)
            .bind(stored as i64)
            .bind(inline)
            .bind(id.as_str())
            .bind(node.as_str())
            .execute(c)
            .await?;
    });
    Ok(())
}

/// Ends the invocations of `ends` that have not ended yet, in the caller's transaction on `conn`.
///
/// Each end is one `UPDATE` conditioned on a non-terminal status, and the counters move by the
/// rows it changed: on PostgreSQL a concurrent end of the same invocation waits for this one's
/// row lock, then finds it terminal and changes nothing, so no end is counted twice.
pub(super) async fn finish_invocations(
    conn: Conn<'_>,
    id: &CommandId,
    ends: &[(NodeId, Finish)],
) -> Result<Vec<NodeId>> {
    let mut ended = Vec::new();
    let (mut errors, mut delivery_timeouts) = (0i64, 0i64);
    let q = concat!(
        "UPDATE invocations SET status = $1, status_details = $2, exit_code = $3, signal = $4,",
        " started_at = COALESCE(started_at, $5), finished_at = $6, cpu_user_ms = $7,",
        " cpu_system_ms = $8, max_rss_kb = $9, message = $10, limits_applied = $11",
        " WHERE command_id = $12 AND node_id = $13",
        " AND status NOT IN ('Success', 'Failed', 'TimedOut', 'Cancelled')"
    );
    with_conn!(conn, |c| {
        for (node, f) in ends {
            let r = sqlx::query(q)
                .bind(f.status.as_str())
                .bind(f.details)
                .bind(i64::from(f.exit_code))
                .bind(f.signal.map(i64::from))
                .bind(f.started_at)
                .bind(f.finished_at)
                .bind(f.cpu_user_ms.map(|v| v as i64))
                .bind(f.cpu_system_ms.map(|v| v as i64))
                .bind(f.max_rss_kb.map(|v| v as i64))
                .bind(&f.message)
                .bind(&f.limits_applied)
                .bind(id.as_str())
                .bind(node.as_str())
                .execute(&mut *c)
                .await?;
            if r.rows_affected() > 0 {
                ended.push(node.clone());
                errors += i64::from(f.is_error());
                delivery_timeouts += i64::from(f.details == details::DELIVERY_TIMED_OUT);
            }
        }
        // The export of an ended invocation's output to its command's bucket is queued in the same
        // transaction as its end: a crash cannot lose it.
        for node in &ended {
            sqlx::query(
                "INSERT INTO s3_exports (command_id, node_id, queued_at, next_attempt_at)
                 SELECT command_id, $1, $2, $2 FROM commands
                 WHERE command_id = $3 AND output_s3_bucket != ''
                 ON CONFLICT DO NOTHING",
            )
            .bind(node.as_str())
            .bind(now_ms())
            .bind(id.as_str())
            .execute(&mut *c)
            .await?;
        }
        // Nothing ended, nothing to count (and no lock on the command's row).
        if !ended.is_empty() {
            sqlx::query(
                "UPDATE commands SET completed_count = completed_count + $1,
                     error_count = error_count + $2,
                     delivery_timed_out_count = delivery_timed_out_count + $3
                 WHERE command_id = $4",
            )
            .bind(ended.len() as i64)
            .bind(errors)
            .bind(delivery_timeouts)
            .bind(id.as_str())
            .execute(&mut *c)
            .await?;
        }
    });
    Ok(ended)
}

/// The bind value for [`visible_clause`]: NULL for no restriction, else a JSON array of node ids.
pub(crate) fn visible_json(visible: Option<&HashSet<NodeId>>) -> Option<String> {
    visible.map(|set| {
        serde_json::Value::from(
            set.iter()
                .map(|n| n.as_str().to_owned())
                .collect::<Vec<_>>(),
        )
        .to_string()
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A command on `n` nodes (mi-0..), all invocations Pending.
    pub(crate) async fn command_on(store: &Store, n: u128) -> (CommandId, Vec<NodeId>) {
        let id: CommandId = "0b6a1f0e-4c4b-4f5e-9a39-7f1d2a3b4c5d".parse().unwrap();
        let nodes: Vec<NodeId> = (0..n).map(NodeId::from_random).collect();
        store
            .insert_command(&new_command(&id, &nodes))
            .await
            .unwrap();
        (id, nodes)
    }

    /// A command (not stored) on these nodes.
    pub(crate) fn new_command(id: &CommandId, nodes: &[NodeId]) -> NewCommand {
        NewCommand {
            command_id: id.clone(),
            document_name: "AWS-RunShellScript".into(),
            document_version: "1".into(),
            parameters: BTreeMap::new(),
            comment: String::new(),
            node_ids: nodes.to_vec(),
            targets: String::new(),
            spec: CommandSpec {
                commands: vec!["true".into()],
                working_dir: String::new(),
                execution_timeout: 60,
                delivery_timeout: 60,
                max_concurrency: Rate::DEFAULT_CONCURRENCY,
                max_errors: Rate::DEFAULT_ERRORS,
                run_as: String::new(),
                memory_limit_mb: None,
                cpu_limit_percent: None,
                requested_at: 1,
            },
            invocations: nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), format!("n{i}")))
                .collect(),
            ssm_extra: None,
            idempotency: None,
            output_s3: None,
            owner: None,
        }
    }

    fn ended(status: InvocationStatus, why: &'static str) -> Finish {
        Finish::without_running(status, why, 2, "test")
    }

    /// An invocation ends once: a second end (of another status) changes neither it nor the
    /// command's counters; a non-terminal status (Cancelling) can still end.
    #[tokio::test]
    async fn finish_invocations_moves_only_from_a_non_terminal_status() {
        let (_dir, stores) = crate::testing::stores().await;
        for (kind, store) in stores {
            finish_only_from_non_terminal(kind, &store).await;
        }
    }

    async fn finish_only_from_non_terminal(kind: &str, store: &Store) {
        let (id, n) = command_on(store, 3).await;
        let success = ended(InvocationStatus::Success, details::SUCCESS);
        let failed = ended(InvocationStatus::Failed, details::FAILED);

        let first = store
            .finish_invocations(&id, &[(n[0].clone(), success)], None)
            .await
            .unwrap();
        assert_eq!(first, vec![n[0].clone()], "{kind}");
        let second = store
            .finish_invocations(
                &id,
                &[(n[0].clone(), failed.clone()), (n[1].clone(), failed)],
                None,
            )
            .await
            .unwrap();
        assert_eq!(
            second,
            vec![n[1].clone()],
            "{kind}: n0 was terminal already"
        );

        store
            .mark_cancelling(&id, &[n[2].clone()], None)
            .await
            .unwrap();
        let timed_out = ended(InvocationStatus::TimedOut, details::DELIVERY_TIMED_OUT);
        let third = store
            .finish_invocations(&id, &[(n[2].clone(), timed_out)], None)
            .await
            .unwrap();
        assert_eq!(
            third,
            vec![n[2].clone()],
            "{kind}: Cancelling is not terminal"
        );
        let again = store
            .finish_invocations(
                &id,
                &[(
                    n[2].clone(),
                    ended(InvocationStatus::Cancelled, details::CANCELLED),
                )],
                None,
            )
            .await
            .unwrap();
        assert!(again.is_empty(), "{kind}");

        let cmd = store.get_command(&id).await.unwrap().unwrap();
        assert_eq!(
            (
                cmd.completed_count,
                cmd.error_count,
                cmd.delivery_timed_out_count
            ),
            (3, 1, 1),
            "{kind}"
        );
        let statuses: Vec<_> = store
            .invocation_rows(&id)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.status)
            .collect();
        use InvocationStatus::{Failed, Success, TimedOut};
        assert_eq!(statuses, vec![Success, Failed, TimedOut], "{kind}");
        let tally = store.invocation_tally(&id).await.unwrap();
        assert_eq!(
            tally.get(&(Success, details::SUCCESS.to_owned())),
            Some(&1),
            "{kind}"
        );
        assert_eq!(tally.values().sum::<u64>(), 3, "{kind}");
    }

    /// Sends racing with one idempotency key (each with its own command id): exactly one is
    /// stored, the others are told the key is taken, and the key then finds the one stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_sends_with_one_idempotency_key_store_one_command() {
        let (_dir, stores) = crate::testing::stores().await;
        for (kind, store) in stores {
            let sends = (0..8u128).map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let id = CommandId::from_random(100 + i);
                    let mut c = new_command(&id, &[NodeId::from_random(i)]);
                    c.idempotency = Some(IdempotencyKey {
                        principal: "alice".into(),
                        key: "native:k1".into(),
                        request_hash: "h1".into(),
                    });
                    match store.insert_command(&c).await {
                        Ok(()) => Ok(Some(id)),
                        Err(InsertError::DuplicateKey) => Ok(None),
                        Err(InsertError::Store(e)) => Err(e.to_string()),
                    }
                })
            });
            let mut won = Vec::new();
            for s in sends {
                if let Some(id) = s.await.expect("task").expect("no storage error") {
                    won.push(id);
                }
            }
            assert_eq!(won.len(), 1, "{kind}: {won:?}");
            let (cmd, hash) = store
                .command_by_idempotency_key("alice", "native:k1")
                .await
                .unwrap()
                .expect("the stored send");
            assert_eq!((&cmd.command_id, hash.as_str()), (&won[0], "h1"), "{kind}");
            // The refused sends left nothing behind.
            let totals = store.totals().await.unwrap();
            assert_eq!((totals.commands, totals.invocations), (1, 1), "{kind}");
        }
    }

    /// A command's life, from its creation to its deletion, through every store call on it:
    /// each answers as expected, and the same on both databases.
    #[tokio::test]
    async fn a_command_lifecycle_answers_the_same_on_both() {
        let (_dir, stores) = crate::testing::stores().await;
        let mut seen = Vec::new();
        for (kind, store) in stores {
            seen.push((kind, lifecycle(kind, &store).await));
        }
        assert_eq!(
            seen[0].1, seen[1].1,
            "{} and {} differ",
            seen[0].0, seen[1].0
        );
    }

    /// Runs the life of three commands on `store`; what its reads answered, to compare.
    async fn lifecycle(kind: &str, store: &Store) -> Vec<serde_json::Value> {
        let (a, b, c) = (
            NodeId::from_random(1),
            NodeId::from_random(2),
            NodeId::from_random(3),
        );
        let (id1, id2, id3) = (
            CommandId::from_random(11),
            CommandId::from_random(12),
            CommandId::from_random(13),
        );
        let mut seen = Vec::new();

        // id1 on a and b, b refused at once, with a script run; id2 and id3 in one millisecond.
        let mut c1 = new_command(&id1, &[a.clone(), b.clone()]);
        c1.spec.requested_at = 10;
        let refused = Finish::without_running(InvocationStatus::Failed, details::FAILED, 10, "no");
        let extras = CommandExtras {
            ended: vec![(b.clone(), refused)],
            script: Some(("deploy".into(), 2)),
            script_files: ScriptFiles {
                input: Some("in.txt".into()),
                output: None,
            },
        };
        store.insert_command_with(&c1, &extras).await.unwrap();
        let mut c2 = new_command(&id2, std::slice::from_ref(&c));
        c2.spec.requested_at = 20;
        store.insert_command(&c2).await.unwrap();
        let mut c3 = new_command(&id3, std::slice::from_ref(&a));
        c3.spec.requested_at = 20;
        store.insert_command(&c3).await.unwrap();

        let ids = |cs: Vec<Command>| cs.into_iter().map(|c| c.command_id).collect::<Vec<_>>();
        let mut at_20 = vec![id2.clone(), id3.clone()];
        at_20.sort_by(|x, y| y.as_str().cmp(x.as_str()));
        let all = ids(store.list_commands(10, None, None).await.unwrap());
        assert_eq!(all, [at_20.clone(), vec![id1.clone()]].concat(), "{kind}");
        let on_c = ids(store
            .list_commands(10, Some(&HashSet::from([c.clone()])), None)
            .await
            .unwrap());
        assert_eq!(on_c, vec![id2.clone()], "{kind}");
        let on_none = store
            .list_commands(10, Some(&HashSet::new()), None)
            .await
            .unwrap();
        assert!(on_none.is_empty(), "{kind}");
        let cursor = store
            .command_cursor(&at_20[0])
            .await
            .unwrap()
            .expect("cursor");
        let after = ids(store.list_commands(10, None, Some(&cursor)).await.unwrap());
        assert_eq!(after, vec![at_20[1].clone(), id1.clone()], "{kind}");
        let first = ids(store.list_commands(1, None, None).await.unwrap());
        assert_eq!(first, vec![at_20[0].clone()], "{kind}");

        // Delivery: only the Pending invocation is delivered; the command goes InProgress.
        store
            .mark_delivered(&id1, &[a.clone(), b.clone()], 11, None)
            .await
            .unwrap();
        let rows = store.invocation_rows(&id1).await.unwrap();
        let delivered: Vec<_> = rows.iter().map(|r| (r.delivered, r.status)).collect();
        assert_eq!(
            delivered,
            vec![
                (true, InvocationStatus::Pending),
                (false, InvocationStatus::Failed)
            ],
            "{kind}"
        );
        let mut open = store.open_invocations(&a, false).await.unwrap();
        open.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
        let mut expected = vec![(id1.clone(), false), (id3.clone(), false)];
        expected.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
        assert_eq!(open, expected, "{kind}");
        let open = store.open_invocations(&a, true).await.unwrap();
        assert_eq!(open, vec![(id1.clone(), false)], "{kind}");

        // Start, output, end.
        let started = store.mark_started(&id1, &a, 12).await.unwrap();
        assert_eq!(started.map(|s| s.stdout), Some((0, Vec::new())), "{kind}");
        assert!(
            store.mark_started(&id1, &b, 12).await.unwrap().is_none(),
            "{kind}"
        );
        store
            .update_output(&id1, &a, false, 5, b"hello")
            .await
            .unwrap();
        store
            .update_output(&id1, &a, true, 3, b"err")
            .await
            .unwrap();
        let out = store.output_state(&id1, &a).await.unwrap();
        assert_eq!(
            (out.stdout, out.stderr),
            ((5, b"hello".to_vec()), (3, b"err".to_vec())),
            "{kind}"
        );
        assert!(
            store
                .invocation_output_state(&id1, &c)
                .await
                .unwrap()
                .is_none(),
            "{kind}"
        );
        let done = Finish {
            status: InvocationStatus::Success,
            details: details::SUCCESS,
            exit_code: 0,
            signal: Some(15),
            started_at: Some(99),
            finished_at: 14,
            cpu_user_ms: Some(7),
            cpu_system_ms: Some(8),
            max_rss_kb: Some(9),
            message: "ok".into(),
            limits_applied: "cgroup".into(),
        };
        let ended = store
            .finish_invocations(&id1, &[(a.clone(), done)], None)
            .await
            .unwrap();
        assert_eq!(ended, vec![a.clone()], "{kind}");
        store
            .set_command_status(&id1, CommandStatus::Success, "Success", None)
            .await
            .unwrap();
        let inv = store.get_invocation(&id1, &a).await.unwrap().expect("inv");
        assert_eq!(
            (inv.exit_code, inv.stdout.as_str(), inv.stderr.as_str()),
            (0, "hello", "err"),
            "{kind}"
        );
        seen.push(serde_json::to_value(inv).unwrap());
        seen.push(serde_json::to_value(store.list_invocations(&id1).await.unwrap()).unwrap());
        let cmd = store.get_command(&id1).await.unwrap().expect("id1");
        assert_eq!(
            (cmd.status, cmd.completed_count, cmd.error_count),
            (CommandStatus::Success, 2, 1),
            "{kind}"
        );
        seen.push(serde_json::to_value(cmd).unwrap());

        // A delivery undone, a cancel, the command rows.
        store
            .mark_delivered(&id3, std::slice::from_ref(&a), 15, None)
            .await
            .unwrap();
        store.mark_undelivered(&id3, &a, None).await.unwrap();
        let rows = store.invocation_rows(&id3).await.unwrap();
        assert!(!rows[0].delivered, "{kind}");
        store
            .mark_cancelling(&id2, std::slice::from_ref(&c), None)
            .await
            .unwrap();
        let row = store.command_row(&id2).await.unwrap().expect("id2");
        assert!(row.cancel_requested, "{kind}");
        let rows = store.invocation_rows(&id2).await.unwrap();
        assert_eq!(rows[0].status, InvocationStatus::Cancelling, "{kind}");
        assert!(
            !store
                .command_row(&id3)
                .await
                .unwrap()
                .expect("id3")
                .cancel_requested
        );
        store.mark_cancel_requested(&id3, None).await.unwrap();
        assert!(
            store
                .command_row(&id3)
                .await
                .unwrap()
                .expect("id3")
                .cancel_requested
        );
        assert!(
            store
                .command_row(&CommandId::from_random(99))
                .await
                .unwrap()
                .is_none()
        );
        let active = store.active_command_ids().await.unwrap();
        let oldest_first: Vec<_> = at_20.iter().rev().cloned().collect();
        assert_eq!(active, oldest_first, "{kind}: oldest first, then by id");
        let mut tally: Vec<_> = store
            .invocation_tally(&id1)
            .await
            .unwrap()
            .into_iter()
            .collect();
        tally.sort_by_key(|((s, _), _)| s.as_str());
        seen.push(serde_json::to_value(format!("{tally:?}")).unwrap());

        // What is kept, what expired, deletion.
        let t = store.totals().await.unwrap();
        assert_eq!(
            (
                t.commands,
                t.invocations,
                t.output_bytes,
                t.oldest_command_at
            ),
            (3, 4, 8, Some(10)),
            "{kind}"
        );
        assert_eq!(
            store.expired_commands(100, 10).await.unwrap(),
            vec![id1.clone()]
        );
        assert!(store.expired_commands(10, 10).await.unwrap().is_empty());
        store
            .delete_commands(std::slice::from_ref(&id1))
            .await
            .unwrap();
        assert!(store.get_command(&id1).await.unwrap().is_none(), "{kind}");
        assert!(
            store.list_invocations(&id1).await.unwrap().is_empty(),
            "{kind}"
        );
        let t = store.totals().await.unwrap();
        assert_eq!(
            (t.commands, t.invocations, t.output_bytes),
            (2, 2, 0),
            "{kind}"
        );
        seen.push(
            serde_json::to_value(store.list_commands(10, None, None).await.unwrap()).unwrap(),
        );
        seen
    }

    /// A command stored by the first schema (before commands kept their parameters) reads with
    /// AWS-RunShellScript's parameters derived from its script, working dir and timeout. (SQLite
    /// alone: PostgreSQL's history starts at the baseline, which keeps them.)
    #[tokio::test]
    async fn a_command_stored_by_the_first_schema_reads_with_derived_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        {
            let opts = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true);
            let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
            sqlx::migrate!("./migrations/sqlite")
                .run_to(1, &pool)
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO commands (command_id, document_name, commands, working_dir, execution_timeout,
                    delivery_timeout, comment, node_ids, targets, max_concurrency, max_errors, status,
                    status_details, requested_at, target_count, completed_count)
                 VALUES ('3f2504e0-4f89-41d3-9a0c-0305e82c3301', 'AWS-RunShellScript', '[\"uptime\",\"df -h\"]',
                    '/srv', 120, 600, 'old', '[]', 'all', '50', '0', 'Success', 'Success', 1000, 1, 1)",
            )
            .execute(&pool)
            .await
            .unwrap();
            pool.close().await;
        }
        let store = Store::open_sqlite(&path).await.unwrap();
        let id: CommandId = "3f2504e0-4f89-41d3-9a0c-0305e82c3301".parse().unwrap();
        let cmd = store
            .get_command(&id)
            .await
            .unwrap()
            .expect("the legacy row");
        let expected = BTreeMap::from([
            (
                "commands".to_owned(),
                vec!["uptime".to_owned(), "df -h".to_owned()],
            ),
            ("workingDirectory".to_owned(), vec!["/srv".to_owned()]),
            ("executionTimeout".to_owned(), vec!["120".to_owned()]),
        ]);
        assert_eq!(cmd.parameters, expected);
        assert_eq!(
            (cmd.document_version.as_str(), cmd.comment.as_str()),
            ("", "old")
        );
        assert_eq!(cmd.status, CommandStatus::Success);
        assert_eq!(cmd.execution_timeout_secs, 120);
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;

    fn command(id: &CommandId, max_concurrency: Rate, max_errors: Rate) -> NewCommand {
        NewCommand {
            command_id: id.clone(),
            document_name: "AWS-RunShellScript".into(),
            document_version: "1".into(),
            parameters: BTreeMap::new(),
            comment: String::new(),
            node_ids: Vec::new(),
            targets: "all".into(),
            spec: CommandSpec {
                commands: vec!["true".into()],
                working_dir: String::new(),
                execution_timeout: 60,
                delivery_timeout: 60,
                max_concurrency,
                max_errors,
                run_as: String::new(),
                memory_limit_mb: None,
                cpu_limit_percent: None,
                requested_at: 0,
            },
            invocations: Vec::new(),
            ssm_extra: None,
            idempotency: None,
            output_s3: None,
            owner: None,
        }
    }

    // Rates are stored as the text SSM shows (`25%`) and come back parsed; a hand-edited value
    // that does not parse runs with SSM's default, as the dispatcher's own fallback did.
    #[tokio::test]
    async fn rates_are_stored_as_text_and_read_back_parsed() {
        let (_dir, stores) = crate::testing::stores().await;
        for (_, store) in stores {
            rates_read_back(&store).await;
        }
    }

    async fn rates_read_back(store: &Store) {
        let id = CommandId::from_random(1);
        store
            .insert_command(&command(&id, Rate::Percent(25), Rate::Count(3)))
            .await
            .unwrap();
        let spec = store.command_row(&id).await.unwrap().unwrap().spec;
        assert_eq!(
            (spec.max_concurrency, spec.max_errors),
            (Rate::Percent(25), Rate::Count(3))
        );
        let shown = store.get_command(&id).await.unwrap().unwrap();
        assert_eq!(
            (shown.max_concurrency.as_str(), shown.max_errors.as_str()),
            ("25%", "3")
        );

        crate::with_pool!(store, write, |pool| {
            sqlx::query(
                "UPDATE commands SET max_concurrency = 'lots', max_errors = '' WHERE command_id = $1",
            )
            .bind(id.as_str())
            .execute(pool)
            .await
            .unwrap();
        });
        let spec = store.command_row(&id).await.unwrap().unwrap().spec;
        assert_eq!(
            (spec.max_concurrency, spec.max_errors),
            (Rate::DEFAULT_CONCURRENCY, Rate::DEFAULT_ERRORS)
        );
    }
}
