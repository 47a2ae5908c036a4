//! Persistent state in SQL: the schema lives in `migrations/` (one folder per database), queries
//! in one file per resource.
//!
//! On SQLite (the default) or PostgreSQL: a query is written once and runs on either through
//! `with_pool!` (or `with_conn!`, inside a caller's transaction); [`Database`] names which one a
//! server keeps (`--database`).
//!
//! SQLite allows one writer at a time, so writes go through a pool of one connection (no `SQLITE_BUSY`
//! under load) and reads through a separate pool; WAL keeps readers from blocking the writer. The hot
//! writes (starts, output lengths, results, audit records) are group-committed by one task
//! (`writer.rs`), on either database.

pub mod audit;
mod commands;
mod database;
mod documents;
mod edge;
mod exports;
mod leases;
mod nodes;
mod objects;
mod params;
mod principals;
mod scripts;
mod sessions;
mod ssm;
mod tags;
mod writer;

pub use audit::AuditEntry;
pub use commands::{
    CommandCursor, CommandExtras, CommandRow, CommandSpec, Finish, IdempotencyKey, InsertError,
    InvocationRow, NewCommand, OutputState, S3Output, ScriptFiles, Tally, Totals,
};
pub use database::Database;
pub use documents::{Added, Created, DOCUMENTS_MAX, DocumentRow, VERSIONS_MAX, VersionRow};
pub use exports::{EXPORT_ERROR_MAX, ExportRow, ExportState};
pub use leases::{CommandLease, Fence, Owner, Replica};
pub use nodes::{NewNode, NodeKeys, NodeRef, RegisterError};
pub use objects::{OBJECTS_PAGE_MAX, ObjectRow};
pub use params::{NewParam, PARAM_VERSIONS_MAX, PARAMS_MAX, ParamRow, Put, StoredValue};
pub use principals::{UserError, UserRow, token_id};
pub use scripts::{
    SCRIPT_NODES_BATCH, SCRIPT_VERSIONS_MAX, SCRIPTS_MAX, SCRIPTS_PAGE_MAX, ScriptNodeDir,
    ScriptRow, ScriptWrite,
};
pub use sessions::{NewSession, SESSIONS_PAGE_MAX, SessionEnd, SessionQuery, SessionState};
pub use ssm::{CommandMeta, CommandQuery};
pub use tags::Tagged;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// Handle to the database.
#[derive(Clone)]
pub struct Store {
    db: Db,
    /// Group commit of the hot writes (on SQLite's `write` connection, or PostgreSQL's pool).
    writer: writer::Writer,
    /// Wakes the S3 output exporter (see `exports`).
    exports: std::sync::Arc<tokio::sync::Notify>,
    /// On PostgreSQL, the connection holding the one-server lock (`Store::claim_database`).
    claim: std::sync::Arc<tokio::sync::Mutex<Option<sqlx::PgConnection>>>,
}

/// The database behind a store. A query is written once (`$1` placeholders, which SQLite reads
/// as PostgreSQL does) and run on either through [`with_pool!`].
#[derive(Clone)]
enum Db {
    /// One writer connection (SQLite allows one writer at a time) and a pool of readers.
    Sqlite(SqlitePools),
    /// One pool for reads and writes.
    Postgres(PgPool),
}

/// Which SQL a query is written in, for the few constructs the two spell differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// What a read-then-write transaction serializes on, on PostgreSQL (`Dialect::serialize`).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Lock {
    Documents,
    Params,
    Scripts,
    Users,
    /// The audit chain's head, read then extended by each append.
    Audit,
    /// Activations' registration counts and the node ids taken (`register_node`).
    Registrations,
}

impl Lock {
    /// The advisory lock's key: the name's bytes, so keys do not collide by accident.
    fn key(self) -> i64 {
        let name: &[u8] = match self {
            Lock::Documents => b"documents",
            Lock::Params => b"params",
            Lock::Scripts => b"scripts",
            Lock::Users => b"users",
            Lock::Audit => b"audit",
            // Eight bytes: the key keeps the last eight of a name.
            Lock::Registrations => b"register",
        };
        name.iter().fold(0i64, |k, b| (k << 8) | i64::from(*b))
    }
}

impl Dialect {
    /// The statement that makes the transaction it runs in the only writer of `lock`'s rows
    /// until it ends, as SQLite's one writer connection makes every transaction (so a read,
    /// then a write that depends on it, stays exact with writers on other connections); None on
    /// SQLite, where nothing is needed.
    pub(crate) fn serialize(self, lock: Lock) -> Option<String> {
        match self {
            Dialect::Sqlite => None,
            Dialect::Postgres => Some(format!("SELECT pg_advisory_xact_lock({})", lock.key())),
        }
    }

    /// The database's clock in epoch ms, as an SQL expression: every lease is set and compared
    /// by it, so replicas whose own clocks disagree agree on whose lease has expired.
    pub(crate) fn now_ms(self) -> &'static str {
        match self {
            // Julian day 2440587.5 is the Unix epoch; 'now' has ms precision.
            Dialect::Sqlite => {
                "CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)"
            }
            // The statement's own time, not the transaction's start (`now()`).
            Dialect::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    /// What a `SELECT` ends with to lock the rows it reads until the transaction ends, against
    /// any other writer of them (PostgreSQL); nothing on SQLite, whose one writer serializes.
    /// `NO KEY UPDATE`: the `UPDATE`s of other writers wait, foreign-key checks do not.
    pub(crate) fn lock_rows(self) -> &'static str {
        match self {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR NO KEY UPDATE",
        }
    }

    /// As [`Dialect::lock_rows`], skipping the rows another transaction holds (so writers racing
    /// for rows each take different ones).
    pub(crate) fn lock_rows_skip_locked(self) -> &'static str {
        match self {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR NO KEY UPDATE SKIP LOCKED",
        }
    }

    /// A subquery over the strings of the JSON array bound as `param` (`x IN (...)`).
    pub(crate) fn json_strings(self, param: &str) -> String {
        match self {
            Dialect::Sqlite => format!("SELECT value FROM json_each({param})"),
            Dialect::Postgres => format!("SELECT json_array_elements_text({param}::json)"),
        }
    }
}

/// A statement built at run time (filters, target expressions): its text, with `$n` placeholders
/// numbered as values are added, and the values, bound in that order on either database.
#[derive(Debug, Default)]
pub(crate) struct Sql {
    text: String,
    binds: Vec<Bind>,
}

/// A value of a [`Sql`] statement.
#[derive(Debug)]
pub(crate) enum Bind {
    Text(String),
    Int(i64),
}

impl From<String> for Bind {
    fn from(v: String) -> Self {
        Bind::Text(v)
    }
}

impl From<&str> for Bind {
    fn from(v: &str) -> Self {
        Bind::Text(v.to_owned())
    }
}

impl From<i64> for Bind {
    fn from(v: i64) -> Self {
        Bind::Int(v)
    }
}

impl Sql {
    /// A statement starting with `text` (no placeholders in it).
    pub(crate) fn new(text: &str) -> Self {
        Sql {
            text: text.to_owned(),
            binds: Vec::new(),
        }
    }

    /// Appends fixed text (never a value: values go through [`Sql::bind`]).
    pub(crate) fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// Appends the placeholder of a new value.
    pub(crate) fn bind(&mut self, value: impl Into<Bind>) -> &mut Self {
        let p = self.param(value);
        self.text.push_str(&p);
        self
    }

    /// A new value's placeholder (`$n`), for text that wraps it (`Dialect::json_strings`).
    pub(crate) fn param(&mut self, value: impl Into<Bind>) -> String {
        self.binds.push(value.into());
        format!("${}", self.binds.len())
    }

    /// How many values are bound.
    #[cfg(test)]
    pub(crate) fn binds(&self) -> usize {
        self.binds.len()
    }

    /// The query, its values bound.
    pub(crate) fn query<'a, DB: sqlx::Database>(self) -> sqlx::query::Query<'a, DB, DB::Arguments>
    where
        String: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
        i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    {
        // Only fixed fragments are in the text; every value is bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(self.text));
        for b in self.binds {
            q = match b {
                Bind::Text(v) => q.bind(v),
                Bind::Int(v) => q.bind(v),
            };
        }
        q
    }
}

/// Makes the transaction `$tx` the only writer of `$lock`'s rows on PostgreSQL
/// ([`Dialect::serialize`]); nothing on SQLite.
macro_rules! serialize {
    ($tx:expr, $dialect:expr, $lock:expr) => {
        if let Some(lock) = $dialect.serialize($lock) {
            sqlx::query(sqlx::AssertSqlSafe(lock))
                .execute(&mut *$tx)
                .await
                .map_err($crate::StoreError::from)?;
        }
    };
}
pub(crate) use serialize;

/// SQLite's two pools.
#[derive(Clone)]
struct SqlitePools {
    read: SqlitePool,
    write: SqlitePool,
    /// The database file (for its size).
    path: std::path::PathBuf,
}

/// Runs `$body` with `$pool` bound to the store's pool for `read` or `write`, once per kind of
/// database: the body is written once and compiled for each.
macro_rules! with_pool {
    ($store:expr, $use:ident, |$pool:ident, $dialect:ident| $body:expr) => {
        match &$store.db {
            $crate::Db::Sqlite(p) => {
                let $pool = &p.$use;
                let $dialect = $crate::Dialect::Sqlite;
                $body
            }
            $crate::Db::Postgres($pool) => {
                let $dialect = $crate::Dialect::Postgres;
                $body
            }
        }
    };
    ($store:expr, read, |$pool:ident| $body:expr) => {
        match &$store.db {
            $crate::Db::Sqlite(p) => {
                let $pool = &p.read;
                $body
            }
            $crate::Db::Postgres($pool) => $body,
        }
    };
    ($store:expr, write, |$pool:ident| $body:expr) => {
        match &$store.db {
            $crate::Db::Sqlite(p) => {
                let $pool = &p.write;
                $body
            }
            $crate::Db::Postgres($pool) => $body,
        }
    };
}
pub(crate) use with_pool;

/// A connection inside a caller's transaction, on either database: for the writes that run in a
/// transaction they do not own (the writer's batches, a command's creation).
pub(crate) enum Conn<'c> {
    Sqlite(&'c mut sqlx::SqliteConnection),
    Postgres(&'c mut sqlx::PgConnection),
}

impl Conn<'_> {
    /// The same connection for one more call, the original usable again after it.
    pub(crate) fn reborrow(&mut self) -> Conn<'_> {
        match self {
            Conn::Sqlite(c) => Conn::Sqlite(c),
            Conn::Postgres(c) => Conn::Postgres(c),
        }
    }
}

impl<'c> From<&'c mut sqlx::SqliteConnection> for Conn<'c> {
    fn from(c: &'c mut sqlx::SqliteConnection) -> Self {
        Conn::Sqlite(c)
    }
}

impl<'c> From<&'c mut sqlx::PgConnection> for Conn<'c> {
    fn from(c: &'c mut sqlx::PgConnection) -> Self {
        Conn::Postgres(c)
    }
}

/// Runs `$body` with `$c` bound to the connection `$conn` (a [`Conn`], consumed) holds, once per
/// kind of database, as [`with_pool!`] does for a pool.
macro_rules! with_conn {
    ($conn:expr, |$c:ident, $dialect:ident| $body:expr) => {
        match $conn {
            $crate::Conn::Sqlite($c) => {
                let $dialect = $crate::Dialect::Sqlite;
                $body
            }
            $crate::Conn::Postgres($c) => {
                let $dialect = $crate::Dialect::Postgres;
                $body
            }
        }
    };
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::Conn::Sqlite($c) => $body,
            $crate::Conn::Postgres($c) => $body,
        }
    };
}
pub(crate) use with_conn;

/// `$first, $first+1, ..`: `n` numbered placeholders, for a list of values written once for both
/// databases (the text is then passed as `sqlx::AssertSqlSafe`: it holds no value).
pub(crate) fn placeholders(first: usize, n: usize) -> String {
    let mut s = String::with_capacity(n * 5);
    for i in first..first + n {
        if i > first {
            s.push_str(", ");
        }
        s.push('$');
        s.push_str(&i.to_string());
    }
    s
}

/// `($1, .., $columns), (..)`: the placeholders of a multi-row `VALUES` of `rows` rows.
pub(crate) fn value_rows(rows: usize, columns: usize) -> String {
    (0..rows)
        .map(|r| format!("({})", placeholders(r * columns + 1, columns)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A storage failure. Shown to API clients only as an internal error.
///
/// Each variant's message includes its cause, so the cause is not also exposed as `source()`
/// (which would print it twice in an error chain).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database: {0}")]
    Db(sqlx::Error),
    /// Migrations failed.
    #[error("database migration: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    /// A row that must exist does not.
    #[error("missing row: {0}")]
    Missing(&'static str),
    /// A stored JSON column did not decode.
    #[error("stored JSON: {0}")]
    Json(serde_json::Error),
    /// A command's write carried a [`Fence`] its owner no longer matches: another replica took
    /// the command over (or it was claimed again), and the write changed nothing.
    #[error(
        "command {command} is now held by replica {held_by:?} at epoch {epoch}: \
         a write of an earlier owner changed nothing"
    )]
    Fenced {
        /// The command written.
        command: fleetrun_proto::CommandId,
        /// The replica that owns it now ("" for none).
        held_by: String,
        /// Its owner's epoch now.
        epoch: i64,
    },
}

impl StoreError {
    /// Whether the database could not be reached (down, restarting, unreachable, its pool
    /// exhausted past the wait): worth trying again shortly, unlike a fault of the request.
    pub fn is_unavailable(&self) -> bool {
        let StoreError::Db(e) = self else {
            return false;
        };
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // PostgreSQL's connection exceptions (08...), and its shutting down or starting up.
            sqlx::Error::Database(d) => d
                .code()
                .is_some_and(|c| c.starts_with("08") || c == "57P01" || c == "57P03"),
            _ => false,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Db(e)
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migrate(e)
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Json(e)
    }
}

/// Result of a store call.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` and applies migrations.
    pub async fn open_sqlite(path: &Path) -> Result<Self> {
        let opts = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        let db = Db::Sqlite(SqlitePools {
            read,
            write,
            path: path.to_owned(),
        });
        Ok(Store {
            writer: writer::Writer::spawn(db.clone()),
            db,
            exports: std::sync::Arc::new(tokio::sync::Notify::new()),
            claim: Default::default(),
        })
    }

    /// Connects to the PostgreSQL database at `url` (`postgres://USER@HOST:PORT/DB`) and applies
    /// migrations.
    pub async fn open_postgres(url: &str) -> Result<Self> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        let db = Db::Postgres(pool);
        Ok(Store {
            writer: writer::Writer::spawn(db.clone()),
            db,
            exports: std::sync::Arc::new(tokio::sync::Notify::new()),
            claim: Default::default(),
        })
    }

    /// Waits until every write queued so far (group-committed ones and queued audit records) is
    /// committed, then closes the pools; later calls fail. The last step of a server's shutdown.
    pub async fn close(&self) -> Result<()> {
        self.writer.flush().await?;
        if let Some(conn) = self.claim.lock().await.take() {
            sqlx::Connection::close(conn).await?;
        }
        match &self.db {
            Db::Sqlite(p) => {
                p.write.close().await;
                p.read.close().await;
            }
            Db::Postgres(p) => p.close().await,
        }
        Ok(())
    }
}

/// Whether a text can be stored at all: PostgreSQL's text holds no NUL (SQLite's does), and
/// binding one is an error there, so a lookup by such a key (an id from a URL) is "not found" on
/// both instead of a database error on one.
pub(crate) fn storable(text: &str) -> bool {
    !text.contains('\0')
}

/// Reading a row's columns the same way from either database.
pub(crate) trait Columns {
    /// A TEXT column.
    fn text(&self, column: &str) -> String;
    /// An INTEGER (BIGINT) column.
    fn int(&self, column: &str) -> i64;
    /// An INTEGER column that may be NULL.
    fn opt_int(&self, column: &str) -> Option<i64>;
    /// A TEXT column that may be NULL.
    fn opt_text(&self, column: &str) -> Option<String>;
    /// A flag: an INTEGER column holding 0 or 1.
    fn flag(&self, column: &str) -> bool {
        self.int(column) != 0
    }
    /// A BLOB (BYTEA) column that may be NULL.
    fn opt_bytes(&self, column: &str) -> Option<Vec<u8>>;
    /// Whether the row has that column.
    fn has(&self, column: &str) -> bool;
}

macro_rules! columns_of {
    ($row:ty) => {
        impl Columns for $row {
            fn text(&self, column: &str) -> String {
                sqlx::Row::get(self, column)
            }
            fn int(&self, column: &str) -> i64 {
                sqlx::Row::get(self, column)
            }
            fn opt_int(&self, column: &str) -> Option<i64> {
                sqlx::Row::get(self, column)
            }
            fn opt_text(&self, column: &str) -> Option<String> {
                sqlx::Row::get(self, column)
            }
            fn opt_bytes(&self, column: &str) -> Option<Vec<u8>> {
                sqlx::Row::get(self, column)
            }
            fn has(&self, column: &str) -> bool {
                sqlx::Row::try_column(self, column).is_ok()
            }
        }
    };
}
columns_of!(sqlx::sqlite::SqliteRow);
columns_of!(sqlx::postgres::PgRow);

/// The stores unit tests run against: SQLite in a temp dir, and PostgreSQL in a database of the
/// test binary's own cluster (`fleetrun_testkit`).
#[cfg(test)]
pub(crate) mod testing {
    use super::Store;

    /// A store of each kind, named, with what keeps the SQLite file alive.
    pub async fn stores() -> (tempfile::TempDir, Vec<(&'static str, Store)>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let sqlite = Store::open_sqlite(&dir.path().join("t.db"))
            .await
            .expect("sqlite store");
        let url = fleetrun_testkit::shared_postgres().create_database();
        let postgres = Store::open_postgres(&url).await.expect("postgres store");
        (dir, vec![("sqlite", sqlite), ("postgres", postgres)])
    }
}
