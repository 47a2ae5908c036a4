//! Target expressions (which nodes a command goes to) and rate-control values (`N` or `N%`).
//!
//! A target expression is one or more whitespace-separated terms, all of which must hold (AND):
//! - `all`: every registered node;
//! - `tag:KEY=VALUE[,VALUE...]`: the node has tag KEY with one of the values (OR within one term);
//! - `tag-key:KEY[,KEY...]`: the node has one of these tag keys, whatever the value;
//! - `id:NODE_ID[,NODE_ID...]`: the node is one of these.

use crate::ids::NodeId;
use serde::{Deserialize, Serialize};
use std::fmt;

/// One term of a target expression.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetTerm {
    /// Every node.
    All,
    /// The node has tag `key` with one of `values`.
    Tag {
        /// Tag key.
        key: String,
        /// Accepted values (at least one).
        values: Vec<String>,
    },
    /// The node has one of these tag keys.
    TagKey(Vec<String>),
    /// The node is one of these.
    Ids(Vec<NodeId>),
}

/// A parsed target expression: every term must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetExpr(pub Vec<TargetTerm>);

/// A target expression or rate value that did not parse; the message names what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// Longest tag key or value accepted (SSM's: keys 128, values 256).
pub const TAG_KEY_MAX: usize = 128;
/// Longest tag value accepted.
pub const TAG_VALUE_MAX: usize = 256;
/// Longest target expression accepted, in bytes (room for SSM's 5 targets of 50 instance ids).
pub const TARGET_EXPR_MAX: usize = 8 * 1024;
/// Most terms in one target expression (SSM allows 5 `Targets`).
pub const TARGET_TERMS_MAX: usize = 10;
/// Most values (tag values, tag keys or node ids) in one term (SSM's 50 values per target).
pub const TARGET_VALUES_MAX: usize = 50;

/// `s` for an error message: whole when short, else its first characters and its length (a 10 KB
/// key is not echoed back whole).
pub fn shown(s: &str) -> String {
    const SHOWN: usize = 40;
    if s.chars().count() <= SHOWN {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(SHOWN).collect();
        format!("{head:?}... ({} bytes)", s.len())
    }
}

/// Checks a tag key: 1..=128 characters, no `=`, `,` or whitespace (so expressions stay unambiguous).
pub fn check_tag_key(key: &str) -> Result<(), ParseError> {
    if key.is_empty() || key.len() > TAG_KEY_MAX {
        return Err(ParseError(format!(
            "tag key {} must be 1 to {TAG_KEY_MAX} characters",
            shown(key)
        )));
    }
    if key
        .chars()
        .any(|c| c == '=' || c == ',' || c.is_whitespace() || c.is_control())
    {
        return Err(ParseError(format!(
            "tag key {key:?} must not contain '=', ',', whitespace or control characters"
        )));
    }
    Ok(())
}

/// Checks a tag value: at most 256 characters, no `,`, whitespace or control characters.
pub fn check_tag_value(value: &str) -> Result<(), ParseError> {
    if value.len() > TAG_VALUE_MAX {
        return Err(ParseError(format!(
            "tag value {} is longer than {TAG_VALUE_MAX} characters",
            shown(value)
        )));
    }
    if value
        .chars()
        .any(|c| c == ',' || c.is_whitespace() || c.is_control())
    {
        return Err(ParseError(format!(
            "tag value {value:?} must not contain ',', whitespace or control characters"
        )));
    }
    Ok(())
}

/// Parses `KEY=VALUE` as given to `--tag`.
pub fn parse_tag(s: &str) -> Result<(String, String), ParseError> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| ParseError(format!("tag {s:?} must be KEY=VALUE")))?;
    check_tag_key(k)?;
    check_tag_value(v)?;
    Ok((k.to_owned(), v.to_owned()))
}

impl TargetExpr {
    /// Parses an expression such as `tag:env=prod tag-key:web` or `all`.
    /// Within [`TARGET_EXPR_MAX`] bytes, [`TARGET_TERMS_MAX`] terms and [`TARGET_VALUES_MAX`] values
    /// per term; the sizes are checked before anything is split or allocated per term.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        check_expr_len(s.len())?;
        let mut terms = Vec::new();
        for t in s.split_whitespace() {
            if terms.len() == TARGET_TERMS_MAX {
                return Err(too_many_terms());
            }
            terms.push(parse_term(t)?);
        }
        if terms.is_empty() {
            return Err(ParseError("empty target expression: use `all`, `tag:KEY=VALUE`, `tag-key:KEY` or `id:NODE_ID`".into()));
        }
        Ok(TargetExpr(terms))
    }

    /// Checks the caps [`TargetExpr::parse`] enforces on an expression built another way (the SSM
    /// API builds one from `Targets`): terms, values per term and the length of its text.
    pub fn check_limits(&self) -> Result<(), ParseError> {
        if self.0.len() > TARGET_TERMS_MAX {
            return Err(too_many_terms());
        }
        for term in &self.0 {
            let n = match term {
                TargetTerm::All => 0,
                TargetTerm::Tag { values, .. } => values.len(),
                TargetTerm::TagKey(keys) => keys.len(),
                TargetTerm::Ids(ids) => ids.len(),
            };
            if n > TARGET_VALUES_MAX {
                return Err(too_many_values(n));
            }
        }
        check_expr_len(self.to_string().len())
    }
}

fn check_expr_len(len: usize) -> Result<(), ParseError> {
    if len > TARGET_EXPR_MAX {
        return Err(ParseError(format!(
            "the target expression is {len} bytes; the limit is {TARGET_EXPR_MAX}"
        )));
    }
    Ok(())
}

fn too_many_terms() -> ParseError {
    ParseError(format!(
        "the target expression has more than {TARGET_TERMS_MAX} terms; the limit is {TARGET_TERMS_MAX}"
    ))
}

fn too_many_values(n: usize) -> ParseError {
    ParseError(format!(
        "a target term has {n} values; the limit is {TARGET_VALUES_MAX} per term"
    ))
}

/// Splits a term's comma-separated list, refusing more than [`TARGET_VALUES_MAX`] items.
fn split_values(list: &str) -> Result<Vec<&str>, ParseError> {
    let n = list.split(',').count();
    if n > TARGET_VALUES_MAX {
        return Err(too_many_values(n));
    }
    Ok(list.split(',').collect())
}

fn parse_term(t: &str) -> Result<TargetTerm, ParseError> {
    if t == "all" {
        return Ok(TargetTerm::All);
    }
    if let Some(rest) = t.strip_prefix("tag:") {
        let (key, values) = rest
            .split_once('=')
            .ok_or_else(|| ParseError(format!("target term {t:?} must be tag:KEY=VALUE")))?;
        check_tag_key(key)?;
        let values: Vec<String> = split_values(values)?
            .into_iter()
            .map(str::to_owned)
            .collect();
        if values.iter().any(|v| v.is_empty()) {
            return Err(ParseError(format!("target term {t:?} has an empty value")));
        }
        for v in &values {
            check_tag_value(v)?;
        }
        return Ok(TargetTerm::Tag {
            key: key.to_owned(),
            values,
        });
    }
    if let Some(keys) = t.strip_prefix("tag-key:") {
        let keys: Vec<String> = split_values(keys)?.into_iter().map(str::to_owned).collect();
        for k in &keys {
            check_tag_key(k)?;
        }
        return Ok(TargetTerm::TagKey(keys));
    }
    if let Some(ids) = t.strip_prefix("id:") {
        let ids = split_values(ids)?
            .into_iter()
            .map(|s| s.parse::<NodeId>().map_err(|e| ParseError(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(TargetTerm::Ids(ids));
    }
    Err(ParseError(format!(
        "unknown target term {t:?}: use `all`, `tag:KEY=VALUE[,VALUE]`, `tag-key:KEY[,KEY]` or `id:NODE_ID[,NODE_ID]`"
    )))
}

impl fmt::Display for TargetExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, term) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            match term {
                TargetTerm::All => f.write_str("all")?,
                TargetTerm::Tag { key, values } => write!(f, "tag:{key}={}", values.join(","))?,
                TargetTerm::TagKey(keys) => write!(f, "tag-key:{}", keys.join(","))?,
                TargetTerm::Ids(ids) => {
                    let ids: Vec<&str> = ids.iter().map(NodeId::as_str).collect();
                    write!(f, "id:{}", ids.join(","))?
                }
            }
        }
        Ok(())
    }
}

/// A rate-control value: an absolute count or a percentage of the targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    /// At most this many.
    Count(u64),
    /// At most this percentage of the target count.
    Percent(u8),
}

impl Rate {
    /// SSM's default max concurrency: 50.
    pub const DEFAULT_CONCURRENCY: Rate = Rate::Count(50);
    /// SSM's default max errors: 0.
    pub const DEFAULT_ERRORS: Rate = Rate::Count(0);

    /// Parses `max-concurrency` (`N` >= 1 or `1%`..`100%`, SSM's pattern).
    pub fn parse_concurrency(s: &str) -> Result<Self, ParseError> {
        let r = Self::parse(s, "max-concurrency")?;
        match r {
            Rate::Count(0) | Rate::Percent(0) => Err(ParseError(format!(
                "max-concurrency {s:?} must be at least 1 or 1%"
            ))),
            r => Ok(r),
        }
    }
    /// Parses `max-errors` (`N` >= 0 or `0%`..`100%`, SSM's pattern).
    pub fn parse_errors(s: &str) -> Result<Self, ParseError> {
        Self::parse(s, "max-errors")
    }
    fn parse(s: &str, what: &str) -> Result<Self, ParseError> {
        let bad = || {
            ParseError(format!(
                "{what} {s:?} must be a whole number (e.g. 10) or a percentage from 0% to 100% (e.g. 25%)"
            ))
        };
        let digits_ok = |d: &str| {
            !d.is_empty()
                && d.bytes().all(|b| b.is_ascii_digit())
                && !(d.len() > 1 && d.starts_with('0'))
        };
        if let Some(p) = s.strip_suffix('%') {
            if !digits_ok(p) {
                return Err(bad());
            }
            let p: u8 = p.parse().map_err(|_| bad())?;
            if p > 100 {
                return Err(bad());
            }
            Ok(Rate::Percent(p))
        } else {
            if !digits_ok(s) {
                return Err(bad());
            }
            Ok(Rate::Count(s.parse().map_err(|_| bad())?))
        }
    }
    /// The absolute limit for `targets` nodes. Percentages round up and a non-zero percentage is at
    /// least 1 (as SSM: 10% of 5 nodes is 1).
    pub fn resolve(self, targets: u64) -> u64 {
        match self {
            Rate::Count(n) => n,
            Rate::Percent(p) => (targets * u64::from(p)).div_ceil(100),
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::Count(n) => write!(f, "{n}"),
            Rate::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_terms() {
        let e = TargetExpr::parse("tag:env=prod,stage  tag-key:web all").unwrap();
        assert_eq!(
            e.0,
            vec![
                TargetTerm::Tag {
                    key: "env".into(),
                    values: vec!["prod".into(), "stage".into()]
                },
                TargetTerm::TagKey(vec!["web".into()]),
                TargetTerm::All
            ]
        );
        assert_eq!(e.to_string(), "tag:env=prod,stage tag-key:web all");
    }

    #[test]
    fn rejects_bad_expressions_with_a_reason() {
        for (bad, needle) in [
            ("", "empty"),
            ("tag:env", "tag:KEY=VALUE"),
            ("tag:=x", "tag key"),
            ("tag:env=", "empty value"),
            ("color:red", "unknown target term"),
            ("id:mi-123", "invalid node id"),
        ] {
            let err = TargetExpr::parse(bad).unwrap_err().0;
            assert!(err.contains(needle), "{bad:?} -> {err}");
        }
    }

    #[test]
    fn sizes_are_capped_with_the_limit_named() {
        let id = |n: usize| format!("mi-{n:017x}");
        let many_terms = ["tag:k=v"; TARGET_TERMS_MAX + 1].join(" ");
        let err = TargetExpr::parse(&many_terms).unwrap_err().0;
        assert!(
            err.contains(&format!("limit is {TARGET_TERMS_MAX}")),
            "{err}"
        );
        assert!(TargetExpr::parse(&["tag:k=v"; TARGET_TERMS_MAX].join(" ")).is_ok());

        let values: Vec<String> = (0..=TARGET_VALUES_MAX).map(|n| n.to_string()).collect();
        let err = TargetExpr::parse(&format!("tag:k={}", values.join(",")))
            .unwrap_err()
            .0;
        assert!(
            err.contains(&format!("limit is {TARGET_VALUES_MAX} per term")),
            "{err}"
        );
        let ids: Vec<String> = (0..=TARGET_VALUES_MAX).map(id).collect();
        let err = TargetExpr::parse(&format!("id:{}", ids.join(",")))
            .unwrap_err()
            .0;
        assert!(err.contains("per term"), "{err}");
        let ok_ids: Vec<String> = (0..TARGET_VALUES_MAX).map(id).collect();
        assert!(TargetExpr::parse(&format!("id:{}", ok_ids.join(","))).is_ok());

        let huge = "all ".repeat(250_000);
        let err = TargetExpr::parse(&huge).unwrap_err().0;
        assert!(
            err.contains(&format!("the limit is {TARGET_EXPR_MAX}")),
            "{err}"
        );

        let built = TargetExpr(vec![TargetTerm::All; TARGET_TERMS_MAX + 1]);
        assert!(built.check_limits().unwrap_err().0.contains("terms"));
        let built = TargetExpr(vec![TargetTerm::TagKey(vec!["k".into(); 51])]);
        assert!(built.check_limits().unwrap_err().0.contains("per term"));
        let long = "v".repeat(TAG_VALUE_MAX);
        let built = TargetExpr(vec![
            TargetTerm::Tag {
                key: "k".into(),
                values: vec![long; TARGET_VALUES_MAX]
            };
            5
        ]);
        assert!(built.check_limits().unwrap_err().0.contains("bytes"));
    }

    #[test]
    fn rates() {
        assert_eq!(Rate::parse_concurrency("50").unwrap(), Rate::Count(50));
        assert_eq!(Rate::parse_concurrency("10%").unwrap(), Rate::Percent(10));
        assert!(Rate::parse_concurrency("0").is_err());
        assert!(Rate::parse_concurrency("0%").is_err());
        assert!(Rate::parse_concurrency("101%").is_err());
        assert!(Rate::parse_concurrency("-1").is_err());
        assert!(Rate::parse_concurrency("05").is_err());
        assert!(Rate::parse_concurrency("x%").is_err());
        assert_eq!(Rate::parse_errors("0").unwrap(), Rate::Count(0));
        assert_eq!(Rate::parse_errors("0%").unwrap(), Rate::Percent(0));
        assert_eq!(Rate::Percent(10).resolve(5), 1);
        assert_eq!(Rate::Percent(50).resolve(5), 3);
        assert_eq!(Rate::Percent(0).resolve(5), 0);
        assert_eq!(Rate::Count(7).resolve(5), 7);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// Fragments that make expressions of every kind, valid and not, short and long.
        fn fragment() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("all".to_owned()),
                Just("tag:".to_owned()),
                Just("tag-key:".to_owned()),
                Just("id:".to_owned()),
                Just("mi-0123456789abcdef0".to_owned()),
                Just("env=prod".to_owned()),
                Just(",".to_owned()),
                Just("=".to_owned()),
                Just(" ".to_owned()),
                Just("\t".to_owned()),
                (1usize..400).prop_map(|n| "v".repeat(n)),
                (1usize..60).prop_map(|n| vec!["x"; n].join(",")),
                any::<String>(),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Any text: no panic; what is accepted respects every cap and round-trips.
            #[test]
            fn parse_never_panics_and_accepted_round_trips(
                parts in proptest::collection::vec(fragment(), 0..40),
                repeat in 1usize..300,
            ) {
                let text = parts.concat().repeat(repeat);
                if let Ok(expr) = TargetExpr::parse(&text) {
                    prop_assert!(text.len() <= TARGET_EXPR_MAX);
                    prop_assert!(expr.0.len() <= TARGET_TERMS_MAX);
                    prop_assert!(expr.check_limits().is_ok());
                    let shown = expr.to_string();
                    prop_assert!(shown.len() <= TARGET_EXPR_MAX);
                    prop_assert_eq!(TargetExpr::parse(&shown), Ok(expr));
                }
            }

            /// Well-formed tag terms are accepted exactly while within the caps.
            #[test]
            fn well_formed_terms_are_accepted_within_the_caps(
                terms in 1usize..14,
                values in 1usize..60,
                len in 1usize..40,
            ) {
                let term = format!("tag:k={}", vec!["v".repeat(len); values].join(","));
                let text = vec![term; terms].join(" ");
                let fits = terms <= TARGET_TERMS_MAX
                    && values <= TARGET_VALUES_MAX
                    && text.len() <= TARGET_EXPR_MAX;
                prop_assert_eq!(TargetExpr::parse(&text).is_ok(), fits, "{}", text.len());
            }
        }
    }
}
