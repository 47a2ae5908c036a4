//! Commands and their invocations: creation, state transitions and listings.
//!
//! Every transition of an invocation to a terminal status goes through [`Store::finish_invocations`],
//! which moves the command's counters in the same transaction and only from a non-terminal status,
//! so a counter can never count one invocation twice.

/// SQL true for a command (table alias given) with an invocation on a node in the JSON array bound
/// as `?1`, or for every command when NULL is bound (see [`visible_json`]). A macro so queries stay
/// literal strings.
macro_rules! visible_clause {
    ($alias:literal) => {
        concat!(
            "(?1 IS NULL OR EXISTS (SELECT 1 FROM invocations vi WHERE vi.command_id = ",
            $alias,
            ".command_id AND vi.node_id IN (SELECT value FROM json_each(?1))))"
        )
    };
}

/// A position in the newest-first listing of commands: listings with it start after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandCursor {
    /// Requested time (ms since the epoch).
    pub requested_at: i64,
    /// Command id; "" for a bare time, which sorts before every id at that millisecond.
    pub command_id: String,
}

use super::writer::WriteOp;
use super::{Result, Store};
use fleetrun_proto::api::{Command, Invocation};
use fleetrun_proto::status::details;
use fleetrun_proto::targets::{ParseError, Rate};
use fleetrun_proto::time::now_ms;
use fleetrun_proto::{CommandId, CommandStatus, InvocationStatus, NodeId};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use std::collections::{BTreeMap, HashMap, HashSet};

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
    pub async fn insert_command_with(
        &self,
        c: &NewCommand,
        extras: &CommandExtras,
    ) -> Result<(), InsertError> {
        let spec = &c.spec;
        let mut tx = self.sqlite()?.write.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO commands (command_id, document_name, commands, working_dir, execution_timeout,
                delivery_timeout, comment, node_ids, targets, max_concurrency, max_errors, run_as,
                memory_limit_mb, cpu_limit_percent, status, status_details, requested_at, target_count,
                ssm_extra, document_version, parameters, idempotency_principal, idempotency_key,
                idempotency_hash, output_s3_bucket, output_s3_prefix, output_s3_region,
                output_s3_plugin_dir)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'Pending', 'Pending', ?, ?, ?, ?, ?, ?, ?, ?,
                ?, ?, ?, ?)",
        )
        .bind(c.command_id.as_str())
        .bind(&c.document_name)
        .bind(serde_json::to_string(&spec.commands)?)
        .bind(&spec.working_dir)
        .bind(spec.execution_timeout as i64)
        .bind(spec.delivery_timeout as i64)
        .bind(&c.comment)
        .bind(serde_json::to_string(&c.node_ids)?)
        .bind(&c.targets)
        .bind(spec.max_concurrency.to_string())
        .bind(spec.max_errors.to_string())
        .bind(&spec.run_as)
        .bind(spec.memory_limit_mb.map(|v| v as i64))
        .bind(spec.cpu_limit_percent.map(i64::from))
        .bind(spec.requested_at)
        .bind(c.invocations.len() as i64)
        .bind(c.ssm_extra.as_ref().map(|v| v.to_string()).unwrap_or_else(|| "{}".into()))
        .bind(&c.document_version)
        .bind(serde_json::to_string(&c.parameters)?)
        .bind(c.idempotency.as_ref().map(|k| k.principal.as_str()))
        .bind(c.idempotency.as_ref().map(|k| k.key.as_str()))
        .bind(c.idempotency.as_ref().map(|k| k.request_hash.as_str()))
        .bind(c.output_s3.as_ref().map_or("", |o| o.target.bucket.as_str()))
        .bind(c.output_s3.as_ref().map_or("", |o| o.target.prefix.as_str()))
        .bind(c.output_s3.as_ref().map_or("", |o| o.target.region.as_str()))
        .bind(c.output_s3.as_ref().map_or("", |o| o.plugin_dir.as_str()))
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() && c.idempotency.is_some() => {
                return Err(InsertError::DuplicateKey);
            }
            r => r?,
        };
        for (chunk_no, chunk) in c.invocations.chunks(200).enumerate() {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO invocations (command_id, node_id, seq, node_name, status, status_details) ",
            );
            qb.push_values(chunk.iter().enumerate(), |mut b, (i, (node, name))| {
                b.push_bind(c.command_id.as_str())
                    .push_bind(node.as_str())
                    .push_bind((chunk_no * 200 + i) as i64)
                    .push_bind(name.as_str())
                    .push_bind("Pending")
                    .push_bind(details::PENDING);
            });
            qb.build().execute(&mut *tx).await?;
        }
        if !extras.ended.is_empty() {
            finish_invocations(&mut tx, &c.command_id, &extras.ended).await?;
        }
        if let Some((name, version)) = &extras.script {
            sqlx::query(
                "INSERT INTO script_runs (command_id, name, version, input_uri, output_path) VALUES (?, ?, ?, ?, ?)",
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
        Ok(())
    }

    /// The command a principal's idempotency key made, with the hash of the request it came with.
    pub async fn command_by_idempotency_key(
        &self,
        principal: &str,
        key: &str,
    ) -> Result<Option<(Command, String)>> {
        let row = sqlx::query(
            "SELECT * FROM commands WHERE idempotency_principal = ? AND idempotency_key = ?",
        )
        .bind(principal)
        .bind(key)
        .fetch_optional(&self.sqlite()?.read)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let hash: String = row.try_get("idempotency_hash")?;
        Ok(Some((command_record(&row)?.into(), hash)))
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
        // (an `?3 IS NULL OR` would turn it into a scan from the newest).
        let (at, id) = match before {
            Some(c) => (c.requested_at, c.command_id.as_str()),
            None => (i64::MAX, ""),
        };
        let rows = sqlx::query(concat!(
            "SELECT * FROM commands c WHERE ",
            visible_clause!("c"),
            " AND (c.requested_at, c.command_id) < (?3, ?4)",
            " ORDER BY requested_at DESC, command_id DESC LIMIT ?2"
        ))
        .bind(visible_json(visible))
        .bind(i64::from(limit))
        .bind(at)
        .bind(id)
        .fetch_all(&self.sqlite()?.read)
        .await?;
        rows.iter().map(|r| Ok(command_record(r)?.into())).collect()
    }

    /// Where a command sorts in listings (its requested time and id), for a `before` cursor.
    pub async fn command_cursor(&self, id: &CommandId) -> Result<Option<CommandCursor>> {
        let at: Option<i64> =
            sqlx::query_scalar("SELECT requested_at FROM commands WHERE command_id = ?")
                .bind(id.as_str())
                .fetch_optional(&self.sqlite()?.read)
                .await?;
        Ok(at.map(|requested_at| CommandCursor {
            requested_at,
            command_id: id.to_string(),
        }))
    }

    /// One command, without invocations.
    pub async fn get_command(&self, id: &CommandId) -> Result<Option<Command>> {
        let row = sqlx::query("SELECT * FROM commands WHERE command_id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.sqlite()?.read)
            .await?;
        Ok(row
            .as_ref()
            .map(command_record)
            .transpose()?
            .map(Command::from))
    }

    /// The dispatcher's view of a command.
    pub async fn command_row(&self, id: &CommandId) -> Result<Option<CommandRow>> {
        let row = sqlx::query("SELECT * FROM commands WHERE command_id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.sqlite()?.read)
            .await?;
        let Some(r) = row else { return Ok(None) };
        Ok(Some(CommandRow {
            command_id: id.clone(),
            spec: CommandSpec {
                commands: serde_json::from_str(r.get("commands"))?,
                working_dir: r.get("working_dir"),
                execution_timeout: r.get::<i64, _>("execution_timeout") as u64,
                delivery_timeout: r.get::<i64, _>("delivery_timeout") as u64,
                max_concurrency: stored_rate(
                    id,
                    "max_concurrency",
                    r.get("max_concurrency"),
                    Rate::parse_concurrency,
                    Rate::DEFAULT_CONCURRENCY,
                ),
                max_errors: stored_rate(
                    id,
                    "max_errors",
                    r.get("max_errors"),
                    Rate::parse_errors,
                    Rate::DEFAULT_ERRORS,
                ),
                run_as: r.get("run_as"),
                memory_limit_mb: r.get::<Option<i64>, _>("memory_limit_mb").map(|v| v as u64),
                cpu_limit_percent: r
                    .get::<Option<i64>, _>("cpu_limit_percent")
                    .map(|v| v as u32),
                requested_at: r.get("requested_at"),
            },
            status: parse_command_status(r.get("status")),
            target_count: r.get::<i64, _>("target_count") as u64,
            error_count: r.get::<i64, _>("error_count") as u64,
            cancel_requested: r.get::<i64, _>("cancel_requested") != 0,
        }))
    }

    /// Ids of commands that have not ended (to resume their dispatch after a restart).
    pub async fn active_command_ids(&self) -> Result<Vec<CommandId>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT command_id FROM commands WHERE status IN ('Pending', 'InProgress', 'Cancelling') ORDER BY requested_at",
        )
        .fetch_all(&self.sqlite()?.read)
        .await?;
        Ok(ids.into_iter().filter_map(|s| s.parse().ok()).collect())
    }

    /// A command's invocations, in dispatch order.
    pub async fn list_invocations(&self, id: &CommandId) -> Result<Vec<Invocation>> {
        let rows = sqlx::query("SELECT * FROM invocations WHERE command_id = ? ORDER BY seq")
            .bind(id.as_str())
            .fetch_all(&self.sqlite()?.read)
            .await?;
        rows.iter()
            .map(|r| Ok(invocation_record(r)?.into()))
            .collect()
    }

    /// One invocation.
    pub async fn get_invocation(
        &self,
        id: &CommandId,
        node: &NodeId,
    ) -> Result<Option<Invocation>> {
        let row = sqlx::query("SELECT * FROM invocations WHERE command_id = ? AND node_id = ?")
            .bind(id.as_str())
            .bind(node.as_str())
            .fetch_optional(&self.sqlite()?.read)
            .await?;
        Ok(row
            .as_ref()
            .map(invocation_record)
            .transpose()?
            .map(Invocation::from))
    }

    /// The dispatcher's view of a command's invocations, in dispatch order.
    pub async fn invocation_rows(&self, id: &CommandId) -> Result<Vec<InvocationRow>> {
        let rows = sqlx::query(
            "SELECT node_id, status, delivered_at, started_at FROM invocations WHERE command_id = ? ORDER BY seq",
        )
        .bind(id.as_str())
        .fetch_all(&self.sqlite()?.read)
        .await?;
        Ok(rows.iter().filter_map(invocation_row).collect())
    }

    /// Invocations on a node that have not ended — only those already delivered when
    /// `delivered_only` — as (command, started).
    pub async fn open_invocations(
        &self,
        node: &NodeId,
        delivered_only: bool,
    ) -> Result<Vec<(CommandId, bool)>> {
        let q = concat!(
            "SELECT command_id, started_at FROM invocations WHERE node_id = ?",
            " AND (delivered_at IS NOT NULL OR NOT ?)",
            " AND status NOT IN ('Success', 'Failed', 'TimedOut', 'Cancelled')"
        );
        let rows = sqlx::query(q)
            .bind(node.as_str())
            .bind(delivered_only)
            .fetch_all(&self.sqlite()?.read)
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let id = r.get::<String, _>("command_id").parse().ok()?;
                Some((id, r.get::<Option<i64>, _>("started_at").is_some()))
            })
            .collect())
    }

    /// Marks invocations as delivered (their Run frame is about to be sent), and the command as
    /// InProgress.
    pub async fn mark_delivered(&self, id: &CommandId, nodes: &[NodeId], now: i64) -> Result<()> {
        let mut tx = self.sqlite()?.write.begin().await?;
        for chunk in nodes.chunks(500) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("UPDATE invocations SET delivered_at = ");
            qb.push_bind(now);
            qb.push(", status_details = ");
            qb.push_bind(details::DELIVERED);
            qb.push(" WHERE command_id = ");
            qb.push_bind(id.as_str());
            qb.push(" AND status = 'Pending' AND node_id IN (");
            let mut sep = qb.separated(", ");
            for n in chunk {
                sep.push_bind(n.as_str());
            }
            qb.push(")");
            qb.build().execute(&mut *tx).await?;
        }
        sqlx::query(
            "UPDATE commands SET status = 'InProgress', status_details = 'InProgress'
             WHERE command_id = ? AND status = 'Pending'",
        )
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Returns a delivered, not started invocation to Pending (its node lost it before starting).
    pub async fn mark_undelivered(&self, id: &CommandId, node: &NodeId) -> Result<()> {
        sqlx::query(
            "UPDATE invocations SET delivered_at = NULL, status_details = 'Pending'
             WHERE command_id = ? AND node_id = ? AND status = 'Pending' AND started_at IS NULL",
        )
        .bind(id.as_str())
        .bind(node.as_str())
        .execute(&self.sqlite()?.write)
        .await?;
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
        self.writer()?
            .write(|reply| WriteOp::MarkStarted {
                id,
                node,
                started_at,
                reply,
            })
            .await
    }

    /// Marks invocations Cancelling (a cancel was sent to their nodes).
    pub async fn mark_cancelling(&self, id: &CommandId, nodes: &[NodeId]) -> Result<()> {
        let mut tx = self.sqlite()?.write.begin().await?;
        for n in nodes {
            sqlx::query(
                "UPDATE invocations SET status = 'Cancelling', status_details = 'Cancelling'
                 WHERE command_id = ? AND node_id = ? AND status IN ('Pending', 'InProgress')",
            )
            .bind(id.as_str())
            .bind(n.as_str())
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("UPDATE commands SET cancel_requested = 1 WHERE command_id = ?")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records that an operator cancelled the command.
    pub async fn mark_cancel_requested(&self, id: &CommandId) -> Result<()> {
        sqlx::query("UPDATE commands SET cancel_requested = 1 WHERE command_id = ?")
            .bind(id.as_str())
            .execute(&self.sqlite()?.write)
            .await?;
        Ok(())
    }

    /// Ends invocations, moving the command's counters in the same transaction. Returns the nodes
    /// whose invocation this call ended (an invocation already terminal is left as it is).
    pub async fn finish_invocations(
        &self,
        id: &CommandId,
        ends: &[(NodeId, Finish)],
    ) -> Result<Vec<NodeId>> {
        let (id, ends) = (id.clone(), ends.to_vec());
        self.writer()?
            .write(|reply| WriteOp::Finish { id, ends, reply })
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
        self.writer()?
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
        let row = sqlx::query(
            "SELECT stdout_bytes, stdout_inline, stderr_bytes, stderr_inline FROM invocations
             WHERE command_id = ? AND node_id = ?",
        )
        .bind(id.as_str())
        .bind(node.as_str())
        .fetch_optional(&self.sqlite()?.read)
        .await?;
        Ok(row.as_ref().map(output_state_from_row))
    }

    /// Sets a command's final (or Cancelling) status.
    pub async fn set_command_status(
        &self,
        id: &CommandId,
        status: CommandStatus,
        details: &str,
    ) -> Result<()> {
        sqlx::query("UPDATE commands SET status = ?, status_details = ? WHERE command_id = ?")
            .bind(status.as_str())
            .bind(details)
            .bind(id.as_str())
            .execute(&self.sqlite()?.write)
            .await?;
        Ok(())
    }

    /// Counts of a command's invocations by (status, details).
    pub async fn invocation_tally(&self, id: &CommandId) -> Result<Tally> {
        let rows = sqlx::query(
            "SELECT status, status_details, COUNT(*) AS n FROM invocations WHERE command_id = ? GROUP BY status, status_details",
        )
        .bind(id.as_str())
        .fetch_all(&self.sqlite()?.read)
        .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                // A status this build does not know (a hand-edited row) counts as nothing.
                let status = InvocationStatus::parse(r.get("status"))?;
                let n = r.get::<i64, _>("n") as u64;
                Some(((status, r.get("status_details")), n))
            })
            .collect())
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

fn invocation_row(r: &SqliteRow) -> Option<InvocationRow> {
    Some(InvocationRow {
        node_id: r.get::<String, _>("node_id").parse().ok()?,
        status: InvocationStatus::parse(r.get("status"))?,
        delivered: r.get::<Option<i64>, _>("delivered_at").is_some(),
        started: r.get::<Option<i64>, _>("started_at").is_some(),
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

pub(super) fn command_record(r: &SqliteRow) -> Result<CommandRecord> {
    let given: &str = r.get("parameters");
    Ok(CommandRecord {
        command_id: decode_id(r.get("command_id"))?,
        document_name: r.get("document_name"),
        document_version: r.get("document_version"),
        parameters: if given.is_empty() {
            None
        } else {
            Some(serde_json::from_str(given)?)
        },
        commands: serde_json::from_str(r.get("commands"))?,
        working_dir: r.get("working_dir"),
        comment: r.get("comment"),
        node_ids: serde_json::from_str(r.get("node_ids"))?,
        targets: r.get("targets"),
        status: parse_command_status(r.get("status")),
        status_details: r.get("status_details"),
        requested_at: r.get("requested_at"),
        max_concurrency: r.get("max_concurrency"),
        max_errors: r.get("max_errors"),
        delivery_timeout: r.get::<i64, _>("delivery_timeout") as u64,
        execution_timeout: r.get::<i64, _>("execution_timeout") as u64,
        run_as: r.get("run_as"),
        memory_limit_mb: r.get::<Option<i64>, _>("memory_limit_mb").map(|v| v as u64),
        cpu_limit_percent: r
            .get::<Option<i64>, _>("cpu_limit_percent")
            .map(|v| v as u32),
        target_count: r.get::<i64, _>("target_count") as u64,
        completed_count: r.get::<i64, _>("completed_count") as u64,
        error_count: r.get::<i64, _>("error_count") as u64,
        delivery_timed_out_count: r.get::<i64, _>("delivery_timed_out_count") as u64,
        output_s3: fleetrun_proto::api::OutputS3 {
            bucket: r.get("output_s3_bucket"),
            prefix: r.get("output_s3_prefix"),
            region: r.get("output_s3_region"),
        },
    })
}

pub(super) fn invocation_record(r: &SqliteRow) -> Result<InvocationRecord> {
    Ok(InvocationRecord {
        command_id: decode_id(r.get("command_id"))?,
        node_id: decode_id(r.get("node_id"))?,
        node_name: r.get("node_name"),
        status: InvocationStatus::parse(r.get("status")).unwrap_or(InvocationStatus::Failed),
        status_details: r.get("status_details"),
        exit_code: r.get("exit_code"),
        signal: r.get("signal"),
        output: output_state_from_row(r),
        started_at: r.get("started_at"),
        finished_at: r.get("finished_at"),
        limits_applied: r.get("limits_applied"),
        cpu_user_ms: r.get::<Option<i64>, _>("cpu_user_ms").map(|v| v as u64),
        cpu_system_ms: r.get::<Option<i64>, _>("cpu_system_ms").map(|v| v as u64),
        max_rss_kb: r.get::<Option<i64>, _>("max_rss_kb").map(|v| v as u64),
        message: r.get("message"),
    })
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
        let c = sqlx::query("SELECT COUNT(*) AS n, MIN(requested_at) AS oldest FROM commands")
            .fetch_one(&self.sqlite()?.read)
            .await?;
        let i = sqlx::query(
            "SELECT COUNT(*) AS n, COALESCE(SUM(stdout_bytes + stderr_bytes), 0) AS bytes FROM invocations",
        )
        .fetch_one(&self.sqlite()?.read)
        .await?;
        Ok(Totals {
            commands: c.get::<i64, _>("n") as u64,
            oldest_command_at: c.get("oldest"),
            invocations: i.get::<i64, _>("n") as u64,
            output_bytes: i.get::<i64, _>("bytes") as u64,
        })
    }

    /// Up to `limit` ended commands requested before `before` (epoch ms), oldest first.
    pub async fn expired_commands(&self, before: i64, limit: u32) -> Result<Vec<CommandId>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT command_id FROM commands
             WHERE requested_at < ? AND status IN ('Success', 'Failed', 'TimedOut', 'Cancelled')
             ORDER BY requested_at LIMIT ?",
        )
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.sqlite()?.read)
        .await?;
        Ok(ids.into_iter().filter_map(|s| s.parse().ok()).collect())
    }

    /// Deletes commands and their invocations (their output objects must be deleted first).
    pub async fn delete_commands(&self, ids: &[CommandId]) -> Result<()> {
        let mut tx = self.sqlite()?.write.begin().await?;
        for id in ids {
            sqlx::query("DELETE FROM s3_exports WHERE command_id = ?")
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM invocations WHERE command_id = ?")
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM commands WHERE command_id = ?")
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
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

fn output_state_from_row(r: &SqliteRow) -> OutputState {
    OutputState {
        stdout: (
            r.get::<i64, _>("stdout_bytes") as u64,
            r.get("stdout_inline"),
        ),
        stderr: (
            r.get::<i64, _>("stderr_bytes") as u64,
            r.get("stderr_inline"),
        ),
    }
}

pub(super) async fn mark_started(
    conn: &mut SqliteConnection,
    id: &CommandId,
    node: &NodeId,
    started_at: i64,
) -> Result<Option<OutputState>> {
    let row = sqlx::query(
        "UPDATE invocations SET started_at = COALESCE(started_at, ?),
             status = CASE status WHEN 'Cancelling' THEN 'Cancelling' ELSE 'InProgress' END,
             status_details = CASE status WHEN 'Cancelling' THEN 'Cancelling' ELSE 'InProgress' END
         WHERE command_id = ? AND node_id = ? AND status IN ('Pending', 'InProgress', 'Cancelling')
         RETURNING stdout_bytes, stdout_inline, stderr_bytes, stderr_inline",
    )
    .bind(started_at)
    .bind(id.as_str())
    .bind(node.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.as_ref().map(output_state_from_row))
}

pub(super) async fn update_output(
    conn: &mut SqliteConnection,
    id: &CommandId,
    node: &NodeId,
    stderr: bool,
    stored: u64,
    inline: &[u8],
) -> Result<()> {
    let q = if stderr {
        "UPDATE invocations SET stderr_bytes = ?, stderr_inline = ? WHERE command_id = ? AND node_id = ?"
    } else {
        "UPDATE invocations SET stdout_bytes = ?, stdout_inline = ? WHERE command_id = ? AND node_id = ?"
    };
    sqlx::query(q)
        .bind(stored as i64)
        .bind(inline)
        .bind(id.as_str())
        .bind(node.as_str())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub(super) async fn finish_invocations(
    conn: &mut SqliteConnection,
    id: &CommandId,
    ends: &[(NodeId, Finish)],
) -> Result<Vec<NodeId>> {
    let mut ended = Vec::new();
    let (mut errors, mut delivery_timeouts) = (0i64, 0i64);
    let q = concat!(
        "UPDATE invocations SET status = ?, status_details = ?, exit_code = ?, signal = ?,",
        " started_at = COALESCE(started_at, ?), finished_at = ?, cpu_user_ms = ?, cpu_system_ms = ?,",
        " max_rss_kb = ?, message = ?, limits_applied = ?",
        " WHERE command_id = ? AND node_id = ? AND status NOT IN ('Success', 'Failed', 'TimedOut', 'Cancelled')"
    );
    for (node, f) in ends {
        let r = sqlx::query(q)
            .bind(f.status.as_str())
            .bind(f.details)
            .bind(f.exit_code)
            .bind(f.signal)
            .bind(f.started_at)
            .bind(f.finished_at)
            .bind(f.cpu_user_ms.map(|v| v as i64))
            .bind(f.cpu_system_ms.map(|v| v as i64))
            .bind(f.max_rss_kb.map(|v| v as i64))
            .bind(&f.message)
            .bind(&f.limits_applied)
            .bind(id.as_str())
            .bind(node.as_str())
            .execute(&mut *conn)
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
            "INSERT OR IGNORE INTO s3_exports (command_id, node_id, queued_at, next_attempt_at)
             SELECT command_id, ?, ?, ? FROM commands WHERE command_id = ? AND output_s3_bucket != ''",
        )
        .bind(node.as_str())
        .bind(now_ms())
        .bind(now_ms())
        .bind(id.as_str())
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(
        "UPDATE commands SET completed_count = completed_count + ?, error_count = error_count + ?,
             delivery_timed_out_count = delivery_timed_out_count + ?
         WHERE command_id = ?",
    )
    .bind(ended.len() as i64)
    .bind(errors)
    .bind(delivery_timeouts)
    .bind(id.as_str())
    .execute(&mut *conn)
    .await?;
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
        }
    }

    fn ended(status: InvocationStatus, why: &'static str) -> Finish {
        Finish::without_running(status, why, 2, "test")
    }

    /// An invocation ends once: a second end (of another status) changes neither it nor the
    /// command's counters; a non-terminal status (Cancelling) can still end.
    #[tokio::test]
    async fn finish_invocations_moves_only_from_a_non_terminal_status() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db.sqlite"))
            .await
            .unwrap();
        let (id, n) = command_on(&store, 3).await;
        let success = ended(InvocationStatus::Success, details::SUCCESS);
        let failed = ended(InvocationStatus::Failed, details::FAILED);

        let first = store
            .finish_invocations(&id, &[(n[0].clone(), success)])
            .await
            .unwrap();
        assert_eq!(first, vec![n[0].clone()]);
        let second = store
            .finish_invocations(
                &id,
                &[(n[0].clone(), failed.clone()), (n[1].clone(), failed)],
            )
            .await
            .unwrap();
        assert_eq!(second, vec![n[1].clone()], "n0 was terminal already");

        store.mark_cancelling(&id, &[n[2].clone()]).await.unwrap();
        let timed_out = ended(InvocationStatus::TimedOut, details::DELIVERY_TIMED_OUT);
        let third = store
            .finish_invocations(&id, &[(n[2].clone(), timed_out)])
            .await
            .unwrap();
        assert_eq!(third, vec![n[2].clone()], "Cancelling is not terminal");
        let again = store
            .finish_invocations(
                &id,
                &[(
                    n[2].clone(),
                    ended(InvocationStatus::Cancelled, details::CANCELLED),
                )],
            )
            .await
            .unwrap();
        assert!(again.is_empty());

        let cmd = store.get_command(&id).await.unwrap().unwrap();
        assert_eq!(
            (
                cmd.completed_count,
                cmd.error_count,
                cmd.delivery_timed_out_count
            ),
            (3, 1, 1)
        );
        let statuses: Vec<_> = store
            .invocation_rows(&id)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.status)
            .collect();
        use InvocationStatus::{Failed, Success, TimedOut};
        assert_eq!(statuses, vec![Success, Failed, TimedOut]);
        let tally = store.invocation_tally(&id).await.unwrap();
        assert_eq!(tally.get(&(Success, details::SUCCESS.to_owned())), Some(&1));
        assert_eq!(tally.values().sum::<u64>(), 3);
    }

    /// A command stored by the first schema (before commands kept their parameters) reads with
    /// AWS-RunShellScript's parameters derived from its script, working dir and timeout.
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
        }
    }

    // Rates are stored as the text SSM shows (`25%`) and come back parsed; a hand-edited value
    // that does not parse runs with SSM's default, as the dispatcher's own fallback did.
    #[tokio::test]
    async fn rates_are_stored_as_text_and_read_back_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db.sqlite"))
            .await
            .unwrap();
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

        sqlx::query(
            "UPDATE commands SET max_concurrency = 'lots', max_errors = '' WHERE command_id = ?",
        )
        .bind(id.as_str())
        .execute(&store.sqlite().unwrap().write)
        .await
        .unwrap();
        let spec = store.command_row(&id).await.unwrap().unwrap().spec;
        assert_eq!(
            (spec.max_concurrency, spec.max_errors),
            (Rate::DEFAULT_CONCURRENCY, Rate::DEFAULT_ERRORS)
        );
    }
}
