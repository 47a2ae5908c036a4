//! Which database a store lives in, as an operator names it (`--database`), and opening it.

use crate::{Result, Store};
use std::path::{Path, PathBuf};

/// Where a store's database is.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file, created when missing: one server on one machine (the default).
    Sqlite(PathBuf),
    /// A PostgreSQL server (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?OPTIONS]`), which server
    /// replicas share (with a NATS server between them; one server per database without).
    Postgres(String),
}

impl Database {
    /// The database a `--database` value names: a `postgres://` or `postgresql://` URL, or
    /// `sqlite:PATH`. The error says what is accepted.
    pub fn parse(value: &str) -> Result<Database, String> {
        let value = value.trim();
        if value.starts_with("postgres://") || value.starts_with("postgresql://") {
            let rest = value.split_once("://").map_or("", |(_, r)| r);
            if rest.is_empty() || rest == "/" {
                return Err(format!(
                    "database URL {} names no server; use postgres://USER@HOST:PORT/DB",
                    redact(value)
                ));
            }
            return Ok(Database::Postgres(value.to_owned()));
        }
        if let Some(path) = value.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err("database sqlite: names no file; use sqlite:PATH".to_owned());
            }
            return Ok(Database::Sqlite(PathBuf::from(path)));
        }
        Err(format!(
            "database {:?} is neither a postgres:// URL nor sqlite:PATH \
             (leave it out for SQLite in the data dir)",
            redact(value)
        ))
    }

    /// The default: SQLite in `data_dir`.
    pub fn in_data_dir(data_dir: &Path) -> Database {
        Database::Sqlite(data_dir.join("fleetrun.db"))
    }

    /// Whether several server replicas can share it.
    pub fn is_shared(&self) -> bool {
        matches!(self, Database::Postgres(_))
    }
}

/// Shown without a password, so logs and errors can name it.
impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            Database::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

/// Debug shows what Display shows: a password must not reach a log through `{:?}` either.
impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Database({self})")
    }
}

/// `url` without its password and its options (which may carry one: `?password=`).
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.split('?').next().unwrap_or_default().to_owned();
    };
    let rest = rest.split('?').next().unwrap_or_default();
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split(':').next().unwrap_or_default();
            if user_info.contains(':') {
                format!("{user}:***@{host}")
            } else {
                format!("{user}@{host}")
            }
        }
        None => authority.to_owned(),
    };
    format!("{scheme}://{authority}{path}")
}

impl Store {
    /// Opens the store in `db`, applying migrations.
    pub async fn open(db: &Database) -> Result<Store> {
        match db {
            Database::Sqlite(path) => Store::open_sqlite(path).await,
            Database::Postgres(url) => Store::open_postgres(url).await,
        }
    }
}

impl Store {
    /// Bytes the database takes: SQLite's file with its WAL and shared-memory files, or
    /// PostgreSQL's database as `pg_database_size` counts it.
    pub async fn database_bytes(&self) -> Result<u64> {
        match &self.db {
            crate::Db::Sqlite(p) => {
                let name = p.path.as_os_str();
                Ok(["", "-wal", "-shm"]
                    .iter()
                    .filter_map(|suffix| {
                        let mut file = name.to_owned();
                        file.push(suffix);
                        std::fs::metadata(file).ok()
                    })
                    .map(|m| m.len())
                    .sum())
            }
            crate::Db::Postgres(pool) => {
                let bytes: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
                    .fetch_one(pool)
                    .await?;
                Ok(bytes.max(0) as u64)
            }
        }
    }
}

/// The session-level advisory lock of the one server on a PostgreSQL database ("fleetsrv").
const ONE_SERVER_LOCK: i64 = 0x666c_6565_7473_7276;

impl Store {
    /// Makes this store the one server's on its database, until [`Store::close`] or the end of
    /// the process: on PostgreSQL a session-level advisory lock, held on a connection of its own;
    /// false when another server holds it. Several replicas on one database need command
    /// ownership among them (the store has it, `leases.rs`; the server does not use it yet):
    /// until then a second server must be refused, not left to dispatch the same commands.
    /// Always true on SQLite (one process opens the file).
    pub async fn claim_database(&self) -> Result<bool> {
        let crate::Db::Postgres(pool) = &self.db else {
            return Ok(true);
        };
        let mut held = self.claim.lock().await;
        if held.is_some() {
            return Ok(true);
        }
        let mut conn = pool.acquire().await?.detach();
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(ONE_SERVER_LOCK)
            .fetch_one(&mut conn)
            .await?;
        if got {
            *held = Some(conn);
        } else {
            sqlx::Connection::close(conn).await?;
        }
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_is_named_by_url_and_shown_without_its_password() {
        let pg =
            Database::parse("postgres://fleet:s3cret@db.internal:5433/fleetrun?sslmode=require")
                .unwrap();
        assert!(pg.is_shared());
        assert_eq!(
            pg.to_string(),
            "postgres://fleet:***@db.internal:5433/fleetrun"
        );
        assert!(!format!("{pg:?}").contains("s3cret"));
        let pg = Database::parse("postgresql://fleet@db/fleetrun?password=s3cret").unwrap();
        assert_eq!(pg.to_string(), "postgresql://fleet@db/fleetrun");
        assert_eq!(
            Database::parse("sqlite:/var/lib/fleetrun/db").unwrap(),
            Database::Sqlite("/var/lib/fleetrun/db".into())
        );
        assert_eq!(
            Database::parse("sqlite:///var/lib/fleetrun/db").unwrap(),
            Database::Sqlite("/var/lib/fleetrun/db".into())
        );
        assert!(!Database::in_data_dir(Path::new("/d")).is_shared());
    }

    #[tokio::test]
    async fn each_database_says_how_big_it_is() {
        let (_dir, stores) = crate::testing::stores().await;
        for (db, store) in stores {
            assert!(store.database_bytes().await.expect("size") > 0, "{db}");
        }
    }

    #[tokio::test]
    async fn one_server_claims_a_postgres_database_until_it_closes() {
        let url = fleetrun_testkit::shared_postgres().create_database();
        let first = Store::open_postgres(&url).await.expect("first");
        let second = Store::open_postgres(&url).await.expect("second");
        assert!(first.claim_database().await.expect("claim"));
        assert!(
            first.claim_database().await.expect("claim again"),
            "its own"
        );
        assert!(!second.claim_database().await.expect("refused"));
        first.close().await.expect("close");
        assert!(second.claim_database().await.expect("claim after close"));
        let (_dir, stores) = crate::testing::stores().await;
        let (_, sqlite) = &stores[0];
        assert!(sqlite.claim_database().await.expect("sqlite"));
    }

    #[test]
    fn a_database_that_is_not_one_says_what_is_accepted() {
        for (bad, says) in [
            (
                "mysql://root:pw@h/db",
                "neither a postgres:// URL nor sqlite:PATH",
            ),
            ("postgres://", "names no server"),
            ("sqlite:", "names no file"),
            ("", "neither"),
        ] {
            let e = Database::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains(":pw@"), "{e}");
        }
    }
}
