//! Where the server keeps its objects (output segments, session recordings, files): a directory
//! under the data dir by default, or a bucket of any S3-compatible store through `object_store`'s
//! S3 backend. Opened and probed at start (a write, a read back, a delete), so a wrong endpoint,
//! bucket or credential stops the server with an error naming it instead of failing the first
//! command that has output to keep. [`api`] serves the objects kept for users (`/v1/objects`).

pub mod api;
pub mod buckets;
pub mod export;

use anyhow::Context;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Where objects go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ObjectStoreConfig {
    /// `DATA_DIR/objects` (the default).
    #[default]
    Local,
    /// A bucket of an S3-compatible store.
    S3(S3Config),
}

/// An S3-compatible bucket. Unset fields come from the usual AWS variables (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`, ...), then from
/// the instance's role on EC2.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Config {
    /// The bucket.
    pub bucket: String,
    /// A key prefix every object goes under (no leading or trailing `/`); empty for none.
    pub prefix: String,
    /// The store's URL, for stores other than AWS (`http://127.0.0.1:9000`).
    pub endpoint: Option<String>,
    /// The region (`us-east-1` when neither this nor `AWS_REGION` says).
    pub region: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`), as most self-hosted stores need.
    pub path_style: bool,
    /// Allow a plain `http://` endpoint.
    pub allow_http: bool,
    /// Credentials, when not from the environment.
    pub access_key_id: Option<String>,
    /// The secret of `access_key_id`.
    pub secret_access_key: Option<String>,
}

impl std::fmt::Debug for S3Config {
    // The secret never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("allow_http", &self.allow_http)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<set>"),
            )
            .finish()
    }
}

impl S3Config {
    /// Parses `s3://bucket[/prefix]` (the other fields left unset).
    pub fn from_url(url: &str) -> Result<S3Config, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{url:?} is not an s3://bucket[/prefix] URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // S3's bucket rules: 3 to 63 lowercase letters, digits, dots and hyphens.
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !bucket_ok {
            return Err(format!(
                "bad bucket {bucket:?} in {url:?} (3 to 63 lowercase letters, digits, dots and hyphens)"
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..")
            || prefix.contains("//")
            || prefix.len() > 512
        {
            return Err(format!("bad key prefix {prefix:?} in {url:?}"));
        }
        Ok(S3Config {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            ..S3Config::default()
        })
    }

    /// `s3://bucket/prefix`, for logs and errors.
    pub fn url(&self) -> String {
        match self.prefix.as_str() {
            "" => format!("s3://{}", self.bucket),
            p => format!("s3://{}/{p}", self.bucket),
        }
    }
}

/// How long one request to a remote store may take, and how long its retries may go on: a store
/// that is down fails the work that needs it within this, never hangs it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_TIMEOUT: Duration = Duration::from_secs(60);
/// The start-up probe's bound (it includes finding credentials, e.g. from EC2's metadata).
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens the object store and checks it can be written, read and deleted. Answers the store and a
/// description for logs (the directory, or `s3://bucket/prefix at ENDPOINT`).
pub async fn open(
    config: &ObjectStoreConfig,
    data_dir: &Path,
) -> anyhow::Result<(Arc<dyn ObjectStore>, String)> {
    let (store, place): (Arc<dyn ObjectStore>, String) = match config {
        ObjectStoreConfig::Local => {
            let dir = data_dir.join("objects");
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let local = LocalFileSystem::new_with_prefix(&dir)
                .with_context(|| format!("cannot open object directory {}", dir.display()))?
                .with_automatic_cleanup(true);
            (Arc::new(local), dir.display().to_string())
        }
        ObjectStoreConfig::S3(s3) => {
            let place = match &s3.endpoint {
                Some(e) => format!("{} at {e}", s3.url()),
                None => s3.url(),
            };
            (
                open_s3(s3).with_context(|| format!("cannot open {place}"))?,
                place,
            )
        }
    };
    probe(store.as_ref())
        .await
        .with_context(|| format!("the object store {place} is not usable"))?;
    Ok((store, place))
}

fn open_s3(s3: &S3Config) -> anyhow::Result<Arc<dyn ObjectStore>> {
    let bucket = s3_builder(s3, true).build()?;
    Ok(match s3.prefix.as_str() {
        "" => Arc::new(bucket),
        p => Arc::new(PrefixStore::new(bucket, p)),
    })
}

/// A client of `s3.bucket` (its prefix not applied): the AWS environment, then `s3`'s settings
/// over it. `set_style`: path or virtual-hosted style as `s3.path_style` says (else as the
/// environment says, `AWS_VIRTUAL_HOSTED_STYLE_REQUEST`).
pub(crate) fn s3_builder(s3: &S3Config, set_style: bool) -> AmazonS3Builder {
    let mut b = AmazonS3Builder::from_env().with_bucket_name(&s3.bucket);
    if set_style {
        b = b.with_virtual_hosted_style_request(!s3.path_style);
    }
    b = b
        .with_retry(RetryConfig {
            max_retries: 4,
            retry_timeout: RETRY_TIMEOUT,
            ..RetryConfig::default()
        })
        .with_client_options(
            ClientOptions::new()
                .with_timeout(REQUEST_TIMEOUT)
                .with_connect_timeout(CONNECT_TIMEOUT),
        );
    if s3.allow_http {
        b = b.with_allow_http(true);
    }
    if let Some(e) = &s3.endpoint {
        b = b.with_endpoint(e);
    }
    if let Some(r) = &s3.region {
        b = b.with_region(r);
    }
    if let Some(k) = &s3.access_key_id {
        b = b.with_access_key_id(k);
    }
    if let Some(k) = &s3.secret_access_key {
        b = b.with_secret_access_key(k);
    }
    b
}

/// Writes, reads back and deletes a small object under `fleetrun-probe/`.
async fn probe(store: &dyn ObjectStore) -> anyhow::Result<()> {
    let key = ObjectPath::from(format!("fleetrun-probe/{}", uuid::Uuid::new_v4()));
    let body = b"fleetrun object store probe";
    let work = async {
        store
            .put(&key, PutPayload::from_static(body))
            .await
            .context("a test write failed")?;
        let back = store
            .get(&key)
            .await
            .context("reading the test write back failed")?
            .bytes()
            .await
            .context("reading the test write back failed")?;
        anyhow::ensure!(
            back.as_ref() == body,
            "the test write read back as different bytes"
        );
        store
            .delete(&key)
            .await
            .context("deleting the test write failed")?;
        Ok(())
    };
    tokio::time::timeout(PROBE_TIMEOUT, work)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no answer within {} s (is the endpoint right, and are credentials set: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY?)",
                PROBE_TIMEOUT.as_secs()
            )
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls_name_a_bucket_and_a_prefix() {
        let c = S3Config::from_url("s3://fleet-out/prod/eu/").unwrap();
        assert_eq!(
            (c.bucket.as_str(), c.prefix.as_str()),
            ("fleet-out", "prod/eu")
        );
        assert_eq!(c.url(), "s3://fleet-out/prod/eu");
        assert_eq!(S3Config::from_url("s3://abc").unwrap().prefix, "");
        for bad in [
            "http://x/y",
            "s3://",
            "s3://UPPER",
            "s3://ab",
            "s3://a_b/c",
            "s3://abc/x/../y",
            "s3://abc/x//y",
        ] {
            assert!(S3Config::from_url(bad).is_err(), "{bad}");
        }
        let secret = S3Config {
            secret_access_key: Some("hunter2".into()),
            ..c
        };
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}

/// Why [`write_streamed`] stored nothing.
#[derive(Debug)]
pub enum WriteError<E> {
    /// The source of the bytes failed.
    Source(E),
    /// More than the limit arrived.
    TooLarge,
    /// The object store did not take them.
    Store(object_store::Error),
}

/// Streams `chunks` into a multipart upload at `path`, at most `max` bytes: their size and
/// SHA-256 (lowercase hex). At most one part is in flight while the next fills, so an upload holds
/// about two parts of memory whatever its size. A failure aborts the upload: nothing (and no
/// replacement of an earlier object at `path`) is left half written.
pub async fn write_streamed<E>(
    objects: &dyn ObjectStore,
    path: &ObjectPath,
    mut chunks: impl futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    max: u64,
) -> Result<(u64, String), WriteError<E>> {
    use futures_util::StreamExt;
    use sha2::{Digest, Sha256};
    let multipart = objects
        .put_multipart(path)
        .await
        .map_err(WriteError::Store)?;
    let mut writer = object_store::WriteMultipart::new_with_chunk_size(multipart, PART_BYTES);
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let failed = loop {
        let chunk = match chunks.next().await {
            None => break None,
            Some(Ok(c)) => c,
            Some(Err(e)) => break Some(WriteError::Source(e)),
        };
        size += chunk.len() as u64;
        if size > max {
            break Some(WriteError::TooLarge);
        }
        hasher.update(&chunk);
        if let Err(e) = writer.wait_for_capacity(1).await {
            break Some(WriteError::Store(e));
        }
        writer.write(&chunk);
    };
    if let Some(e) = failed {
        if let Err(abort) = writer.abort().await {
            tracing::warn!(%path, "cannot abort an object upload: {abort}");
        }
        return Err(e);
    }
    writer.finish().await.map_err(WriteError::Store)?;
    Ok((size, hex::encode(hasher.finalize())))
}

/// Bytes buffered before a part is sent: an upload's memory (one part filling, one in flight).
const PART_BYTES: usize = 8 * 1024 * 1024;
