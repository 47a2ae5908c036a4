//! The S3 buckets other than the server's own store that it reads and writes for users: output
//! to S3 (SSM's `OutputS3BucketName`, [`super::export`]) writes to them, `s3://bucket/key` script
//! inputs ([`crate::scripts::inputs`]) are read from them. One client per bucket and region,
//! built from the server's S3 settings (endpoint, region, credentials, path style, plain HTTP)
//! or, without any, from the AWS environment, and cached.
//!
//! Which buckets may be reached at all is the server's setting `allowed_buckets` (flag
//! `--allowed-buckets`): names or `*` globs, besides the server's own store's bucket (outside
//! the store's prefix), the only one reached without the setting: anyone who may send a command must not make the server write
//! to, or read from, any bucket its credentials reach.

use super::{ObjectStoreConfig, S3Config, s3_builder};
use object_store::ObjectStore;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// Bucket clients kept (one per bucket and region); past it the cache starts over.
pub const CLIENTS_MAX: usize = 64;
/// Most patterns in `allowed_buckets`.
pub const ALLOWED_MAX: usize = 256;

/// The bucket clients and the buckets allowed.
pub struct Buckets {
    /// The server's own bucket and prefix, if its objects are in S3.
    pub(crate) own: Option<(String, String)>,
    pub(crate) template: S3Config,
    /// Whether `template` is the server's own S3 settings (else the AWS environment's alone).
    pub(crate) configured: bool,
    /// The endpoint object URLs name (`None`: AWS).
    pub(crate) endpoint: Option<String>,
    /// The region when neither the request nor the settings name one.
    pub(crate) region: String,
    /// `allowed_buckets`: `None` when not set.
    allowed: Option<Vec<String>>,
    clients: Mutex<HashMap<(String, String), Arc<dyn ObjectStore>>>,
}

/// Checks the patterns of `allowed_buckets`: bucket names, with `*` for any run of characters.
pub fn check_allowed_patterns(patterns: &[String]) -> Result<(), String> {
    if patterns.len() > ALLOWED_MAX {
        return Err(format!(
            "allowed_buckets has {} patterns: at most {ALLOWED_MAX}",
            patterns.len()
        ));
    }
    for p in patterns {
        let ok = (1..=63).contains(&p.len())
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.*".contains(&b));
        if !ok {
            return Err(format!(
                "bad allowed_buckets pattern {p:?}: a bucket name of a-z 0-9 . - with * for any characters"
            ));
        }
    }
    Ok(())
}

/// Whether `name` matches `pattern` (`*`: any run of characters, none included).
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    // Iterative, with one backtrack point: linear in practice, no recursion on hostile input.
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if p < pattern.len() && pattern[p] == name[n] {
            p += 1;
            n += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

impl Buckets {
    /// The clients for a server whose own objects go where `config` says; `allowed`: the
    /// `allowed_buckets` setting (checked with [`check_allowed_patterns`]), `None` when unset.
    pub fn new(config: &ObjectStoreConfig, allowed: Option<Vec<String>>) -> Self {
        let (template, configured) = match config {
            ObjectStoreConfig::S3(s3) => (
                S3Config {
                    bucket: String::new(),
                    prefix: String::new(),
                    ..s3.clone()
                },
                true,
            ),
            ObjectStoreConfig::Local => (S3Config::default(), false),
        };
        let own = match config {
            ObjectStoreConfig::S3(s3) => Some((s3.bucket.clone(), s3.prefix.clone())),
            ObjectStoreConfig::Local => None,
        };
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let endpoint = template
            .endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .map(|e| e.trim_end_matches('/').to_owned());
        let region = template
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".into());
        Buckets {
            own,
            template,
            configured,
            endpoint,
            region,
            allowed,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the server may reach `bucket` for a user (`what`: "write output to" or "read an
    /// input from"); the error names the setting.
    pub fn check_allowed(&self, bucket: &str, what: &str) -> Result<(), String> {
        // The own store's bucket always (its own prefix is guarded where it matters).
        let allowed = self.own.as_ref().is_some_and(|(own, _)| own == bucket)
            || self.allowed.as_ref().is_some_and(|patterns| {
                patterns
                    .iter()
                    .any(|p| glob(p.as_bytes(), bucket.as_bytes()))
            });
        if allowed {
            return Ok(());
        }
        Err(match &self.allowed {
            Some(_) => format!(
                "this server may not {what} bucket {bucket}: it is not in the server's allowed_buckets (--allowed-buckets)"
            ),
            None => format!(
                "this server may not {what} bucket {bucket}: only its own store's bucket is allowed until the server's allowed_buckets (--allowed-buckets) names others"
            ),
        })
    }

    /// The region to use: `region`, else the settings', else the environment's, else us-east-1.
    pub fn region<'a>(&'a self, region: &'a str) -> &'a str {
        if region.is_empty() {
            &self.region
        } else {
            region
        }
    }

    /// The endpoint object URLs name (`None`: AWS).
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// The client of `bucket` in `region` (empty: the default), built once, then cached.
    pub fn client(&self, bucket: &str, region: &str) -> Result<Arc<dyn ObjectStore>, String> {
        let key = (bucket.to_owned(), region.to_owned());
        if let Some(c) = self.clients.lock().get(&key) {
            return Ok(c.clone());
        }
        let mut config = S3Config {
            bucket: bucket.to_owned(),
            ..self.template.clone()
        };
        if !region.is_empty() {
            config.region = Some(region.to_owned());
        }
        let client: Arc<dyn ObjectStore> = Arc::new(
            s3_builder(&config, self.configured)
                .build()
                .map_err(|e| format!("cannot make a client for bucket {bucket}: {e}"))?,
        );
        let mut clients = self.clients.lock();
        if clients.len() >= CLIENTS_MAX {
            clients.clear();
        }
        clients.insert(key, client.clone());
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_names() {
        for (p, n, ok) in [
            ("ir-results", "ir-results", true),
            ("ir-results", "ir-results2", false),
            ("ir-*", "ir-results", true),
            ("ir-*", "ir-", true),
            ("ir-*", "xir-a", false),
            ("*-out", "ssm-out", true),
            ("*", "anything", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            (
                "a*a*a*a*b",
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                false,
            ),
        ] {
            assert_eq!(glob(p.as_bytes(), n.as_bytes()), ok, "{p} {n}");
        }
    }

    #[test]
    fn only_allowed_buckets_are_reached_and_the_error_names_the_setting() {
        let local = Buckets::new(&ObjectStoreConfig::Local, None);
        let e = local
            .check_allowed("ssm-out", "write output to")
            .unwrap_err();
        assert!(e.contains("allowed_buckets (--allowed-buckets)"), "{e}");
        let own = Buckets::new(
            &ObjectStoreConfig::S3(S3Config {
                bucket: "fleet".into(),
                prefix: "prod".into(),
                ..S3Config::default()
            }),
            None,
        );
        assert!(own.check_allowed("fleet", "read an input from").is_ok());
        assert!(own.check_allowed("other", "read an input from").is_err());
        let listed = Buckets::new(
            &ObjectStoreConfig::Local,
            Some(vec!["ir-*".into(), "ssm-out".into()]),
        );
        assert!(listed.check_allowed("ir-2026", "write output to").is_ok());
        assert!(listed.check_allowed("ssm-out", "write output to").is_ok());
        let own_listed = Buckets::new(
            &ObjectStoreConfig::S3(S3Config {
                bucket: "fleet".into(),
                ..S3Config::default()
            }),
            Some(vec!["ir-*".into()]),
        );
        assert!(own_listed.check_allowed("fleet", "write output to").is_ok());
        assert!(own_listed.check_allowed("ir-1", "write output to").is_ok());
        assert!(own_listed.check_allowed("x", "write output to").is_err());
        let e = listed
            .check_allowed("secrets", "read an input from")
            .unwrap_err();
        assert!(e.contains("not in the server's allowed_buckets"), "{e}");
        assert!(check_allowed_patterns(&["ir-*".into(), "a.b".into()]).is_ok());
        assert!(check_allowed_patterns(&["Bad".into()]).is_err());
        assert!(check_allowed_patterns(&["".into()]).is_err());
        assert!(check_allowed_patterns(&vec!["a".into(); ALLOWED_MAX + 1]).is_err());
    }
}
