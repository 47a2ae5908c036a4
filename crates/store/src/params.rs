//! The parameter store's rows (`params`). A secure value arrives here already sealed; this file never
//! sees it in clear.

use super::{Result, Store};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

/// Most parameters (SSM's standard tier: 10,000).
pub const PARAMS_MAX: i64 = 10_000;

/// A parameter's stored value.
#[derive(Clone)]
pub enum StoredValue {
    /// In clear.
    Plain(String),
    /// Sealed with the server's secrets key: (nonce, ciphertext).
    Sealed(Vec<u8>, Vec<u8>),
}

/// A stored parameter.
#[derive(Clone)]
pub struct ParamRow {
    /// Name.
    pub name: String,
    /// Value.
    pub value: StoredValue,
    /// Version.
    pub version: i64,
    /// Epoch ms.
    pub updated_at: i64,
    /// Principal.
    pub updated_by: String,
}

// No Debug: a row may hold a secret (sealed, but still nothing for logs).

/// Outcome of a put.
pub enum Put {
    /// Stored as this version.
    Ok(i64),
    /// New and there are [`PARAMS_MAX`] parameters.
    LimitExceeded,
}

fn param_row(r: &SqliteRow) -> ParamRow {
    let secure: bool = r.get("secure");
    ParamRow {
        name: r.get("name"),
        value: if secure {
            StoredValue::Sealed(
                r.get::<Option<Vec<u8>>, _>("nonce").unwrap_or_default(),
                r.get::<Option<Vec<u8>>, _>("sealed").unwrap_or_default(),
            )
        } else {
            StoredValue::Plain(r.get("value"))
        },
        version: r.get("version"),
        updated_at: r.get("updated_at"),
        updated_by: r.get("updated_by"),
    }
}

impl Store {
    /// Creates or replaces a parameter, one version up.
    pub async fn put_param(
        &self,
        name: &str,
        value: &StoredValue,
        at: i64,
        by: &str,
    ) -> Result<Put> {
        let mut tx = self.write.begin().await?;
        let current: Option<i64> = sqlx::query_scalar("SELECT version FROM params WHERE name = ?")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        if current.is_none() {
            let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM params")
                .fetch_one(&mut *tx)
                .await?;
            if count >= PARAMS_MAX {
                return Ok(Put::LimitExceeded);
            }
        }
        let version = current.unwrap_or(0) + 1;
        let (secure, plain, nonce, sealed) = match value {
            StoredValue::Plain(v) => (false, v.as_str(), None, None),
            StoredValue::Sealed(n, s) => (true, "", Some(n.as_slice()), Some(s.as_slice())),
        };
        sqlx::query(
            "INSERT INTO params (name, secure, value, nonce, sealed, version, updated_at, updated_by)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (name) DO UPDATE SET secure = excluded.secure, value = excluded.value,
               nonce = excluded.nonce, sealed = excluded.sealed, version = excluded.version,
               updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        )
        .bind(name)
        .bind(secure)
        .bind(plain)
        .bind(nonce)
        .bind(sealed)
        .bind(version)
        .bind(at)
        .bind(by)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Put::Ok(version))
    }

    /// One parameter.
    pub async fn get_param(&self, name: &str) -> Result<Option<ParamRow>> {
        let row = sqlx::query("SELECT * FROM params WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.read)
            .await?;
        Ok(row.as_ref().map(param_row))
    }

    /// Some parameters by name (those that exist).
    pub async fn get_params(&self, names: &[&str]) -> Result<Vec<ParamRow>> {
        let mut out = Vec::with_capacity(names.len());
        // A script references few parameters; one indexed lookup each.
        for name in names {
            if let Some(p) = self.get_param(name).await? {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Every parameter, by name.
    pub async fn list_params(&self) -> Result<Vec<ParamRow>> {
        let rows = sqlx::query("SELECT * FROM params ORDER BY name")
            .fetch_all(&self.read)
            .await?;
        Ok(rows.iter().map(param_row).collect())
    }

    /// Deletes a parameter; false when there was none.
    pub async fn delete_param(&self, name: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM params WHERE name = ?")
            .bind(name)
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}
