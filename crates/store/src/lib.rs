//! Persistent state in SQL: the schema lives in `migrations/`, queries in one file per resource.
//!
//! SQLite allows one writer at a time, so writes go through a pool of one connection (no `SQLITE_BUSY`
//! under load) and reads through a separate pool; WAL keeps readers from blocking the writer. The hot
//! writes (starts, output lengths, results, audit records) are group-committed by one task (`writer.rs`).

pub mod audit;
mod commands;
mod documents;
mod edge;
mod exports;
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
pub use documents::{Added, Created, DOCUMENTS_MAX, DocumentRow, VERSIONS_MAX, VersionRow};
pub use exports::{EXPORT_ERROR_MAX, ExportRow, ExportState};
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

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// Handle to the database.
#[derive(Clone)]
pub struct Store {
    read: SqlitePool,
    write: SqlitePool,
    /// Group commit of the hot writes, on the `write` connection.
    writer: writer::Writer,
    /// Wakes the S3 output exporter (see `exports`).
    exports: std::sync::Arc<tokio::sync::Notify>,
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
        sqlx::migrate!("./migrations").run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        let writer = writer::Writer::spawn(write.clone());
        Ok(Store {
            read,
            write,
            writer,
            exports: std::sync::Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Waits until every write queued so far (group-committed ones and queued audit records) is
    /// committed, then closes both pools; later calls fail. The last step of a server's shutdown.
    pub async fn close(&self) -> Result<()> {
        self.writer.flush().await?;
        self.write.close().await;
        self.read.close().await;
        Ok(())
    }
}
