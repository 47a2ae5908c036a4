//! Objects kept for users (`objects`): one row per complete object of the object store's `files/`
//! space, with the size and SHA-256 the server measured while writing it.

use super::{Columns, Result, Store, with_pool};

/// Most objects one listing answers.
pub const OBJECTS_PAGE_MAX: i64 = 1_000;

/// A stored object's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRow {
    /// Its key (see `fleetrun_proto::api::check_object_key`).
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
    /// Epoch ms.
    pub created_at: i64,
    /// The principal that wrote it.
    pub created_by: String,
}

fn object_row(r: &impl Columns) -> ObjectRow {
    ObjectRow {
        key: r.text("key"),
        size: u64::try_from(r.int("size")).unwrap_or(0),
        sha256: r.text("sha256"),
        created_at: r.int("created_at"),
        created_by: r.text("created_by"),
    }
}

impl Store {
    /// Records a complete object, replacing the record of an earlier one under the key.
    pub async fn put_object(&self, row: &ObjectRow) -> Result<()> {
        with_pool!(self, write, |pool| {
            sqlx::query(
                "INSERT INTO objects (key, size, sha256, created_at, created_by)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (key) DO UPDATE SET size = excluded.size, sha256 = excluded.sha256,
                   created_at = excluded.created_at, created_by = excluded.created_by",
            )
            .bind(&row.key)
            .bind(i64::try_from(row.size).unwrap_or(i64::MAX))
            .bind(&row.sha256)
            .bind(row.created_at)
            .bind(&row.created_by)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// The record of the object under `key`.
    pub async fn get_object(&self, key: &str) -> Result<Option<ObjectRow>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query("SELECT * FROM objects WHERE key = $1")
                .bind(key)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(object_row)
        }))
    }

    /// Objects whose key starts with `prefix`, in key order, after the key `after` (a page's last),
    /// at most `limit`. Keys are printable ASCII, so the range `[prefix, prefix + DEL)` holds
    /// exactly the keys with that prefix and the primary key's index answers it.
    pub async fn list_objects(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ObjectRow>> {
        let upper = format!("{prefix}\u{7f}");
        let limit = limit.clamp(1, OBJECTS_PAGE_MAX);
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(
                "SELECT * FROM objects WHERE key >= $1 AND key < $2 AND key > $3
                 ORDER BY key LIMIT $4",
            )
            .bind(prefix)
            .bind(&upper)
            .bind(after.unwrap_or(""))
            .bind(limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(object_row)
            .collect()
        }))
    }

    /// Forgets the object under `key`; false when there was none.
    pub async fn delete_object(&self, key: &str) -> Result<bool> {
        let done = with_pool!(self, write, |pool| {
            sqlx::query("DELETE FROM objects WHERE key = $1")
                .bind(key)
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

    #[tokio::test]
    async fn objects_are_listed_by_prefix_in_pages() {
        let (_dir, stores) = crate::testing::stores().await;
        for (_, store) in stores {
            listed_by_prefix_in_pages(store).await;
        }
    }

    async fn listed_by_prefix_in_pages(store: Store) {
        // A key past "in/" in bytes but not in a natural-language collation.
        for key in ["in/a.bin", "in/b.bin", "in/c/d", "inx", "out/r", "in/B"] {
            let row = ObjectRow {
                key: key.into(),
                size: 3,
                sha256: "ab".into(),
                created_at: 1,
                created_by: "alice".into(),
            };
            store.put_object(&row).await.unwrap();
        }
        let keys = |v: Vec<ObjectRow>| v.into_iter().map(|r| r.key).collect::<Vec<_>>();
        assert_eq!(
            keys(store.list_objects("in/", None, 2).await.unwrap()),
            ["in/B", "in/a.bin"]
        );
        assert_eq!(
            keys(
                store
                    .list_objects("in/", Some("in/b.bin"), 10)
                    .await
                    .unwrap()
            ),
            ["in/c/d"]
        );
        assert_eq!(store.list_objects("", None, 10).await.unwrap().len(), 6);
        let again = ObjectRow {
            key: "out/r".into(),
            size: 9,
            sha256: "cd".into(),
            created_at: 2,
            created_by: "bob".into(),
        };
        store.put_object(&again).await.unwrap();
        assert_eq!(store.get_object("out/r").await.unwrap(), Some(again));
        assert!(store.delete_object("out/r").await.unwrap());
        assert!(!store.delete_object("out/r").await.unwrap());
        assert_eq!(store.get_object("out/r").await.unwrap(), None);
    }
}
