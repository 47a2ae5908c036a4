//! The parameter store's server side: sealing secure values, checking a script's `{{param:NAME}}`
//! references when a command is sent, and substituting them when its `Run` frame is built.
//!
//! A value is substituted only into the `Run` frame handed to the node's connection, read at that
//! moment: a value put between send and delivery is the one the node gets. The stored command, its
//! listings, audit records and both APIs keep the placeholder. Nothing here logs a value or a
//! rendered script.

use crate::AppState;
use crate::store::{ParamRow, StoreError, StoredValue};
use fleetrun_proto::params::{references, substitute};
use std::collections::{BTreeSet, HashMap};

/// The stored form of a value: sealed when secure.
pub fn seal(state: &AppState, value: &str, secure: bool) -> StoredValue {
    if secure {
        let (nonce, sealed) = state.secret_box.seal(value.as_bytes());
        StoredValue::Sealed(nonce, sealed)
    } else {
        StoredValue::Plain(value.to_owned())
    }
}

/// A parameter's value in clear; None when a sealed one cannot be opened (key changed, tampered).
pub fn open(state: &AppState, row: &ParamRow) -> Option<String> {
    match &row.value {
        StoredValue::Plain(v) => Some(v.clone()),
        StoredValue::Sealed(nonce, sealed) => state
            .secret_box
            .open_sealed(nonce, sealed)
            .and_then(|v| String::from_utf8(v).ok()),
    }
}

/// Why a script cannot be rendered.
#[derive(Debug)]
pub enum RenderError {
    /// These referenced parameters do not exist (or cannot be opened).
    Missing(Vec<String>),
    /// Storage failed.
    Store(StoreError),
}

impl From<StoreError> for RenderError {
    fn from(e: StoreError) -> Self {
        RenderError::Store(e)
    }
}

/// `script` with its parameter references replaced by their current values; the script itself
/// (borrowed, no copy) when it references none.
pub async fn render<'a>(
    state: &AppState,
    script: &'a str,
) -> Result<std::borrow::Cow<'a, str>, RenderError> {
    let names: BTreeSet<&str> = references(script).iter().map(|r| r.name).collect();
    if names.is_empty() {
        return Ok(std::borrow::Cow::Borrowed(script));
    }
    let names: Vec<&str> = names.into_iter().collect();
    let rows = state.store.get_params(&names).await?;
    let values: HashMap<&str, String> = rows
        .iter()
        .filter_map(|r| open(state, r).map(|v| (r.name.as_str(), v)))
        .collect();
    let missing: Vec<String> = names
        .iter()
        .filter(|n| !values.contains_key(*n))
        .map(|n| n.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(RenderError::Missing(missing));
    }
    substitute(script, |n| values.get(n).cloned())
        .map(std::borrow::Cow::Owned)
        .ok_or(RenderError::Missing(Vec::new()))
}
