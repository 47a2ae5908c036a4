//! The parameter store's rows (`params`). A secure value arrives here already sealed; this file never
//! sees it in clear.

use super::{Columns, Lock, Result, Store, serialize, with_pool};
use std::collections::BTreeMap;

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

/// A stored parameter (or one of its versions).
#[derive(Clone)]
pub struct ParamRow {
    /// Name.
    pub name: String,
    /// Value.
    pub value: StoredValue,
    /// Whether a plain value is a StringList (comma-separated items).
    pub list: bool,
    /// Description ('' when none).
    pub description: String,
    /// The pattern its values must match ('' when any).
    pub allowed_pattern: String,
    /// Version.
    pub version: i64,
    /// Epoch ms.
    pub updated_at: i64,
    /// Principal.
    pub updated_by: String,
    /// Tags (the parameter's; a version keeps none).
    pub tags: BTreeMap<String, String>,
}

// No Debug: a row may hold a secret (sealed, but still nothing for logs).

/// Versions kept per parameter (SSM's): a put past them drops the oldest.
pub const PARAM_VERSIONS_MAX: i64 = 100;

/// A put: the new value and what goes with it.
pub struct NewParam<'a> {
    /// Name.
    pub name: &'a str,
    /// Value, sealed when secure.
    pub value: &'a StoredValue,
    /// A StringList.
    pub list: bool,
    /// The description; None keeps the current one.
    pub description: Option<&'a str>,
    /// The allowed pattern; None keeps the current one.
    pub allowed_pattern: Option<&'a str>,
    /// Replace an existing parameter (else [`Put::Exists`]).
    pub overwrite: bool,
    /// Epoch ms.
    pub at: i64,
    /// Principal.
    pub by: &'a str,
    /// Tags of a new parameter (an existing one keeps its own).
    pub tags: &'a BTreeMap<String, String>,
}

/// Outcome of a put.
pub enum Put {
    /// Stored as this version.
    Ok(i64),
    /// New and there are [`PARAMS_MAX`] parameters.
    LimitExceeded,
    /// It exists and the put did not say overwrite.
    Exists,
    /// The value does not match the pattern that applies (the one given, else the current one).
    PatternMismatch(String),
}

fn param_row(r: &impl Columns) -> ParamRow {
    ParamRow {
        name: r.text("name"),
        value: if r.flag("secure") {
            StoredValue::Sealed(
                r.opt_bytes("nonce").unwrap_or_default(),
                r.opt_bytes("sealed").unwrap_or_default(),
            )
        } else {
            StoredValue::Plain(r.text("value"))
        },
        list: r.flag("list"),
        description: r.text("description"),
        allowed_pattern: r.text("allowed_pattern"),
        version: r.int("version"),
        updated_at: r.int("updated_at"),
        updated_by: r.text("updated_by"),
        // `param_versions` rows have no tags column.
        tags: if r.has("tags") {
            super::tags::parse_tags(&r.text("tags"))
        } else {
            BTreeMap::new()
        },
    }
}

/// The upper bound of the names that start with `prefix`: names are printable ASCII (below `\x7f`),
/// so each of them sorts in `[prefix, prefix + "\x7f")`.
fn prefix_end(prefix: &str) -> String {
    format!("{prefix}\u{7f}")
}

impl Store {
    /// Creates or replaces a parameter, one version up, and keeps the version in its history.
    /// `matches(value pattern)` decides whether the value fits the pattern that applies (the one
    /// given, else the current one; '' for none), inside the same transaction.
    pub async fn put_param(
        &self,
        p: &NewParam<'_>,
        matches: impl FnOnce(&str) -> bool,
    ) -> Result<Put> {
        let tags = serde_json::to_string(p.tags)?;
        with_pool!(self, write, |pool, d| {
            let mut tx = pool.begin().await?;
            serialize!(tx, d, Lock::Params);
            let current = sqlx::query(
                "SELECT version, description, allowed_pattern FROM params WHERE name = $1",
            )
            .bind(p.name)
            .fetch_optional(&mut *tx)
            .await?;
            let (current_version, description, pattern) = match &current {
                Some(r) => {
                    if !p.overwrite {
                        return Ok(Put::Exists);
                    }
                    (
                        Some(r.int("version")),
                        r.text("description"),
                        r.text("allowed_pattern"),
                    )
                }
                None => {
                    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM params")
                        .fetch_one(&mut *tx)
                        .await?;
                    if count >= PARAMS_MAX {
                        return Ok(Put::LimitExceeded);
                    }
                    (None, String::new(), String::new())
                }
            };
            let description = p.description.map_or(description, str::to_owned);
            let pattern = p.allowed_pattern.map_or(pattern, str::to_owned);
            if !pattern.is_empty() && !matches(&pattern) {
                return Ok(Put::PatternMismatch(pattern));
            }
            let version = current_version.unwrap_or(0) + 1;
            let (secure, plain, nonce, sealed) = match p.value {
                StoredValue::Plain(v) => (false, v.as_str(), None, None),
                StoredValue::Sealed(n, s) => (true, "", Some(n.as_slice()), Some(s.as_slice())),
            };
            let list = p.list && !secure;
            sqlx::query(
                "INSERT INTO params (name, secure, value, nonce, sealed, version, updated_at,
                   updated_by, list, description, allowed_pattern, tags)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                 ON CONFLICT (name) DO UPDATE SET secure = excluded.secure, value = excluded.value,
                   nonce = excluded.nonce, sealed = excluded.sealed, version = excluded.version,
                   updated_at = excluded.updated_at, updated_by = excluded.updated_by,
                   list = excluded.list, description = excluded.description,
                   allowed_pattern = excluded.allowed_pattern",
            )
            .bind(p.name)
            .bind(i64::from(secure))
            .bind(plain)
            .bind(nonce)
            .bind(sealed)
            .bind(version)
            .bind(p.at)
            .bind(p.by)
            .bind(i64::from(list))
            .bind(&description)
            .bind(&pattern)
            .bind(&tags)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO param_versions (name, version, secure, list, value, nonce, sealed,
                   description, allowed_pattern, updated_at, updated_by)
                 SELECT name, version, secure, list, value, nonce, sealed, description,
                   allowed_pattern, updated_at, updated_by FROM params WHERE name = $1",
            )
            .bind(p.name)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM param_versions WHERE name = $1 AND version <= $2")
                .bind(p.name)
                .bind(version - PARAM_VERSIONS_MAX)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Put::Ok(version))
        })
    }

    /// One version of a parameter (None when the parameter or that version is gone).
    pub async fn get_param_version(&self, name: &str, version: i64) -> Result<Option<ParamRow>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query("SELECT * FROM param_versions WHERE name = $1 AND version = $2")
                .bind(name)
                .bind(version)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(param_row)
        }))
    }

    /// Up to `limit` versions of a parameter after `after`, oldest first.
    pub async fn param_versions(
        &self,
        name: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<ParamRow>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(
                "SELECT * FROM param_versions WHERE name = $1 AND version > $2
                 ORDER BY version LIMIT $3",
            )
            .bind(name)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(param_row)
            .collect()
        }))
    }

    /// Up to `limit` parameters whose names start with `prefix` and sort after `after`, by name.
    pub async fn params_page(
        &self,
        prefix: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<ParamRow>> {
        let end = prefix_end(prefix);
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(
                "SELECT * FROM params WHERE name >= $1 AND name < $2 AND name > $3
                 ORDER BY name LIMIT $4",
            )
            .bind(prefix)
            .bind(&end)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(param_row)
            .collect()
        }))
    }

    /// One parameter.
    pub async fn get_param(&self, name: &str) -> Result<Option<ParamRow>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query("SELECT * FROM params WHERE name = $1")
                .bind(name)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(param_row)
        }))
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
        Ok(with_pool!(self, read, |pool| {
            sqlx::query("SELECT * FROM params ORDER BY name")
                .fetch_all(pool)
                .await?
                .iter()
                .map(param_row)
                .collect()
        }))
    }

    /// Deletes a parameter with all its versions; false when there was none.
    pub async fn delete_param(&self, name: &str) -> Result<bool> {
        let done = with_pool!(self, write, |pool| {
            sqlx::query("DELETE FROM params WHERE name = $1")
                .bind(name)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static NO_TAGS: BTreeMap<String, String> = BTreeMap::new();

    fn put<'a>(name: &'a str, value: &'a StoredValue, overwrite: bool) -> NewParam<'a> {
        NewParam {
            name,
            value,
            list: false,
            description: None,
            allowed_pattern: None,
            overwrite,
            at: 1,
            by: "admin",
            tags: &NO_TAGS,
        }
    }

    #[tokio::test]
    async fn versions_are_kept_up_to_the_limit_and_go_with_the_parameter() {
        let (_dir, stores) = crate::testing::stores().await;
        for (_, store) in stores {
            versions_kept(store).await;
        }
    }

    /// Puts racing on one new name from several connections: one creates it, the others find
    /// it there; overwrites number their versions once each (on PostgreSQL the transactions are
    /// serialized, as SQLite's one writer serializes them).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_puts_create_once_and_number_versions_once() {
        let (_dir, stores) = crate::testing::stores().await;
        for (kind, store) in stores {
            let puts = (0..8).map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    let v = StoredValue::Plain("v".into());
                    match store.put_param(&put("/race", &v, false), |_| true).await {
                        Ok(Put::Ok(1)) => "created",
                        Ok(Put::Exists) => "exists",
                        Ok(_) => "other",
                        Err(_) => "failed",
                    }
                })
            });
            let mut outcomes = Vec::new();
            for p in puts {
                outcomes.push(p.await.expect("task"));
            }
            outcomes.sort_unstable();
            let mut expected = vec!["exists"; 7];
            expected.insert(0, "created");
            assert_eq!(outcomes, expected, "{kind}");
            let overwrites = (0..8).map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    let v = StoredValue::Plain("w".into());
                    match store.put_param(&put("/race", &v, true), |_| true).await {
                        Ok(Put::Ok(n)) => n,
                        _ => 0,
                    }
                })
            });
            let mut versions = Vec::new();
            for p in overwrites {
                versions.push(p.await.expect("task"));
            }
            versions.sort_unstable();
            assert_eq!(versions, (2..=9).collect::<Vec<i64>>(), "{kind}");
        }
    }

    async fn versions_kept(store: Store) {
        let v = StoredValue::Plain("one".into());
        let first = NewParam {
            description: Some("first"),
            allowed_pattern: Some("^[a-z]+$"),
            ..put("/p", &v, false)
        };
        assert!(matches!(
            store.put_param(&first, |_| true).await.unwrap(),
            Put::Ok(1)
        ));
        assert!(matches!(
            store
                .put_param(&put("/p", &v, false), |_| true)
                .await
                .unwrap(),
            Put::Exists
        ));
        // The pattern that applies is the stored one when the put gives none.
        let seen = std::sync::Mutex::new(String::new());
        let refused = store
            .put_param(&put("/p", &v, true), |p| {
                *seen.lock().unwrap() = p.to_owned();
                false
            })
            .await
            .unwrap();
        assert!(matches!(refused, Put::PatternMismatch(p) if p == "^[a-z]+$"));
        assert_eq!(*seen.lock().unwrap(), "^[a-z]+$");
        for want in 2..=PARAM_VERSIONS_MAX + 2 {
            let got = store
                .put_param(&put("/p", &v, true), |_| true)
                .await
                .unwrap();
            assert!(matches!(got, Put::Ok(n) if n == want));
        }
        let kept = store.param_versions("/p", 0, 1000).await.unwrap();
        assert_eq!(kept.len() as i64, PARAM_VERSIONS_MAX);
        assert_eq!(kept[0].version, 3);
        assert!(kept.iter().all(|r| r.description == "first"));
        assert!(store.get_param_version("/p", 2).await.unwrap().is_none());
        assert!(store.delete_param("/p").await.unwrap());
        assert!(
            store
                .param_versions("/p", 0, 1000)
                .await
                .unwrap()
                .is_empty()
        );
        // Prefix pages hold only the names under the prefix.
        for n in ["/a/x", "/a/y", "/ab", "/b"] {
            store.put_param(&put(n, &v, false), |_| true).await.unwrap();
        }
        let names: Vec<String> = store
            .params_page("/a/", "", 10)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["/a/x", "/a/y"]);
        let after: Vec<String> = store
            .params_page("", "/a/y", 10)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(after, ["/ab", "/b"]);
    }
}
