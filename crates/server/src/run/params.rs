//! The parameter store's server side: sealing secure values, checking a script's `{{param:NAME}}`
//! references when a command is sent, and substituting them when its `Run` frame is built.
//!
//! A value is substituted only into the `Run` frame handed to the node's connection, read at that
//! moment: a value put between send and delivery is the one the node gets. The stored command, its
//! listings, audit records and both APIs keep the placeholder. Nothing here logs a value or a
//! rendered script.
//!
//! Output served back (the output route, inline copies in listings, both APIs) has the secure values
//! its script references replaced by `****` ([`Masker`]).

use crate::AppState;
use crate::access::secrets::SecretBox;
use crate::errors::{Code, Error};
use fleetrun_proto::params::{references, substitute};
use fleetrun_store::{NewParam, ParamRow, Put, Store, StoreError, StoredValue};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// The stored form of a value: sealed when secure.
pub fn seal(secrets: &SecretBox, value: &str, secure: bool) -> StoredValue {
    if secure {
        let (nonce, sealed) = secrets.seal(value.as_bytes());
        StoredValue::Sealed(nonce, sealed)
    } else {
        StoredValue::Plain(value.to_owned())
    }
}

/// A parameter's value in clear; None when a sealed one cannot be opened (key changed, tampered).
pub fn open(secrets: &SecretBox, row: &ParamRow) -> Option<String> {
    match &row.value {
        StoredValue::Plain(v) => Some(v.clone()),
        StoredValue::Sealed(nonce, sealed) => secrets
            .open_sealed(nonce, sealed)
            .and_then(|v| String::from_utf8(v).ok()),
    }
}

/// A parameter's type, as SSM names them. A StringList is a plain value of comma-separated items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamType {
    /// Plain text.
    String,
    /// Plain comma-separated items.
    StringList,
    /// Sealed at rest, shown only to whom may use it.
    SecureString,
}

impl ParamType {
    /// A stored row's type.
    pub fn of(row: &ParamRow) -> Self {
        match (&row.value, row.list) {
            (StoredValue::Sealed(..), _) => ParamType::SecureString,
            (StoredValue::Plain(_), true) => ParamType::StringList,
            (StoredValue::Plain(_), false) => ParamType::String,
        }
    }

    /// SSM's name of it.
    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::String => "String",
            ParamType::StringList => "StringList",
            ParamType::SecureString => "SecureString",
        }
    }
}

/// Longest description of a parameter (SSM's).
pub const DESCRIPTION_MAX: usize = 1024;
/// Longest allowed pattern (SSM's).
pub const ALLOWED_PATTERN_MAX: usize = 1024;
/// Most memory a compiled allowed pattern may take: a pattern is the caller's, and every later put
/// of the parameter runs it.
const PATTERN_SIZE_MAX: usize = 1 << 20;

/// A put of a parameter, as either API asks it.
pub struct PutRequest<'a> {
    /// Name (checked here).
    pub name: &'a str,
    /// Value in clear (checked here).
    pub value: &'a str,
    /// Type.
    pub ty: ParamType,
    /// Description; None keeps the current one.
    pub description: Option<&'a str>,
    /// Allowed pattern; None keeps the current one, '' removes it.
    pub allowed_pattern: Option<&'a str>,
    /// Replace an existing parameter (else [`Code::ParameterAlreadyExists`]).
    pub overwrite: bool,
    /// Tags of a new parameter (checked by the caller).
    pub tags: &'a BTreeMap<String, String>,
}

/// What a put stored.
pub struct Stored {
    /// The value as stored (sealed when secure).
    pub value: StoredValue,
    /// Its version.
    pub version: i64,
    /// When (epoch ms).
    pub at: i64,
}

/// The one way a parameter is put, for both APIs: checks the name, value, description and pattern,
/// seals a secure value, and stores it as one version more. Answers the new version.
pub async fn put(state: &AppState, by: &str, req: PutRequest<'_>) -> Result<Stored, Error> {
    use fleetrun_proto::params::{PARAM_VALUE_MAX, name_error};
    if let Some(e) = name_error(req.name) {
        return Err(Error::new(Code::InvalidParameterName, e));
    }
    if req.value.is_empty() {
        return Err(Error::new(Code::InvalidParameterValue, "value is empty"));
    }
    if req.value.len() > PARAM_VALUE_MAX {
        return Err(Error::new(
            Code::ParameterValueTooLarge,
            format!(
                "value is {} bytes; the limit is {PARAM_VALUE_MAX}",
                req.value.len()
            ),
        ));
    }
    if req.value.contains('\0') {
        return Err(Error::new(
            Code::InvalidParameterValue,
            "value contains a NUL byte",
        ));
    }
    if let Some(d) = req.description
        && d.chars().count() > DESCRIPTION_MAX
    {
        return Err(Error::new(
            Code::Validation,
            format!("description is longer than {DESCRIPTION_MAX} characters"),
        ));
    }
    if let Some(p) = req.allowed_pattern {
        compile_pattern(p)?;
    }
    let stored = seal(
        &state.secret_box,
        req.value,
        req.ty == ParamType::SecureString,
    );
    let at = fleetrun_proto::time::now_ms();
    let new = NewParam {
        name: req.name,
        value: &stored,
        list: req.ty == ParamType::StringList,
        description: req.description,
        allowed_pattern: req.allowed_pattern,
        overwrite: req.overwrite,
        at,
        by,
        tags: req.tags,
    };
    let value = req.value;
    // A stored pattern compiled when it was put; one that no longer compiles matches nothing.
    let matches = |pattern: &str| compile_pattern(pattern).is_ok_and(|rx| rx.is_match(value));
    match state.store.put_param(&new, matches).await? {
        Put::Ok(version) => Ok(Stored {
            value: stored,
            version,
            at,
        }),
        Put::LimitExceeded => Err(Error::new(
            Code::ParameterLimitExceeded,
            format!(
                "there are {} parameters already; delete some first",
                fleetrun_store::PARAMS_MAX
            ),
        )),
        Put::Exists => Err(Error::new(
            Code::ParameterAlreadyExists,
            format!(
                "The parameter {} already exists; to replace its value, overwrite it",
                req.name
            ),
        )),
        Put::PatternMismatch(pattern) => Err(Error::new(
            Code::ParameterPatternMismatch,
            format!(
                "Parameter value failed to satisfy constraint specified in allowed pattern: {pattern}"
            ),
        )),
    }
}

/// An allowed pattern, compiled with bounded size.
fn compile_pattern(pattern: &str) -> Result<regex::Regex, Error> {
    if pattern.chars().count() > ALLOWED_PATTERN_MAX {
        return Err(Error::new(
            Code::InvalidAllowedPattern,
            format!("the allowed pattern is longer than {ALLOWED_PATTERN_MAX} characters"),
        ));
    }
    regex::RegexBuilder::new(pattern)
        .size_limit(PATTERN_SIZE_MAX)
        .build()
        .map_err(|e| {
            Error::new(
                Code::InvalidAllowedPattern,
                format!(
                    "the allowed pattern is not a valid regular expression: {}",
                    one_line(&e.to_string())
                ),
            )
        })
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
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
    store: &Store,
    secrets: &SecretBox,
    script: &'a str,
) -> Result<std::borrow::Cow<'a, str>, RenderError> {
    let names: BTreeSet<&str> = references(script).iter().map(|r| r.name).collect();
    if names.is_empty() {
        return Ok(std::borrow::Cow::Borrowed(script));
    }
    let names: Vec<&str> = names.into_iter().collect();
    let rows = store.get_params(&names).await?;
    let values: HashMap<&str, String> = rows
        .iter()
        .filter_map(|r| open(secrets, r).map(|v| (r.name.as_str(), v)))
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

/// Hides secure values in output served back: every occurrence of one becomes `****` (longest value
/// first where they overlap). Only values that are secure and referenced by the command's script are
/// masked, with their values of now: a value rotated since the command ran is not recognised.
pub struct Masker {
    secrets: Vec<Vec<u8>>,
    max_len: usize,
}

/// What a secure value is replaced with.
pub const MASK: &[u8] = b"****";

impl Masker {
    /// A masker for these values; None when there is nothing to hide.
    pub fn new(mut secrets: Vec<Vec<u8>>) -> Option<Self> {
        secrets.retain(|s| !s.is_empty());
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        let max_len = secrets.first()?.len();
        Some(Masker { secrets, max_len })
    }

    /// Length of the (longest) secret starting at `buf[i]`.
    fn match_at(&self, buf: &[u8], i: usize) -> Option<usize> {
        self.secrets
            .iter()
            .find(|s| buf[i..].starts_with(s))
            .map(Vec::len)
    }

    /// Masks `buf` from its start, deciding every position before `upto`; returns where it stopped
    /// (past `upto` when a match ran beyond it).
    fn scan(&self, buf: &[u8], upto: usize, out: &mut Vec<u8>) -> usize {
        let mut i = 0;
        let mut plain = 0;
        while i < upto {
            match self.match_at(buf, i) {
                Some(len) => {
                    out.extend_from_slice(&buf[plain..i]);
                    out.extend_from_slice(MASK);
                    i += len;
                    plain = i;
                }
                None => i += 1,
            }
        }
        out.extend_from_slice(&buf[plain..i.min(buf.len())]);
        i
    }

    /// A whole (bounded) text, masked.
    pub fn mask(&self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len());
        self.scan(data, data.len(), &mut out);
        out
    }

    /// A whole string, masked (still valid UTF-8: a match of a UTF-8 value starts and ends on
    /// character boundaries).
    pub fn mask_str(&self, s: &str) -> String {
        String::from_utf8_lossy(&self.mask(s.as_bytes())).into_owned()
    }
}

/// Masks a stream chunk by chunk. A value may straddle chunks, so the last `max_len - 1` bytes of
/// what it has seen are held back until the next chunk (or the end) decides them; nothing more is
/// buffered.
pub struct MaskStream {
    masker: Arc<Masker>,
    carry: Vec<u8>,
}

impl MaskStream {
    /// A stream masked by `masker`.
    pub fn new(masker: Arc<Masker>) -> Self {
        MaskStream {
            masker,
            carry: Vec::new(),
        }
    }

    /// The masked bytes that `chunk` lets out.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(chunk);
        // A match starting before `upto` ends within `buf`, so it is seen whole now.
        let upto = buf.len().saturating_sub(self.masker.max_len - 1);
        let mut out = Vec::with_capacity(upto + MASK.len());
        let at = self.masker.scan(&buf, upto, &mut out);
        self.carry = buf.get(at..).map(<[u8]>::to_vec).unwrap_or_default();
        out
    }

    /// The rest, at the end of the stream.
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.carry);
        self.masker.mask(&rest)
    }
}

/// The masker of a command's output: its script's secure parameters; None when it has none.
pub async fn masker_for(
    store: &Store,
    secrets: &SecretBox,
    cmd: &fleetrun_proto::CommandId,
) -> Result<Option<Arc<Masker>>, StoreError> {
    let Some(row) = store.command_row(cmd).await? else {
        return Ok(None);
    };
    let script = row.spec.commands.join("\n");
    let names: BTreeSet<&str> = references(&script).iter().map(|r| r.name).collect();
    if names.is_empty() {
        return Ok(None);
    }
    let names: Vec<&str> = names.into_iter().collect();
    let values = store
        .get_params(&names)
        .await?
        .iter()
        .filter(|r| matches!(r.value, StoredValue::Sealed(..)))
        .filter_map(|r| open(secrets, r))
        .map(String::into_bytes)
        .collect();
    Ok(Masker::new(values).map(Arc::new))
}

/// Masks the inline output copies of invocations (of any commands) in place.
pub async fn mask_invocations(
    store: &Store,
    secrets: &SecretBox,
    invs: &mut [fleetrun_proto::api::Invocation],
) -> Result<(), StoreError> {
    mask_each(store, secrets, invs, |i| i).await
}

/// [`mask_invocations`] of items that hold an invocation.
pub async fn mask_each<T>(
    store: &Store,
    secrets: &SecretBox,
    items: &mut [T],
    inv_of: fn(&mut T) -> &mut fleetrun_proto::api::Invocation,
) -> Result<(), StoreError> {
    let mut maskers: HashMap<fleetrun_proto::CommandId, Option<Arc<Masker>>> = HashMap::new();
    for item in items {
        let inv = inv_of(item);
        let m = match maskers.get(&inv.command_id) {
            Some(m) => m.clone(),
            None => {
                let m = masker_for(store, secrets, &inv.command_id).await?;
                maskers.insert(inv.command_id.clone(), m.clone());
                m
            }
        };
        if let Some(m) = m {
            inv.stdout = m.mask_str(&inv.stdout);
            inv.stderr = m.mask_str(&inv.stderr);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(secrets: &[&str]) -> Arc<Masker> {
        Arc::new(Masker::new(secrets.iter().map(|s| s.as_bytes().to_vec()).collect()).unwrap())
    }

    #[test]
    fn whole_text_masking_prefers_the_longest_value() {
        let m = masker(&["abc", "abcdef", "zz"]);
        assert_eq!(m.mask(b"xabcdefyabcz zzz"), b"x****y****z ****z");
        assert!(Masker::new(vec![Vec::new()]).is_none());
        assert_eq!(m.mask_str("é-abc-é"), "é-****-é");
    }

    #[test]
    fn streaming_matches_whole_text_however_the_chunks_fall() {
        let m = masker(&["s3cr3t-Value-42", "s3cr3t"]);
        let text = b"a s3cr3t-Value-42 b s3cr3t s3cr3t-Value-4 ss3cr3t-Value-42s3cr3t end";
        let want = m.mask(text);
        for size in 1..=text.len() {
            let mut s = MaskStream::new(m.clone());
            let mut got = Vec::new();
            for chunk in text.chunks(size) {
                got.extend(s.push(chunk));
            }
            got.extend(s.finish());
            assert_eq!(got, want, "chunks of {size}");
        }
        assert!(!String::from_utf8_lossy(&want).contains("s3cr3t"));
    }
}
