//! Documents and their versions. Versions are numbered from 1; a document's versions are created
//! and its latest/default pointers moved in one transaction each.

use super::{Columns, Lock, Result, Store, serialize, with_pool};
use fleetrun_proto::time::now_ms;
use std::collections::BTreeMap;

/// Most documents (SSM: 500 per account).
pub const DOCUMENTS_MAX: i64 = 500;
/// Most versions of one document (SSM: 1,000).
pub const VERSIONS_MAX: i64 = 1_000;

/// A stored document.
#[derive(Clone, Debug)]
pub struct DocumentRow {
    /// Name.
    pub name: String,
    /// `Command`.
    pub document_type: String,
    /// `JSON`.
    pub document_format: String,
    /// Owner.
    pub owner: String,
    /// Default version.
    pub default_version: i64,
    /// Latest version.
    pub latest_version: i64,
    /// Epoch ms.
    pub created_at: i64,
    /// Tags (SSM's document tags).
    pub tags: BTreeMap<String, String>,
}

/// One version of a document.
#[derive(Clone, Debug)]
pub struct VersionRow {
    /// Number.
    pub version: i64,
    /// Label.
    pub version_name: Option<String>,
    /// Content as given.
    pub content: String,
    /// Hex SHA-256 of the content.
    pub hash: String,
    /// Schema version of the content.
    pub schema_version: String,
    /// Description of the content.
    pub description: String,
    /// Epoch ms.
    pub created_at: i64,
}

/// Outcome of storing a new document.
pub enum Created {
    /// Stored.
    Ok,
    /// A document has that name.
    Exists,
    /// There are [`DOCUMENTS_MAX`] documents.
    LimitExceeded,
}

/// Outcome of adding a version.
pub enum Added {
    /// Stored as this version.
    Ok(i64),
    /// No such document.
    Missing,
    /// The version given is not the latest (which is this).
    NotLatest(i64),
    /// A version has the same content.
    Duplicate(i64),
    /// A version has the same label.
    DuplicateVersionName,
    /// There are [`VERSIONS_MAX`] versions.
    LimitExceeded,
}

fn document_row(r: &impl Columns) -> DocumentRow {
    DocumentRow {
        name: r.text("name"),
        document_type: r.text("document_type"),
        document_format: r.text("document_format"),
        owner: r.text("owner"),
        default_version: r.int("default_version"),
        latest_version: r.int("latest_version"),
        created_at: r.int("created_at"),
        tags: super::tags::parse_tags(&r.text("tags")),
    }
}

fn version_row(r: &impl Columns) -> VersionRow {
    VersionRow {
        version: r.int("version"),
        version_name: r.opt_text("version_name"),
        content: r.text("content"),
        hash: r.text("hash"),
        schema_version: r.text("schema_version"),
        description: r.text("description"),
        created_at: r.int("v_created_at"),
    }
}

macro_rules! doc_columns {
    () => {
        "d.name, d.document_type, d.document_format, d.owner, d.default_version, d.latest_version, d.created_at, d.tags"
    };
}
macro_rules! version_columns {
    () => {
        "v.version, v.version_name, v.content, v.hash, v.schema_version, v.description, v.created_at AS v_created_at"
    };
}

/// Inserts version `$version` of document `$name` in the transaction `$tx`.
macro_rules! insert_version {
    ($tx:expr, $name:expr, $version:expr, $v:expr) => {{
        let v: &VersionRow = $v;
        sqlx::query(
            "INSERT INTO document_versions (name, version, version_name, content, hash,
                 schema_version, description, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind($name)
        .bind($version)
        .bind(&v.version_name)
        .bind(&v.content)
        .bind(&v.hash)
        .bind(&v.schema_version)
        .bind(&v.description)
        .bind(if v.created_at == 0 {
            now_ms()
        } else {
            v.created_at
        })
        .execute(&mut *$tx)
        .await?;
    }};
}

impl Store {
    /// Stores a new document with its version 1.
    pub async fn insert_document(&self, doc: &DocumentRow, v: &VersionRow) -> Result<Created> {
        let tags = serde_json::to_string(&doc.tags)?;
        with_pool!(self, write, |pool, d| {
            let mut tx = pool.begin().await?;
            serialize!(tx, d, Lock::Documents);
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM documents WHERE name = $1)")
                    .bind(&doc.name)
                    .fetch_one(&mut *tx)
                    .await?;
            if exists {
                return Ok(Created::Exists);
            }
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM documents")
                .fetch_one(&mut *tx)
                .await?;
            if n >= DOCUMENTS_MAX {
                return Ok(Created::LimitExceeded);
            }
            sqlx::query(
                "INSERT INTO documents (name, document_type, document_format, owner,
                     default_version, latest_version, created_at, tags)
                 VALUES ($1, $2, $3, $4, 1, 1, $5, $6)",
            )
            .bind(&doc.name)
            .bind(&doc.document_type)
            .bind(&doc.document_format)
            .bind(&doc.owner)
            .bind(doc.created_at)
            .bind(&tags)
            .execute(&mut *tx)
            .await?;
            insert_version!(tx, &doc.name, 1i64, v);
            tx.commit().await?;
            Ok(Created::Ok)
        })
    }

    /// Adds a version after `expected_latest` (None: after whatever is latest).
    pub async fn add_document_version(
        &self,
        name: &str,
        expected_latest: Option<i64>,
        v: &VersionRow,
    ) -> Result<Added> {
        with_pool!(self, write, |pool, d| {
            let mut tx = pool.begin().await?;
            serialize!(tx, d, Lock::Documents);
            let latest: Option<i64> =
                sqlx::query_scalar("SELECT latest_version FROM documents WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&mut *tx)
                    .await?;
            let Some(latest) = latest else {
                return Ok(Added::Missing);
            };
            if expected_latest.is_some_and(|e| e != latest) {
                return Ok(Added::NotLatest(latest));
            }
            let dup: Option<i64> = sqlx::query_scalar(
                "SELECT version FROM document_versions WHERE name = $1 AND hash = $2 LIMIT 1",
            )
            .bind(name)
            .bind(&v.hash)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(d) = dup {
                return Ok(Added::Duplicate(d));
            }
            if let Some(label) = &v.version_name {
                let taken: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM document_versions
                       WHERE name = $1 AND version_name = $2)",
                )
                .bind(name)
                .bind(label)
                .fetch_one(&mut *tx)
                .await?;
                if taken {
                    return Ok(Added::DuplicateVersionName);
                }
            }
            if latest >= VERSIONS_MAX {
                return Ok(Added::LimitExceeded);
            }
            let version = latest + 1;
            insert_version!(tx, name, version, v);
            sqlx::query("UPDATE documents SET latest_version = $1 WHERE name = $2")
                .bind(version)
                .bind(name)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Added::Ok(version))
        })
    }

    /// One document.
    pub async fn get_document(&self, name: &str) -> Result<Option<DocumentRow>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(concat!(
                "SELECT ",
                doc_columns!(),
                " FROM documents d WHERE d.name = $1"
            ))
            .bind(name)
            .fetch_optional(pool)
            .await?
            .as_ref()
            .map(document_row)
        }))
    }

    /// One version of a document, by number.
    pub async fn get_document_version(
        &self,
        name: &str,
        version: i64,
    ) -> Result<Option<VersionRow>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(concat!(
                "SELECT ",
                version_columns!(),
                " FROM document_versions v WHERE v.name = $1 AND v.version = $2"
            ))
            .bind(name)
            .bind(version)
            .fetch_optional(pool)
            .await?
            .as_ref()
            .map(version_row)
        }))
    }

    /// Up to `limit` versions of a document numbered above `after`, oldest first (a page of
    /// ListDocumentVersions: versions are numbered 1, 2, ... with no gaps).
    pub async fn document_versions(
        &self,
        name: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<VersionRow>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(concat!(
                "SELECT ",
                version_columns!(),
                " FROM document_versions v WHERE v.name = $1 AND v.version > $2",
                " ORDER BY v.version LIMIT $3"
            ))
            .bind(name)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(version_row)
            .collect()
        }))
    }

    /// The number of a version by its label.
    pub async fn document_version_by_name(&self, name: &str, label: &str) -> Result<Option<i64>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query_scalar(
                "SELECT version FROM document_versions WHERE name = $1 AND version_name = $2",
            )
            .bind(name)
            .bind(label)
            .fetch_optional(pool)
            .await?
        }))
    }

    /// Every document with its default version, by name.
    pub async fn list_documents(&self) -> Result<Vec<(DocumentRow, VersionRow)>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(concat!(
                "SELECT ",
                doc_columns!(),
                ", ",
                version_columns!(),
                " FROM documents d JOIN document_versions v",
                " ON v.name = d.name AND v.version = d.default_version",
                " ORDER BY d.name"
            ))
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| (document_row(r), version_row(r)))
            .collect()
        }))
    }

    /// Deletes a document and all its versions; false when there was none.
    pub async fn delete_document(&self, name: &str) -> Result<bool> {
        with_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM document_versions WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            let r = sqlx::query("DELETE FROM documents WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(r.rows_affected() > 0)
        })
    }

    /// Makes an existing version the default; false when the document or version does not exist.
    pub async fn set_default_document_version(&self, name: &str, version: i64) -> Result<bool> {
        let done = with_pool!(self, write, |pool| {
            sqlx::query(
                "UPDATE documents SET default_version = $1 WHERE name = $2
                   AND EXISTS (SELECT 1 FROM document_versions WHERE name = $2 AND version = $1)",
            )
            .bind(version)
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

    fn version(content: &str, label: Option<&str>) -> VersionRow {
        VersionRow {
            version: 0,
            version_name: label.map(str::to_owned),
            content: content.into(),
            hash: format!("h-{content}"),
            schema_version: "2.2".into(),
            description: String::new(),
            created_at: 0,
        }
    }

    #[tokio::test]
    async fn documents_are_versioned_listed_and_deleted() {
        let (_dir, stores) = crate::testing::stores().await;
        for (kind, store) in stores {
            let doc = DocumentRow {
                name: "Greet".into(),
                document_type: "Command".into(),
                document_format: "JSON".into(),
                owner: "Self".into(),
                default_version: 1,
                latest_version: 1,
                created_at: 5,
                tags: BTreeMap::from([("team".into(), "ops".into())]),
            };
            let v1 = version("one", Some("first"));
            assert!(
                matches!(store.insert_document(&doc, &v1).await, Ok(Created::Ok)),
                "{kind}"
            );
            assert!(matches!(
                store.insert_document(&doc, &v1).await,
                Ok(Created::Exists)
            ));
            let add = |v, at| {
                let store = store.clone();
                async move { store.add_document_version("Greet", at, &v).await }
            };
            assert!(matches!(
                add(version("one", None), None).await,
                Ok(Added::Duplicate(1))
            ));
            assert!(matches!(
                add(version("two", Some("first")), None).await,
                Ok(Added::DuplicateVersionName)
            ));
            assert!(matches!(
                add(version("two", None), Some(7)).await,
                Ok(Added::NotLatest(1))
            ));
            assert!(matches!(
                add(version("two", Some("second")), Some(1)).await,
                Ok(Added::Ok(2))
            ));
            let x = version("x", None);
            let missing = store.add_document_version("Nope", None, &x).await;
            assert!(matches!(missing, Ok(Added::Missing)));
            let row = store
                .get_document("Greet")
                .await
                .expect("get")
                .expect("doc");
            assert_eq!((row.latest_version, row.default_version), (2, 1), "{kind}");
            assert_eq!(row.tags.get("team").map(String::as_str), Some("ops"));
            assert_eq!(
                store
                    .document_version_by_name("Greet", "second")
                    .await
                    .expect("label"),
                Some(2)
            );
            let v2 = store
                .get_document_version("Greet", 2)
                .await
                .expect("v2")
                .expect("v2");
            assert_eq!(v2.content, "two");
            assert_eq!(
                store
                    .document_versions("Greet", 1, 10)
                    .await
                    .expect("page")
                    .len(),
                1
            );
            assert!(
                store
                    .set_default_document_version("Greet", 2)
                    .await
                    .expect("default")
            );
            assert!(
                !store
                    .set_default_document_version("Greet", 9)
                    .await
                    .expect("default")
            );
            let listed = store.list_documents().await.expect("list");
            assert_eq!(listed.len(), 1);
            assert_eq!(listed[0].1.version, 2, "{kind}");
            assert!(store.delete_document("Greet").await.expect("delete"));
            assert!(!store.delete_document("Greet").await.expect("delete"));
            assert!(
                store
                    .get_document_version("Greet", 1)
                    .await
                    .expect("v1")
                    .is_none()
            );
        }
    }
}
