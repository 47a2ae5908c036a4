//! Users, their API tokens and their access keys' owners: who a credential acts as.

use super::{Result, Store, StoreError};
use fleetrun_proto::api::{Role, Token, User};
use fleetrun_proto::time::now_ms;
use sqlx::Row;

/// Users with their credential counts (a macro so queries can extend it with `concat!`).
macro_rules! user_select {
    () => {
        "SELECT u.name, u.role, u.policy, u.created_at, \
         (SELECT COUNT(*) FROM api_tokens t WHERE t.user_name = u.name) AS tokens, \
         (SELECT COUNT(*) FROM access_keys k WHERE k.user_name = u.name) AS access_keys \
         FROM users u"
    };
}

/// A user as authorization needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRow {
    /// Name.
    pub name: String,
    /// Built-in role.
    pub role: Role,
    /// Its own Cedar policies ('' when none).
    pub policy: String,
}

/// A user's row with its credential counts, as stored (`edge` presents it as an API `User`).
#[derive(Clone, Debug)]
pub(crate) struct UserRecord {
    pub(crate) user: UserRow,
    /// Epoch ms.
    pub(crate) created_at: i64,
    /// API tokens it has.
    pub(crate) tokens: u32,
    /// Access keys it has.
    pub(crate) access_keys: u32,
}

/// An API token's row, as stored (`edge` presents it as an API `Token`, named by its id).
#[derive(Clone, Debug)]
pub(crate) struct TokenRecord {
    /// Hex SHA-256 of the token.
    pub(crate) token_hash: String,
    pub(crate) user: String,
    pub(crate) name: String,
    /// Epoch ms.
    pub(crate) created_at: i64,
    /// Epoch ms; `None` for a token that never expires.
    pub(crate) expires_at: Option<i64>,
}

/// Why a user change was refused.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The name is taken.
    #[error("user {0} already exists")]
    Exists(String),
    /// No such user.
    #[error("no user {0}")]
    NotFound(String),
    /// The change would leave nobody able to manage users.
    #[error("{0} is the last admin; make another user admin first")]
    LastAdmin(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The public id of a token: a prefix of its hash, which names it without revealing it.
pub fn token_id(token_hash: &str) -> String {
    format!("tok_{}", token_hash.get(..16).unwrap_or(token_hash))
}

fn role_of(s: &str) -> Role {
    // The API only stores valid roles; a hand-edited row grants nothing rather than failing requests.
    s.parse().unwrap_or(Role::None)
}

impl Store {
    /// The user an unexpired API token acts as, and the token's id.
    pub async fn token_principal(&self, token_hash: &str) -> Result<Option<(UserRow, String)>> {
        let row = sqlx::query(
            "SELECT u.name, u.role, u.policy FROM api_tokens t JOIN users u ON u.name = t.user_name \
             WHERE t.token_hash = ? AND (t.expires_at IS NULL OR t.expires_at > ?)",
        )
        .bind(token_hash)
        .bind(now_ms())
        .fetch_optional(&self.sqlite()?.read)
        .await?;
        Ok(row.map(|r| (user_row(&r), token_id(token_hash))))
    }

    /// A user by name.
    pub async fn user(&self, name: &str) -> Result<Option<UserRow>> {
        let row = sqlx::query("SELECT name, role, policy FROM users WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.sqlite()?.read)
            .await?;
        Ok(row.as_ref().map(user_row))
    }

    /// Creates a user.
    pub async fn create_user(&self, user: &UserRow) -> Result<User, UserError> {
        let now = now_ms();
        let done = sqlx::query(
            "INSERT INTO users (name, role, policy, created_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT(name) DO NOTHING",
        )
        .bind(&user.name)
        .bind(user.role.as_str())
        .bind(&user.policy)
        .bind(now)
        .execute(&self.sqlite()?.write)
        .await
        .map_err(StoreError::from)?;
        if done.rows_affected() == 0 {
            return Err(UserError::Exists(user.name.clone()));
        }
        self.get_user(&user.name)
            .await?
            .ok_or(UserError::Store(StoreError::Missing("user")))
    }

    /// Users with their credential counts, by name.
    pub async fn list_users(&self) -> Result<Vec<User>> {
        let rows = sqlx::query(concat!(user_select!(), " ORDER BY u.name"))
            .fetch_all(&self.sqlite()?.read)
            .await?;
        Ok(rows.iter().map(|r| user_record(r).into()).collect())
    }

    /// One user with its credential counts.
    pub async fn get_user(&self, name: &str) -> Result<Option<User>> {
        let row = sqlx::query(concat!(user_select!(), " WHERE u.name = ?"))
            .bind(name)
            .fetch_optional(&self.sqlite()?.read)
            .await?;
        Ok(row.as_ref().map(|r| user_record(r).into()))
    }

    /// Changes a user's role and/or policy. Refuses to demote the last admin.
    pub async fn update_user(
        &self,
        name: &str,
        role: Option<Role>,
        policy: Option<&str>,
    ) -> Result<User, UserError> {
        let mut tx = self
            .sqlite()?
            .write
            .begin()
            .await
            .map_err(StoreError::from)?;
        let current: Option<String> = sqlx::query_scalar("SELECT role FROM users WHERE name = ?")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        let Some(current) = current else {
            return Err(UserError::NotFound(name.into()));
        };
        if let Some(role) = role {
            if current == "admin" && role != Role::Admin && admins(&mut tx).await? <= 1 {
                return Err(UserError::LastAdmin(name.into()));
            }
            sqlx::query("UPDATE users SET role = ? WHERE name = ?")
                .bind(role.as_str())
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
        }
        if let Some(policy) = policy {
            sqlx::query("UPDATE users SET policy = ? WHERE name = ?")
                .bind(policy)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        self.get_user(name)
            .await?
            .ok_or(UserError::Store(StoreError::Missing("user")))
    }

    /// Deletes a user with its tokens and access keys (they stop working at once). Refuses to delete
    /// the last admin.
    pub async fn delete_user(&self, name: &str) -> Result<(), UserError> {
        let mut tx = self
            .sqlite()?
            .write
            .begin()
            .await
            .map_err(StoreError::from)?;
        let role: Option<String> = sqlx::query_scalar("SELECT role FROM users WHERE name = ?")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        match role.as_deref() {
            None => return Err(UserError::NotFound(name.into())),
            Some("admin") if admins(&mut tx).await? <= 1 => {
                return Err(UserError::LastAdmin(name.into()));
            }
            Some(_) => {}
        }
        for sql in [
            "DELETE FROM api_tokens WHERE user_name = ?",
            "DELETE FROM access_keys WHERE user_name = ?",
            "DELETE FROM users WHERE name = ?",
        ] {
            sqlx::query(sql)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        Ok(())
    }

    /// Stores an API token's hash for a user.
    pub async fn insert_token(
        &self,
        token_hash: &str,
        user: &str,
        name: &str,
        expires_at: Option<i64>,
    ) -> Result<Token> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO api_tokens (token_hash, name, created_at, user_name, expires_at) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(token_hash)
        .bind(name)
        .bind(now)
        .bind(user)
        .bind(expires_at)
        .execute(&self.sqlite()?.write)
        .await?;
        Ok(TokenRecord {
            token_hash: token_hash.into(),
            user: user.into(),
            name: name.into(),
            created_at: now,
            expires_at,
        }
        .into())
    }

    /// Tokens (without secrets), newest first; only `user`'s when given.
    pub async fn list_tokens(&self, user: Option<&str>) -> Result<Vec<Token>> {
        let rows = sqlx::query(
            "SELECT token_hash, user_name, name, created_at, expires_at FROM api_tokens \
             WHERE ?1 IS NULL OR user_name = ?1 ORDER BY created_at DESC",
        )
        .bind(user)
        .fetch_all(&self.sqlite()?.read)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                TokenRecord {
                    token_hash: r.get("token_hash"),
                    user: r.get("user_name"),
                    name: r.get("name"),
                    created_at: r.get("created_at"),
                    expires_at: r.get("expires_at"),
                }
                .into()
            })
            .collect())
    }

    /// The user of the token with this id, if there is one.
    pub async fn token_user(&self, id: &str) -> Result<Option<String>> {
        let Some(prefix) = token_hash_prefix(id) else {
            return Ok(None);
        };
        Ok(sqlx::query_scalar(
            "SELECT user_name FROM api_tokens WHERE substr(token_hash, 1, 16) = ?",
        )
        .bind(prefix)
        .fetch_optional(&self.sqlite()?.read)
        .await?)
    }

    /// Deletes a token by id; whether it existed.
    pub async fn delete_token(&self, id: &str) -> Result<bool> {
        let Some(prefix) = token_hash_prefix(id) else {
            return Ok(false);
        };
        let done = sqlx::query("DELETE FROM api_tokens WHERE substr(token_hash, 1, 16) = ?")
            .bind(prefix)
            .execute(&self.sqlite()?.write)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

fn token_hash_prefix(id: &str) -> Option<&str> {
    id.strip_prefix("tok_")
        .filter(|p| p.len() == 16 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

async fn admins(tx: &mut sqlx::SqliteConnection) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE role = 'admin'")
            .fetch_one(tx)
            .await?,
    )
}

fn user_row(r: &sqlx::sqlite::SqliteRow) -> UserRow {
    UserRow {
        name: r.get("name"),
        role: role_of(r.get("role")),
        policy: r.get("policy"),
    }
}

fn user_record(r: &sqlx::sqlite::SqliteRow) -> UserRecord {
    UserRecord {
        user: user_row(r),
        created_at: r.get("created_at"),
        tokens: r.get::<i64, _>("tokens").try_into().unwrap_or(0),
        access_keys: r.get::<i64, _>("access_keys").try_into().unwrap_or(0),
    }
}
