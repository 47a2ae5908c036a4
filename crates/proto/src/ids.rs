//! Identifiers: node ids in SSM's managed-instance form, command ids as UUIDs.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A managed node's id: `mi-` followed by 17 lowercase hex digits, as SSM's managed instances.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

/// A command's id: a lowercase hyphenated UUID (36 characters), as SSM's.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CommandId(String);

/// An id that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Not `mi-` + 17 lowercase hex digits.
    #[error("invalid node id {0:?}: expected `mi-` followed by 17 lowercase hex digits")]
    Node(String),
    /// Not a hyphenated UUID.
    #[error("invalid command id {0:?}: expected a UUID like 0b5c1a8e-9d0f-4a6e-8f3e-2c1d0e9f8a7b")]
    Command(String),
}

impl NodeId {
    /// Builds a node id from 17 hex digits' worth of randomness (the low 68 bits of `random`).
    pub fn from_random(random: u128) -> Self {
        let hex = format!("{:017x}", random & ((1u128 << 68) - 1));
        NodeId(format!("mi-{hex}"))
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl CommandId {
    /// Builds a command id from 128 random bits, formatted as a version-4 UUID.
    pub fn from_random(random: u128) -> Self {
        let b = (random & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
        let h = format!("{b:032x}");
        CommandId(format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        ))
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for NodeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let ok = s.len() == 20
            && s.starts_with("mi-")
            && s[3..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(NodeId(s.to_owned()))
        } else {
            Err(IdError::Node(s.to_owned()))
        }
    }
}

impl FromStr for CommandId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let b = s.as_bytes();
        let ok = b.len() == 36
            && b.iter().enumerate().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => *c == b'-',
                _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
            });
        if ok {
            Ok(CommandId(s.to_owned()))
        } else {
            Err(IdError::Command(s.to_owned()))
        }
    }
}

macro_rules! string_conversions {
    ($t:ty) => {
        impl TryFrom<String> for $t {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                s.parse()
            }
        }
        impl From<$t> for String {
            fn from(id: $t) -> String {
                id.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
string_conversions!(NodeId);
string_conversions!(CommandId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_round_trip_and_reject_bad_forms() {
        let id = NodeId::from_random(u128::MAX);
        assert_eq!(id.as_str(), "mi-fffffffffffffffff");
        assert_eq!(id.as_str().parse::<NodeId>(), Ok(id.clone()));
        for bad in [
            "",
            "mi-",
            "i-0123456789abcdef0",
            "mi-0123456789ABCDEF0",
            "mi-0123456789abcdef",
            "mi-0123456789abcdef01",
        ] {
            assert!(bad.parse::<NodeId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn command_ids_are_uuid_v4_shaped() {
        let id = CommandId::from_random(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert_eq!(id.as_str().len(), 36);
        assert_eq!(&id.as_str()[14..15], "4");
        assert_eq!(id.as_str().parse::<CommandId>(), Ok(id.clone()));
        assert!("not-a-uuid".parse::<CommandId>().is_err());
        assert!(
            "0123456789abcdef0123456789abcdef0123"
                .parse::<CommandId>()
                .is_err()
        );
    }
}
