//! Bodies of the parameter store's routes, and the rules for names, values and references.
//!
//! | route | body | answer |
//! |---|---|---|
//! | `PUT /v1/params/{name}` | [`PutParam`] | [`Param`] (the new version; never the value of a secure one) |
//! | `GET /v1/params` | | `[Param]` by name (values of plain ones only) |
//! | `GET /v1/params/{name}` | | [`Param`] (value of a plain one only) |
//! | `DELETE /v1/params/{name}` | | 204 |
//!
//! A name holding `/` goes percent-encoded in the path (`a%2Fb`). Scripts reference a parameter as
//! `{{param:NAME}}` (or SSM's `{{ssm:NAME}}` / `{{ssm-secure:NAME}}`); the server substitutes it only
//! in the `Run` frame it delivers to a node.

use serde::{Deserialize, Serialize};

/// Longest parameter name (SSM's).
pub const PARAM_NAME_MAX: usize = 1011;
/// Largest parameter value in bytes (SSM's standard tier).
pub const PARAM_VALUE_MAX: usize = 4096;

/// Body of `PUT /v1/params/{name}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutParam {
    /// The value (at most [`PARAM_VALUE_MAX`] bytes).
    pub value: String,
    /// Encrypt it at rest and never show it back (in listings, audit records or output).
    #[serde(default)]
    pub secure: bool,
}

/// A stored parameter.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Param {
    /// Name.
    pub name: String,
    /// Whether it is a secure (encrypted, never shown) parameter.
    pub secure: bool,
    /// The value of a plain parameter; None for a secure one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// 1 for the first value, one more for each put.
    pub version: u64,
    /// When the value was last put (RFC 3339).
    pub updated_at: String,
    /// Who put it.
    pub updated_by: String,
}

/// Why a parameter name is refused; None when it is valid: 1 to [`PARAM_NAME_MAX`] of
/// `A-Z a-z 0-9 _ . - /` (SSM's set).
pub fn name_error(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("parameter name is empty".into());
    }
    if name.len() > PARAM_NAME_MAX {
        return Some(format!(
            "parameter name is longer than {PARAM_NAME_MAX} characters"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.-/".contains(*c)))
    {
        return Some(format!(
            "parameter name {name:?} holds {c:?}: use letters, digits and _ . - /"
        ));
    }
    None
}

/// A `{{param:NAME}}` reference in a script: its byte range and the name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamRef<'a> {
    /// Byte range of the whole `{{...}}`.
    pub range: std::ops::Range<usize>,
    /// The parameter's name.
    pub name: &'a str,
}

/// Every parameter reference in `script`, in order: `{{param:NAME}}`, `{{ssm:NAME}}` or
/// `{{ssm-secure:NAME}}`, spaces allowed inside the braces. Anything else in braces is left alone.
pub fn references(script: &str) -> Vec<ParamRef<'_>> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = script[i..].find("{{") {
        let start = i + off;
        let Some(len) = script[start + 2..].find("}}") else {
            break;
        };
        let inner = script[start + 2..start + 2 + len].trim();
        let end = start + 2 + len + 2;
        let name = ["param:", "ssm:", "ssm-secure:"]
            .iter()
            .find_map(|p| inner.strip_prefix(p))
            .map(str::trim);
        match name {
            Some(name) if name_error(name).is_none() => {
                out.push(ParamRef {
                    range: start..end,
                    name,
                });
                i = end;
            }
            _ => i = start + 2,
        }
    }
    out
}

/// `script` with every reference replaced by `value(name)`; None if a name has no value.
pub fn substitute(script: &str, mut value: impl FnMut(&str) -> Option<String>) -> Option<String> {
    let mut out = String::with_capacity(script.len());
    let mut at = 0;
    for r in references(script) {
        out.push_str(&script[at..r.range.start]);
        out.push_str(&value(r.name)?);
        at = r.range.end;
    }
    out.push_str(&script[at..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_ssm_rules() {
        assert!(name_error("db_pass").is_none());
        assert!(name_error("/prod/db.pass-1").is_none());
        assert!(name_error("").is_some());
        assert!(name_error("a b").is_some());
        assert!(name_error(&"x".repeat(PARAM_NAME_MAX)).is_none());
        assert!(name_error(&"x".repeat(PARAM_NAME_MAX + 1)).is_some());
    }

    #[test]
    fn references_and_substitution() {
        let s = "a {{param:x}} {{ ssm:/p/q }} {{ssm-secure:y}} {{ doc }} {{param:bad name}} {{z";
        let names: Vec<&str> = references(s).iter().map(|r| r.name).collect();
        assert_eq!(names, ["x", "/p/q", "y"]);
        let out = substitute(s, |n| Some(n.to_uppercase())).unwrap();
        assert_eq!(out, "a X /P/Q Y {{ doc }} {{param:bad name}} {{z");
        assert!(substitute(s, |n| (n != "y").then(String::new)).is_none());
        // A value is not itself scanned for references.
        assert_eq!(
            substitute("{{param:a}}", |_| Some("{{param:b}}".into())).unwrap(),
            "{{param:b}}"
        );
    }
}
