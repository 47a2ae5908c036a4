//! Documents and their versions. Versions are numbered from 1; a document's versions are created
//! and its latest/default pointers moved in one transaction each.

use super::{Result, Store};
use fleetrun_proto::time::now_ms;
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
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

fn document_row(r: &SqliteRow) -> DocumentRow {
    DocumentRow {
        name: r.get("name"),
        document_type: r.get("document_type"),
        document_format: r.get("document_format"),
        owner: r.get("owner"),
        default_version: r.get("default_version"),
        latest_version: r.get("latest_version"),
        created_at: r.get("created_at"),
        tags: super::tags::parse_tags(r.get("tags")),
    }
}

fn version_row(r: &SqliteRow) -> VersionRow {
    VersionRow {
        version: r.get("version"),
        version_name: r.get("version_name"),
        content: r.get("content"),
        hash: r.get("hash"),
        schema_version: r.get("schema_version"),
        description: r.get("description"),
        created_at: r.get("v_created_at"),
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

impl Store {
    /// Stores a new document with its version 1.
    pub async fn insert_document(&self, doc: &DocumentRow, v: &VersionRow) -> Result<Created> {
        let mut tx = self.sqlite()?.write.begin().await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM documents WHERE name = ?")
            .bind(&doc.name)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Ok(Created::Exists);
        }
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM documents")
            .fetch_one(&mut *tx)
            .await?;
        if n >= DOCUMENTS_MAX {
            return Ok(Created::LimitExceeded);
        }
        sqlx::query(
            "INSERT INTO documents (name, document_type, document_format, owner, default_version,
                 latest_version, created_at, tags) VALUES (?, ?, ?, ?, 1, 1, ?, ?)",
        )
        .bind(&doc.name)
        .bind(&doc.document_type)
        .bind(&doc.document_format)
        .bind(&doc.owner)
        .bind(doc.created_at)
        .bind(serde_json::to_string(&doc.tags)?)
        .execute(&mut *tx)
        .await?;
        insert_version(&mut tx, &doc.name, 1, v).await?;
        tx.commit().await?;
        Ok(Created::Ok)
    }

    /// Adds a version after `expected_latest` (None: after whatever is latest).
    pub async fn add_document_version(
        &self,
        name: &str,
        expected_latest: Option<i64>,
        v: &VersionRow,
    ) -> Result<Added> {
        let mut tx = self.sqlite()?.write.begin().await?;
        let latest: Option<i64> =
            sqlx::query_scalar("SELECT latest_version FROM documents WHERE name = ?")
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
            "SELECT version FROM document_versions WHERE name = ? AND hash = ? LIMIT 1",
        )
        .bind(name)
        .bind(&v.hash)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(d) = dup {
            return Ok(Added::Duplicate(d));
        }
        if let Some(label) = &v.version_name {
            let taken: Option<i64> = sqlx::query_scalar(
                "SELECT 1 FROM document_versions WHERE name = ? AND version_name = ?",
            )
            .bind(name)
            .bind(label)
            .fetch_optional(&mut *tx)
            .await?;
            if taken.is_some() {
                return Ok(Added::DuplicateVersionName);
            }
        }
        if latest >= VERSIONS_MAX {
            return Ok(Added::LimitExceeded);
        }
        let version = latest + 1;
        insert_version(&mut tx, name, version, v).await?;
        sqlx::query("UPDATE documents SET latest_version = ? WHERE name = ?")
            .bind(version)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Added::Ok(version))
    }

    /// One document.
    pub async fn get_document(&self, name: &str) -> Result<Option<DocumentRow>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            doc_columns!(),
            " FROM documents d WHERE d.name = ?"
        ))
        .bind(name)
        .fetch_optional(&self.sqlite()?.read)
        .await?;
        Ok(row.as_ref().map(document_row))
    }

    /// One version of a document, by number.
    pub async fn get_document_version(
        &self,
        name: &str,
        version: i64,
    ) -> Result<Option<VersionRow>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            version_columns!(),
            " FROM document_versions v WHERE v.name = ? AND v.version = ?"
        ))
        .bind(name)
        .bind(version)
        .fetch_optional(&self.sqlite()?.read)
        .await?;
        Ok(row.as_ref().map(version_row))
    }

    /// Up to `limit` versions of a document numbered above `after`, oldest first (a page of
    /// ListDocumentVersions: versions are numbered 1, 2, ... with no gaps).
    pub async fn document_versions(
        &self,
        name: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<VersionRow>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            version_columns!(),
            " FROM document_versions v WHERE v.name = ? AND v.version > ? ORDER BY v.version LIMIT ?"
        ))
        .bind(name)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.sqlite()?.read)
        .await?;
        Ok(rows.iter().map(version_row).collect())
    }

    /// The number of a version by its label.
    pub async fn document_version_by_name(&self, name: &str, label: &str) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT version FROM document_versions WHERE name = ? AND version_name = ?",
        )
        .bind(name)
        .bind(label)
        .fetch_optional(&self.sqlite()?.read)
        .await?)
    }

    /// Every document with its default version, by name.
    pub async fn list_documents(&self) -> Result<Vec<(DocumentRow, VersionRow)>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            doc_columns!(),
            ", ",
            version_columns!(),
            " FROM documents d JOIN document_versions v ON v.name = d.name AND v.version = d.default_version",
            " ORDER BY d.name"
        ))
        .fetch_all(&self.sqlite()?.read)
        .await?;
        Ok(rows
            .iter()
            .map(|r| (document_row(r), version_row(r)))
            .collect())
    }

    /// Deletes a document and all its versions; false when there was none.
    pub async fn delete_document(&self, name: &str) -> Result<bool> {
        let mut tx = self.sqlite()?.write.begin().await?;
        sqlx::query("DELETE FROM document_versions WHERE name = ?")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let r = sqlx::query("DELETE FROM documents WHERE name = ?")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    /// Makes an existing version the default; false when the document or version does not exist.
    pub async fn set_default_document_version(&self, name: &str, version: i64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE documents SET default_version = ? WHERE name = ?
               AND EXISTS (SELECT 1 FROM document_versions WHERE name = ? AND version = ?)",
        )
        .bind(version)
        .bind(name)
        .bind(name)
        .bind(version)
        .execute(&self.sqlite()?.write)
        .await?;
        Ok(r.rows_affected() > 0)
    }
}

async fn insert_version(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    name: &str,
    version: i64,
    v: &VersionRow,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO document_versions (name, version, version_name, content, hash, schema_version,
             description, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(name)
    .bind(version)
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
    .execute(&mut **tx)
    .await?;
    Ok(())
}
