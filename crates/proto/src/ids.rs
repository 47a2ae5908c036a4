//! Identifiers: node ids in SSM's managed-instance or EC2-instance form, command ids as UUIDs.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A node's id, as SSM names nodes: `mi-` followed by 17 lowercase hex digits for a managed
/// (hybrid) instance, the id the server hands out; or an EC2 instance's id, `i-` followed by 17
/// lowercase hex digits (or 8, EC2's older form, which SSM's pattern still admits), which an agent
/// on EC2 registers under.
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
    /// Neither `mi-` + 17 nor `i-` + 17 (or 8) lowercase hex digits.
    #[error(
        "invalid node id {0:?}: expected `mi-` followed by 17 lowercase hex digits, or an EC2 instance id (`i-` followed by 17 or 8)"
    )]
    Node(String),
    /// Not an EC2 instance id.
    #[error(
        "invalid EC2 instance id {0:?}: expected `i-` followed by 17 lowercase hex digits (or 8, the older form)"
    )]
    Instance(String),
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
    /// Whether this is an EC2 instance's id (`i-`), not one the server handed out (`mi-`).
    pub fn is_ec2(&self) -> bool {
        self.0.starts_with("i-")
    }
    /// An EC2 instance id (`i-` + 17 or 8 lowercase hex digits), and nothing else: what an agent
    /// may register under.
    pub fn ec2(s: &str) -> Result<Self, IdError> {
        match s.parse::<NodeId>() {
            Ok(id) if id.is_ec2() => Ok(id),
            _ => Err(IdError::Instance(s.to_owned())),
        }
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
        let hex = |h: &str| {
            h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let ok = match (s.strip_prefix("mi-"), s.strip_prefix("i-")) {
            (Some(h), _) => h.len() == 17 && hex(h),
            (None, Some(h)) => (h.len() == 17 || h.len() == 8) && hex(h),
            (None, None) => false,
        };
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
            "i-",
            "mi-0123456789ABCDEF0",
            "mi-0123456789abcdef",
            "mi-0123456789abcdef01",
            "i-0123456789ABCDEF0",
            "i-0123456789abcdef",
            "i-0123456789",
            "i-0123456789abcdef01",
            "mi-01234567",
            "x-0123456789abcdef0",
        ] {
            assert!(bad.parse::<NodeId>().is_err(), "{bad}");
            assert!(NodeId::ec2(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ec2_instance_ids_are_node_ids_of_their_own_kind() {
        for good in ["i-0123456789abcdef0", "i-0123abcd"] {
            let id: NodeId = good.parse().unwrap();
            assert!(id.is_ec2() && NodeId::ec2(good) == Ok(id.clone()), "{good}");
        }
        let managed = NodeId::from_random(7);
        assert!(!managed.is_ec2());
        let e = NodeId::ec2(managed.as_str()).unwrap_err().to_string();
        assert!(e.contains("EC2 instance id") && e.contains("`i-`"), "{e}");
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
