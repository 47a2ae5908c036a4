//! Tags of documents and parameters (a node's are in `nodes.rs`, with their index): a JSON object
//! per row, changed by compare and swap so two changes at once never lose one.

use super::{Result, Store, with_pool};
use std::collections::BTreeMap;

/// A kind of resource that carries tags here besides nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tagged {
    /// A document, by name.
    Document,
    /// A parameter, by name.
    Param,
}

impl Tagged {
    fn select(self) -> &'static str {
        match self {
            Tagged::Document => "SELECT tags FROM documents WHERE name = $1",
            Tagged::Param => "SELECT tags FROM params WHERE name = $1",
        }
    }

    fn swap(self) -> &'static str {
        match self {
            Tagged::Document => "UPDATE documents SET tags = $1 WHERE name = $2 AND tags = $3",
            Tagged::Param => "UPDATE params SET tags = $1 WHERE name = $2 AND tags = $3",
        }
    }
}

/// A stored tags column (`{}` when unreadable, which only a hand-edited database holds).
pub(crate) fn parse_tags(json: &str) -> BTreeMap<String, String> {
    serde_json::from_str(json).unwrap_or_default()
}

impl Store {
    /// The tags of a document or parameter; None when there is none of that name.
    pub async fn resource_tags(
        &self,
        kind: Tagged,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>> {
        let json: Option<String> = with_pool!(self, read, |pool| {
            sqlx::query_scalar(kind.select())
                .bind(name)
                .fetch_optional(pool)
                .await?
        });
        Ok(json.as_deref().map(parse_tags))
    }

    /// Replaces a document's or parameter's tags with `new` if they are still `old`; false when
    /// they changed meanwhile or the resource is gone.
    pub async fn swap_resource_tags(
        &self,
        kind: Tagged,
        name: &str,
        old: &BTreeMap<String, String>,
        new: &BTreeMap<String, String>,
    ) -> Result<bool> {
        let (new, old) = (serde_json::to_string(new)?, serde_json::to_string(old)?);
        let done = with_pool!(self, write, |pool| {
            sqlx::query(kind.swap())
                .bind(&new)
                .bind(name)
                .bind(&old)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done == 1)
    }
}
