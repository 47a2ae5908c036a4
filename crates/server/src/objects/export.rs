//! SSM's output to S3: a command sent with `OutputS3BucketName` (native: `output_s3_bucket`) has
//! each invocation's full stdout and stderr written to that bucket, at SSM's keys
//! `PREFIX/COMMAND/NODE/awsrunShellScript/0.awsrunShellScript/stdout` (and `stderr`).
//!
//! The queue is durable: an invocation's end queues its export in the same transaction
//! (`s3_exports`, see the store). One task drains it: it wakes when rows are added (the store's
//! notify, fired once the ended invocations' output is flushed) and when a failed row's retry is
//! due, runs at most [`CONCURRENCY`] uploads at once, streams each pipe from the output store
//! (never whole in memory: a multipart upload of [`PART_BYTES`] parts), and deletes the row only
//! after both pipes are written. A failed attempt keeps the row with its error (shown with the
//! invocation) and retries with a backoff from [`RETRY_MIN`] to [`RETRY_MAX`]; rows left at a
//! restart are taken up at start.

use crate::AppState;
use crate::objects::buckets::Buckets;
use crate::run::output::{pipe_prefix, read_stored};
use bytes::Bytes;
use fleetrun_proto::api::OutputS3;
use fleetrun_proto::channel::Pipe;
use fleetrun_proto::time::now_ms;
use fleetrun_proto::{CommandId, NodeId};
use fleetrun_store::ExportRow;
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// Uploads at once.
pub const CONCURRENCY: usize = 4;
/// Size of the parts of a multipart upload (S3's smallest but the last): with one part in flight,
/// an upload holds at most about two parts and a segment.
pub const PART_BYTES: usize = 5 * 1024 * 1024;
/// First retry delay after a failed export; it doubles per attempt up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// Longest time one upload attempt (both pipes) may take before it counts as failed.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3600);

/// Output to S3 over the shared bucket clients ([`Buckets`]).
pub struct Exports {
    buckets: Arc<Buckets>,
}

impl Exports {
    /// Exports through `buckets` (shared with script inputs).
    pub fn new(buckets: Arc<Buckets>) -> Self {
        Exports { buckets }
    }

    /// Refuses a bucket the server may not write to ([`Buckets::check_allowed`]).
    pub fn check_allowed(&self, t: &OutputS3) -> Result<(), String> {
        self.buckets.check_allowed(&t.bucket, "write output to")
    }

    /// Refuses a bucket and prefix where the server keeps its own objects: a sender could
    /// otherwise overwrite stored output, recordings or files with a command's output. (Output
    /// keys are `PREFIX/COMMAND_ID/...`: only the server's own prefix, or one under it, or any
    /// prefix when the server has none, can meet them.)
    pub fn check_not_own(&self, t: &OutputS3) -> Result<(), String> {
        let Some((bucket, prefix)) = &self.buckets.own else {
            return Ok(());
        };
        let given = t.prefix.trim_matches('/');
        let overlaps =
            prefix.is_empty() || given == prefix || given.starts_with(&format!("{prefix}/"));
        if t.bucket == *bucket && overlaps {
            return Err(match prefix.as_str() {
                "" => format!(
                    "bucket {bucket} is where this server keeps its own objects: give another bucket for the output"
                ),
                p => format!(
                    "s3://{bucket}/{p} is where this server keeps its own objects: give another bucket, or a prefix outside {p}/"
                ),
            });
        }
        Ok(())
    }

    /// The client of a command's bucket (built once, then cached).
    fn client(&self, t: &OutputS3) -> Result<Arc<dyn ObjectStore>, String> {
        self.buckets.client(&t.bucket, &t.region)
    }

    /// The URL of an output object, as SSM gives it (`https://s3.REGION.amazonaws.com/BUCKET/KEY`,
    /// or `ENDPOINT/BUCKET/KEY` for a store at another endpoint).
    pub fn url(&self, t: &OutputS3, key: &str) -> String {
        let key = encode_key(key);
        match self.buckets.endpoint() {
            Some(e) => format!("{e}/{}/{key}", t.bucket),
            None => format!(
                "https://s3.{}.amazonaws.com/{}/{key}",
                self.buckets.region(&t.region),
                t.bucket
            ),
        }
    }
}

/// The key of a pipe's output: `PREFIX/COMMAND/NODE/PLUGIN_DIR/stdout` (no prefix: from COMMAND).
pub fn key(t: &OutputS3, cmd: &CommandId, node: &NodeId, plugin_dir: &str, pipe: Pipe) -> String {
    let rest = format!("{cmd}/{node}/{plugin_dir}/{}", pipe.as_str());
    match t.prefix.trim_matches('/') {
        "" => rest,
        p => format!("{p}/{rest}"),
    }
}

/// SSM's plugin directory of a command's output, `awsrunShellScript/STEP`: the step is
/// `0.awsrunShellScript` for a schema 1.2 document, else the (first) step's name; characters
/// that are not letters, digits, `.`, `_` or `-` are dropped, as SSM drops `:`.
pub fn plugin_dir(schema_1_2: bool, first_step: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
            .collect()
    };
    let action = clean(fleetrun_proto::api::PLUGIN_RUN_SHELL_SCRIPT);
    let step = if schema_1_2 {
        format!("0.{action}")
    } else {
        clean(first_step)
    };
    format!("{action}/{step}")
}

/// Percent-encodes a key for a URL, `/` kept.
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The delay before attempt `attempts + 1` (after `attempts` failures).
fn backoff(attempts: u32) -> Duration {
    RETRY_MIN
        .saturating_mul(1u32 << attempts.min(16))
        .min(RETRY_MAX)
}

/// The exporter task: drains the queue until shutdown.
pub async fn run(state: Arc<AppState>) {
    let notify = state.store.exports_notify();
    let mut running: JoinSet<()> = JoinSet::new();
    let mut in_flight: HashMap<tokio::task::Id, (CommandId, NodeId)> = HashMap::new();
    // At start every queued row is due: a restart is the time to try again.
    let mut due_by = i64::MAX;
    loop {
        let now = now_ms();
        if in_flight.len() < CONCURRENCY {
            match state
                .store
                .due_exports(due_by.max(now), (CONCURRENCY * 2) as u32)
                .await
            {
                Ok(rows) => {
                    for row in rows {
                        let k = (row.command_id.clone(), row.node_id.clone());
                        if in_flight.len() >= CONCURRENCY || in_flight.values().any(|v| *v == k) {
                            continue;
                        }
                        let state = state.clone();
                        let handle = running.spawn(async move { attempt(&state, row).await });
                        in_flight.insert(handle.id(), k);
                    }
                }
                Err(e) => tracing::error!("cannot read the S3 export queue: {e}"),
            }
        }
        due_by = 0;
        // The next retry that is not due yet (due rows are running, or wait for a free slot).
        let next = match state.store.next_export_after(now).await {
            Ok(next) => next,
            Err(e) => {
                tracing::error!("cannot read the S3 export queue: {e}");
                Some(now + RETRY_MIN.as_millis() as i64)
            }
        };
        let sleep = async {
            match next {
                Some(at) => {
                    tokio::time::sleep(Duration::from_millis((at - now_ms()).max(0) as u64)).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = notify.notified() => {}
            () = sleep => {}
            Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                match done {
                    Ok((id, ())) => {
                        in_flight.remove(&id);
                    }
                    Err(e) => {
                        // A panicked attempt leaves its row queued, as a failed one does, and
                        // waits the longest retry (not at once again: it may panic again).
                        if let Some((cmd, node)) = in_flight.remove(&e.id()) {
                            tracing::error!(command_id = %cmd, node_id = %node, "the S3 export attempt failed: {e}");
                            let next = now_ms() + RETRY_MAX.as_millis() as i64;
                            let why = format!("the export attempt failed: {e}");
                            if let Err(e) = state.store.export_failed(&cmd, &node, &why, next).await {
                                tracing::error!(command_id = %cmd, node_id = %node, "cannot update the S3 export queue: {e}");
                            }
                        }
                    }
                }
            }
        }
    }
    running.abort_all();
}

/// One attempt at one row: on success the row goes, on failure it stays with the error and the
/// time of the next attempt.
async fn attempt(state: &AppState, row: ExportRow) {
    let (cmd, node) = (&row.command_id, &row.node_id);
    let result = match tokio::time::timeout(ATTEMPT_TIMEOUT, export(state, &row)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "the upload took longer than {} s",
            ATTEMPT_TIMEOUT.as_secs()
        )),
    };
    let stored = match result {
        Ok(()) => {
            tracing::info!(command_id = %cmd, node_id = %node, bucket = %row.target.bucket, "output written to S3");
            state.store.export_done(cmd, node).await
        }
        Err(e) => {
            let wait = backoff(row.attempts);
            tracing::warn!(
                command_id = %cmd, node_id = %node, bucket = %row.target.bucket,
                attempt = row.attempts + 1, retry_in_secs = wait.as_secs(),
                "cannot write output to S3: {e}"
            );
            let next = now_ms() + wait.as_millis() as i64;
            state.store.export_failed(cmd, node, &e, next).await
        }
    };
    if let Err(e) = stored {
        tracing::error!(command_id = %cmd, node_id = %node, "cannot update the S3 export queue: {e}");
    }
}

/// Writes both pipes. The stored lengths are read before and after: the last flush of an
/// invocation the server ended may land while it is written, and then it is written again.
async fn export(state: &AppState, row: &ExportRow) -> Result<(), String> {
    let (cmd, node) = (&row.command_id, &row.node_id);
    let client = state.exports.client(&row.target)?;
    let read = || async {
        state
            .store
            .invocation_output_state(cmd, node)
            .await
            .map_err(|e| format!("cannot read the invocation: {e}"))
    };
    for _ in 0..3 {
        // The invocation is gone (its command purged): nothing is left to write.
        let Some(before) = read().await? else {
            return Ok(());
        };
        let lengths = (before.stdout.0, before.stderr.0);
        for (pipe, (stored, inline)) in
            [(Pipe::Stdout, before.stdout), (Pipe::Stderr, before.stderr)]
        {
            let k = key(&row.target, cmd, node, &row.plugin_dir, pipe);
            let path = ObjectPath::parse(&k).map_err(|e| format!("bad key {k:?}: {e}"))?;
            upload(
                state,
                client.as_ref(),
                &path,
                cmd,
                node,
                pipe,
                stored,
                inline,
            )
            .await
            .map_err(|e| format!("s3://{}/{k}: {e}", row.target.bucket))?;
        }
        let after = read().await?;
        if after.is_none_or(|a| (a.stdout.0, a.stderr.0) == lengths) {
            return Ok(());
        }
    }
    Err("the output kept growing while it was written".into())
}

/// Writes one pipe's `stored` bytes: the inline copy in one put when it holds them all, else the
/// segments streamed into a multipart upload (one part in flight).
#[allow(clippy::too_many_arguments)]
async fn upload(
    state: &AppState,
    client: &dyn ObjectStore,
    path: &ObjectPath,
    cmd: &CommandId,
    node: &NodeId,
    pipe: Pipe,
    stored: u64,
    inline: Vec<u8>,
) -> Result<(), String> {
    if stored == inline.len() as u64 {
        client
            .put(path, PutPayload::from(Bytes::from(inline)))
            .await
            .map_err(|e| e.to_string())?;
        return Ok(());
    }
    let multipart = client
        .put_multipart(path)
        .await
        .map_err(|e| e.to_string())?;
    let mut w = WriteMultipart::new_with_chunk_size(multipart, PART_BYTES);
    let copied = async {
        let mut pos = 0u64;
        let mut segs = std::pin::pin!(read_stored(
            state.objects.clone(),
            pipe_prefix(cmd, node, pipe),
            0
        ));
        while pos < stored {
            let Some(seg) = segs.next().await else { break };
            let (off, data) = seg.map_err(|e| format!("cannot read the stored output: {e}"))?;
            if off > pos {
                return Err(format!("the stored output has a gap at byte {pos}"));
            }
            let skip = (pos - off) as usize;
            if skip < data.len() {
                let take = (data.len() - skip).min((stored - pos) as usize);
                w.put(data.slice(skip..skip + take));
                pos += take as u64;
            }
            w.wait_for_capacity(1).await.map_err(|e| e.to_string())?;
        }
        if pos < stored {
            return Err(format!(
                "the stored output is shorter ({pos} bytes) than recorded ({stored})"
            ));
        }
        Ok(())
    }
    .await;
    match copied {
        Ok(()) => w.finish().await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => {
            let _ = w.abort().await;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_urls_follow_ssm() {
        let cmd: CommandId = "0b6a1f0e-4c4b-4f5e-9a39-7f1d2a3b4c5d".parse().unwrap();
        let node = NodeId::from_random(5);
        let dir = plugin_dir(true, "aws:runShellScript");
        assert_eq!(dir, "awsrunShellScript/0.awsrunShellScript");
        assert_eq!(
            plugin_dir(false, "run:Me now"),
            "awsrunShellScript/runMenow"
        );
        let t = OutputS3 {
            bucket: "out".into(),
            prefix: "runs/daily".into(),
            region: String::new(),
        };
        assert_eq!(
            key(&t, &cmd, &node, &dir, Pipe::Stderr),
            format!("runs/daily/{cmd}/{node}/awsrunShellScript/0.awsrunShellScript/stderr")
        );
        let bare = OutputS3 {
            prefix: String::new(),
            region: "eu-west-1".into(),
            ..t.clone()
        };
        assert_eq!(
            key(&bare, &cmd, &node, &dir, Pipe::Stdout),
            format!("{cmd}/{node}/awsrunShellScript/0.awsrunShellScript/stdout")
        );
        let mut buckets = Buckets::new(&crate::objects::ObjectStoreConfig::Local, None);
        buckets.own = Some(("fleet".into(), "prod".into()));
        buckets.endpoint = None;
        buckets.region = "us-east-2".into();
        let aws = Exports {
            buckets: Arc::new(buckets),
        };
        assert_eq!(
            aws.url(&t, "a b/c"),
            "https://s3.us-east-2.amazonaws.com/out/a%20b/c"
        );
        assert_eq!(
            aws.url(&bare, "k"),
            "https://s3.eu-west-1.amazonaws.com/out/k"
        );
        let mut buckets = Buckets::new(&crate::objects::ObjectStoreConfig::Local, None);
        buckets.own = Some(("fleet".into(), "prod".into()));
        buckets.endpoint = Some("http://127.0.0.1:9000".into());
        let local = Exports {
            buckets: Arc::new(buckets),
        };
        assert_eq!(local.url(&t, "k"), "http://127.0.0.1:9000/out/k");
        let mine = |bucket: &str, prefix: &str| OutputS3 {
            bucket: bucket.into(),
            prefix: prefix.into(),
            region: String::new(),
        };
        for (b, p, ok) in [
            // Keys start with the command id under the given prefix: only the server's prefix
            // (or under it) can meet its own objects.
            ("fleet", "", true),
            ("fleet", "prod", false),
            ("fleet", "prod/x", false),
            ("fleet", "/prod/", false),
            ("fleet", "production", true),
            ("fleet", "other", true),
            ("out", "", true),
        ] {
            assert_eq!(local.check_not_own(&mine(b, p)).is_ok(), ok, "{b}/{p}");
        }
        assert_eq!(backoff(0), RETRY_MIN);
        assert_eq!(backoff(3), RETRY_MIN * 8);
        assert_eq!(backoff(40), RETRY_MAX);
    }
}
