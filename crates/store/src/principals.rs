//! Users, their API tokens and their access keys' owners: who a credential acts as.

use super::{Columns, Lock, Result, Store, StoreError, serialize, with_pool};
use fleetrun_proto::api::{Role, Token, User};
use fleetrun_proto::time::now_ms;

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
        let now = now_ms();
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(
                "SELECT u.name, u.role, u.policy FROM api_tokens t
                 JOIN users u ON u.name = t.user_name
                 WHERE t.token_hash = $1 AND (t.expires_at IS NULL OR t.expires_at > $2)",
            )
            .bind(token_hash)
            .bind(now)
            .fetch_optional(pool)
            .await?
            .map(|r| (user_row(&r), token_id(token_hash)))
        }))
    }

    /// A user by name.
    pub async fn user(&self, name: &str) -> Result<Option<UserRow>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query("SELECT name, role, policy FROM users WHERE name = $1")
                .bind(name)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(user_row)
        }))
    }

    /// Creates a user.
    pub async fn create_user(&self, user: &UserRow) -> Result<User, UserError> {
        let now = now_ms();
        let done = with_pool!(self, write, |pool| {
            sqlx::query(
                "INSERT INTO users (name, role, policy, created_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(&user.name)
            .bind(user.role.as_str())
            .bind(&user.policy)
            .bind(now)
            .execute(pool)
            .await
            .map_err(StoreError::from)?
            .rows_affected()
        });
        if done == 0 {
            return Err(UserError::Exists(user.name.clone()));
        }
        self.get_user(&user.name)
            .await?
            .ok_or(UserError::Store(StoreError::Missing("user")))
    }

    /// Users with their credential counts, by name.
    pub async fn list_users(&self) -> Result<Vec<User>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(concat!(user_select!(), " ORDER BY u.name"))
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| user_record(r).into())
                .collect()
        }))
    }

    /// One user with its credential counts.
    pub async fn get_user(&self, name: &str) -> Result<Option<User>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(concat!(user_select!(), " WHERE u.name = $1"))
                .bind(name)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(|r| user_record(r).into())
        }))
    }

    /// Changes a user's role and/or policy. Refuses to demote the last admin.
    pub async fn update_user(
        &self,
        name: &str,
        role: Option<Role>,
        policy: Option<&str>,
    ) -> Result<User, UserError> {
        with_pool!(self, write, |pool, d| {
            let mut tx = pool.begin().await.map_err(StoreError::from)?;
            serialize!(tx, d, Lock::Users);
            let current: Option<String> =
                sqlx::query_scalar("SELECT role FROM users WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
            let Some(current) = current else {
                return Err(UserError::NotFound(name.into()));
            };
            if let Some(role) = role {
                if current == "admin" && role != Role::Admin && admins!(tx) <= 1 {
                    return Err(UserError::LastAdmin(name.into()));
                }
                sqlx::query("UPDATE users SET role = $1 WHERE name = $2")
                    .bind(role.as_str())
                    .bind(name)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
            }
            if let Some(policy) = policy {
                sqlx::query("UPDATE users SET policy = $1 WHERE name = $2")
                    .bind(policy)
                    .bind(name)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
            }
            tx.commit().await.map_err(StoreError::from)?;
        });
        self.get_user(name)
            .await?
            .ok_or(UserError::Store(StoreError::Missing("user")))
    }

    /// Deletes a user with its tokens and access keys (they stop working at once). Refuses to delete
    /// the last admin.
    pub async fn delete_user(&self, name: &str) -> Result<(), UserError> {
        with_pool!(self, write, |pool, d| {
            let mut tx = pool.begin().await.map_err(StoreError::from)?;
            serialize!(tx, d, Lock::Users);
            let role: Option<String> = sqlx::query_scalar("SELECT role FROM users WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(StoreError::from)?;
            match role.as_deref() {
                None => return Err(UserError::NotFound(name.into())),
                Some("admin") if admins!(tx) <= 1 => {
                    return Err(UserError::LastAdmin(name.into()));
                }
                Some(_) => {}
            }
            for sql in [
                "DELETE FROM api_tokens WHERE user_name = $1",
                "DELETE FROM access_keys WHERE user_name = $1",
                "DELETE FROM users WHERE name = $1",
            ] {
                sqlx::query(sql)
                    .bind(name)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
            }
            tx.commit().await.map_err(StoreError::from)?;
        });
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
        with_pool!(self, write, |pool| {
            sqlx::query(
                "INSERT INTO api_tokens (token_hash, name, created_at, user_name, expires_at)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(token_hash)
            .bind(name)
            .bind(now)
            .bind(user)
            .bind(expires_at)
            .execute(pool)
            .await?;
        });
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
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(
                "SELECT token_hash, user_name, name, created_at, expires_at FROM api_tokens
                 WHERE $1 IS NULL OR user_name = $1 ORDER BY created_at DESC",
            )
            .bind(user)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| {
                TokenRecord {
                    token_hash: r.text("token_hash"),
                    user: r.text("user_name"),
                    name: r.text("name"),
                    created_at: r.int("created_at"),
                    expires_at: r.opt_int("expires_at"),
                }
                .into()
            })
            .collect()
        }))
    }

    /// The user of the token with this id, if there is one.
    pub async fn token_user(&self, id: &str) -> Result<Option<String>> {
        let Some(prefix) = token_hash_prefix(id) else {
            return Ok(None);
        };
        Ok(with_pool!(self, read, |pool| {
            sqlx::query_scalar(
                "SELECT user_name FROM api_tokens WHERE substr(token_hash, 1, 16) = $1",
            )
            .bind(prefix)
            .fetch_optional(pool)
            .await?
        }))
    }

    /// Deletes a token by id; whether it existed.
    pub async fn delete_token(&self, id: &str) -> Result<bool> {
        let Some(prefix) = token_hash_prefix(id) else {
            return Ok(false);
        };
        let done = with_pool!(self, write, |pool| {
            sqlx::query("DELETE FROM api_tokens WHERE substr(token_hash, 1, 16) = $1")
                .bind(prefix)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done > 0)
    }
}

fn token_hash_prefix(id: &str) -> Option<&str> {
    id.strip_prefix("tok_")
        .filter(|p| p.len() == 16 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// How many admins there are, in the transaction `$tx`.
macro_rules! admins {
    ($tx:expr) => {{
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE role = 'admin'")
            .fetch_one(&mut *$tx)
            .await
            .map_err(StoreError::from)?;
        n
    }};
}
use admins;

fn user_row(r: &impl Columns) -> UserRow {
    UserRow {
        name: r.text("name"),
        role: role_of(&r.text("role")),
        policy: r.text("policy"),
    }
}

fn user_record(r: &impl Columns) -> UserRecord {
    UserRecord {
        user: user_row(r),
        created_at: r.int("created_at"),
        tokens: r.int("tokens").try_into().unwrap_or(0),
        access_keys: r.int("access_keys").try_into().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn users_and_tokens_on_both_databases() {
        let (_dir, stores) = crate::testing::stores().await;
        for (kind, store) in stores {
            let alice = UserRow {
                name: "alice".into(),
                role: Role::Operator,
                policy: String::new(),
            };
            let made = store.create_user(&alice).await.expect("create");
            assert_eq!((made.name.as_str(), made.tokens), ("alice", 0), "{kind}");
            assert!(matches!(
                store.create_user(&alice).await,
                Err(UserError::Exists(_))
            ));
            // The first admin (from the migrations) cannot be demoted or deleted while alone.
            let demote = store.update_user("admin", Some(Role::Viewer), None).await;
            assert!(matches!(demote, Err(UserError::LastAdmin(_))), "{kind}");
            assert!(matches!(
                store.delete_user("admin").await,
                Err(UserError::LastAdmin(_))
            ));
            let promoted = store.update_user(
                "alice",
                Some(Role::Admin),
                Some("permit(principal, action, resource);"),
            );
            assert_eq!(promoted.await.expect("update").role, Role::Admin);
            assert!(matches!(
                store.update_user("bob", None, None).await,
                Err(UserError::NotFound(_))
            ));

            let hash = "ab".repeat(32);
            let token = store
                .insert_token(&hash, "alice", "ci", None)
                .await
                .expect("token");
            let (user, id) = store
                .token_principal(&hash)
                .await
                .expect("principal")
                .expect("known");
            assert_eq!(
                (user.name.as_str(), id.as_str()),
                ("alice", token.id.as_str()),
                "{kind}"
            );
            let expired = "cd".repeat(32);
            store
                .insert_token(&expired, "alice", "old", Some(1))
                .await
                .expect("token");
            assert!(
                store
                    .token_principal(&expired)
                    .await
                    .expect("principal")
                    .is_none()
            );
            assert_eq!(
                store.list_tokens(Some("alice")).await.expect("list").len(),
                2
            );
            assert_eq!(
                store.list_tokens(Some("admin")).await.expect("list").len(),
                0
            );
            assert_eq!(
                store
                    .get_user("alice")
                    .await
                    .expect("get")
                    .expect("alice")
                    .tokens,
                2
            );
            assert_eq!(
                store.token_user(&token.id).await.expect("user").as_deref(),
                Some("alice")
            );
            assert!(store.delete_token(&token.id).await.expect("delete"));
            assert!(!store.delete_token(&token.id).await.expect("delete"));
            // Now there are two admins: the first may go, and alice's tokens go with alice.
            store.delete_user("admin").await.expect("delete admin");
            assert!(matches!(
                store.delete_user("alice").await,
                Err(UserError::LastAdmin(_))
            ));
            assert_eq!(store.list_users().await.expect("users").len(), 1, "{kind}");
        }
    }
}
