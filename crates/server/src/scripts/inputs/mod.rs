//! A saved script's input, made ready once per run: an object of the store is used where it lies;
//! an `https://` URL is fetched by the server, and an `s3://bucket/key` of another bucket read
//! (in ranges of [`S3_RANGE`] bytes, through the bucket clients output to S3 uses, only from a
//! bucket of `allowed_buckets`), streamed into the object store (never whole in memory) while its
//! size and SHA-256 are measured, so every node of the run gets the same bytes from one fetch.
//!
//! The fetch is a request the server makes on a user's behalf, so it is fenced: `https://` only
//! (redirects too, at most [`REDIRECTS_MAX`]), no user info, names resolved by a resolver that
//! refuses link-local, unspecified, multicast and broadcast addresses (a cloud's metadata service
//! lives at 169.254.169.254), a connect timeout, a timeout without bytes, a whole-fetch timeout
//! and a size limit.

use crate::errors::{Code, Error};
use crate::objects::WriteError;
use crate::objects::buckets::Buckets;
use fleetrun_store::Store;
use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

/// Redirects one fetch follows.
pub const REDIRECTS_MAX: usize = 5;
/// Bytes of an `s3://` input read per request (each request is bounded in time; a whole
/// object in one would not be).
pub const S3_RANGE: u64 = 8 * 1024 * 1024;

/// An input ready for a run: where its bytes are in the object store, their size and SHA-256.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Staged {
    /// The object holding the bytes.
    pub path: ObjectPath,
    /// Their size.
    pub size: u64,
    /// Their SHA-256, lowercase hex.
    pub sha256: String,
}

/// How long and how much a fetch may take.
#[derive(Clone, Copy, Debug)]
pub struct FetchLimits {
    /// To connect (name lookup and TLS included).
    pub connect: Duration,
    /// Without a byte.
    pub idle: Duration,
    /// For the whole fetch, body included.
    pub total: Duration,
    /// Largest input.
    pub max_bytes: u64,
}

impl Default for FetchLimits {
    fn default() -> Self {
        FetchLimits {
            connect: Duration::from_secs(10),
            idle: Duration::from_secs(30),
            total: Duration::from_secs(3600),
            max_bytes: crate::objects::api::OBJECT_MAX,
        }
    }
}

/// Fetches `https://` inputs. One per server: its connections are pooled.
pub struct Fetcher {
    client: reqwest::Client,
    max_bytes: u64,
    /// The bucket clients (shared with output to S3) and the buckets allowed.
    buckets: std::sync::Arc<Buckets>,
}

impl Fetcher {
    /// A fetcher trusting the system's roots and, when given, the CA certificates (PEM) in
    /// `extra_ca` (for an internal artifact server); `s3://` inputs through `buckets`.
    pub fn new(
        extra_ca: Option<&Path>,
        limits: FetchLimits,
        buckets: std::sync::Arc<Buckets>,
    ) -> anyhow::Result<Fetcher> {
        use anyhow::Context;
        let mut builder = reqwest::Client::builder()
            .https_only(true)
            .connect_timeout(limits.connect)
            .read_timeout(limits.idle)
            .timeout(limits.total)
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                if attempt.previous().len() >= REDIRECTS_MAX {
                    attempt.error(format!("more than {REDIRECTS_MAX} redirects"))
                } else if attempt.url().scheme() != "https" {
                    let to = attempt.url().to_string();
                    attempt.error(format!("a redirect to {to}, which is not https"))
                } else if let Err(why) = literal_allowed(attempt.url()) {
                    attempt.error(why)
                } else {
                    attempt.follow()
                }
            }))
            .dns_resolver(std::sync::Arc::new(FencedResolver))
            .user_agent(concat!("fleetrun/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = extra_ca {
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read the input CA file {}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("{} holds no PEM CA certificate", path.display()))?;
            anyhow::ensure!(
                !certs.is_empty(),
                "{} holds no PEM CA certificate",
                path.display()
            );
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder
            .build()
            .context("cannot make the HTTPS client for script inputs")?;
        Ok(Fetcher {
            client,
            max_bytes: limits.max_bytes,
            buckets,
        })
    }

    /// Reads `s3://bucket/key` (of a bucket other than the server's own store, and allowed) into
    /// `dest`: its size and SHA-256. Nothing is left at `dest` when it fails.
    pub async fn fetch_s3_into(
        &self,
        uri: &str,
        objects: &dyn ObjectStore,
        dest: &ObjectPath,
    ) -> Result<Staged, Error> {
        use futures_util::StreamExt;
        use object_store::{GetOptions, GetRange, ObjectStoreExt};
        let unavailable = |why: String| {
            Error::new(
                Code::ScriptInputUnavailable,
                format!("cannot read the input {uri}: {why}"),
            )
        };
        let rest = uri.strip_prefix("s3://").unwrap_or(uri);
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        self.buckets
            .check_allowed(bucket, "read an input from")
            .map_err(|m| Error::new(Code::AccessDenied, m))?;
        if let Some((own, prefix)) = &self.buckets.own
            && own == bucket
            && (prefix.is_empty() || key == prefix || key.starts_with(&format!("{prefix}/")))
        {
            // Its objects are read with their keys, under the objects' own authorization.
            return Err(Error::new(
                Code::InvalidScript,
                format!(
                    "the input {uri} is inside this server's own store: name the object's key (as `fleetrun objects ls` shows it)"
                ),
            ));
        }
        let path = ObjectPath::parse(key).map_err(|e| unavailable(format!("bad key: {e}")))?;
        let client = self.buckets.client(bucket, "").map_err(unavailable)?;
        let why = |e: object_store::Error| match e {
            object_store::Error::NotFound { .. } => {
                "no such key in the bucket (or no such bucket)".to_owned()
            }
            e => e.to_string(),
        };
        let head = client.head(&path).await.map_err(|e| unavailable(why(e)))?;
        if head.size > self.max_bytes {
            return Err(unavailable(format!(
                "it is {} bytes, over the limit of {}",
                head.size, self.max_bytes
            )));
        }
        // One range at a time, each read only if the object is still the one first seen.
        let size = head.size;
        let etag = head.e_tag.clone();
        let ranges = futures_util::stream::iter((0..size.div_ceil(S3_RANGE)).map(|i| {
            let start = i * S3_RANGE;
            start..(start + S3_RANGE).min(size)
        }))
        .then(move |r| {
            let (client, path, etag) = (client.clone(), path.clone(), etag.clone());
            async move {
                let opts = GetOptions {
                    range: Some(GetRange::Bounded(r)),
                    if_match: etag,
                    ..GetOptions::default()
                };
                client.get_opts(&path, opts).await?.bytes().await
            }
        });
        let written =
            crate::objects::write_streamed(objects, dest, Box::pin(ranges), self.max_bytes).await;
        let (got, sha256) = written.map_err(|e| match e {
            WriteError::Source(object_store::Error::Precondition { .. }) => {
                unavailable("the object changed while it was read".into())
            }
            WriteError::Source(e) => unavailable(why(e)),
            WriteError::TooLarge => {
                unavailable(format!("it is over the limit of {} bytes", self.max_bytes))
            }
            WriteError::Store(e) => {
                tracing::error!(%dest, "cannot store a script input: {e}");
                Error::new(
                    Code::Unavailable,
                    "the object store did not take the script's input; try again",
                )
            }
        })?;
        if got != size {
            let _ = objects.delete(dest).await;
            return Err(unavailable(format!(
                "read {got} bytes of the {size} the bucket listed"
            )));
        }
        Ok(Staged {
            path: dest.clone(),
            size,
            sha256,
        })
    }

    /// Fetches `url` into `dest`: its size and SHA-256. Nothing is left at `dest` when it fails.
    pub async fn fetch_into(
        &self,
        url: &str,
        objects: &dyn ObjectStore,
        dest: &ObjectPath,
    ) -> Result<Staged, Error> {
        let unavailable = |why: String| {
            Error::new(
                Code::ScriptInputUnavailable,
                format!("cannot fetch the input {url}: {why}"),
            )
        };
        let parsed = reqwest::Url::parse(url).map_err(|e| unavailable(e.to_string()))?;
        if parsed.scheme() != "https"
            || !parsed.username().is_empty()
            || parsed.password().is_some()
        {
            return Err(unavailable("only https:// URLs without user info".into()));
        }
        literal_allowed(&parsed).map_err(unavailable)?;
        let resp = self
            .client
            .get(parsed)
            .send()
            .await
            .map_err(|e| unavailable(reqwest_why(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(unavailable(format!("the server answered {status}")));
        }
        if let Some(n) = resp.content_length().filter(|&n| n > self.max_bytes) {
            return Err(unavailable(format!(
                "it is {n} bytes, over the limit of {}",
                self.max_bytes
            )));
        }
        let body = resp.bytes_stream();
        let written = crate::objects::write_streamed(objects, dest, body, self.max_bytes).await;
        let (size, sha256) = written.map_err(|e| match e {
            WriteError::Source(e) => unavailable(reqwest_why(&e)),
            WriteError::TooLarge => {
                unavailable(format!("it is over the limit of {} bytes", self.max_bytes))
            }
            WriteError::Store(e) => {
                tracing::error!(%dest, "cannot store a script input: {e}");
                Error::new(
                    Code::Unavailable,
                    "the object store did not take the script's input; try again",
                )
            }
        })?;
        Ok(Staged {
            path: dest.clone(),
            size,
            sha256,
        })
    }
}

/// A reqwest error with its causes (its own text alone says little: "error sending request").
fn reqwest_why(e: &reqwest::Error) -> String {
    let mut why = if e.is_timeout() {
        "timed out".to_owned()
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        why.push_str(": ");
        why.push_str(&s.to_string());
        source = s.source();
    }
    why
}

/// Makes `uri` (a script's input) ready for a run: an object key is used where it lies; an
/// `https://` URL is fetched into `dest`, an `s3://bucket/key` read into it.
pub async fn stage(
    uri: &str,
    store: &Store,
    objects: &dyn ObjectStore,
    fetcher: &Fetcher,
    dest: &ObjectPath,
) -> Result<Staged, Error> {
    fleetrun_proto::api::check_script_input(uri).map_err(|e| Error::new(Code::InvalidScript, e))?;
    if uri.starts_with("https://") {
        return fetcher.fetch_into(uri, objects, dest).await;
    }
    if uri.starts_with("s3://") {
        return fetcher.fetch_s3_into(uri, objects, dest).await;
    }
    let row = store.get_object(uri).await?.ok_or_else(|| {
        Error::new(
            Code::ScriptInputUnavailable,
            format!("the input {uri}: no such object (put it with `fleetrun objects put`)"),
        )
    })?;
    Ok(Staged {
        path: crate::objects::api::object_path(uri),
        size: row.size,
        sha256: row.sha256,
    })
}

/// An address written in a URL is not looked up (so [`FencedResolver`] never sees it): it is
/// judged here.
fn literal_allowed(url: &reqwest::Url) -> Result<(), String> {
    let host = url.host_str().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let Ok(ip) = host.parse::<IpAddr>() else {
        return Ok(());
    };
    if reachable(ip) {
        Ok(())
    } else {
        Err(format!(
            "{ip} is an address a script input may not come from (link-local, unspecified, multicast or broadcast)"
        ))
    }
}

/// Resolves names as the system does, then drops the addresses a fetch must never reach; a name
/// left with none is an error naming it.
struct FencedResolver;

impl reqwest::dns::Resolve for FencedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| reachable(a.ip()))
                .collect();
            if allowed.is_empty() {
                let why = if found.is_empty() {
                    format!("{host} has no address")
                } else {
                    format!(
                        "{host} resolves only to addresses a script input may not come from (link-local, unspecified, multicast or broadcast)"
                    )
                };
                return Err(why.into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// Whether a fetch may connect to `ip`. Loopback and private addresses are allowed (artifact
/// servers are often internal); link-local ones are not (cloud metadata services live there).
fn reachable(ip: IpAddr) -> bool {
    // An IPv4 address written as IPv6 is judged as IPv4.
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_link_local() || v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast())
        }
        IpAddr::V6(v6) => {
            // AWS's IPv6 metadata service sits in unique-local space.
            const AWS_METADATA: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
            !(v6.is_unicast_link_local()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6 == AWS_METADATA)
        }
    }
}

#[cfg(test)]
mod tests;
