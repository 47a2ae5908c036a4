//! `fleetrun cp SRC DST`: a file to a node (`LOCAL NODE:PATH`) or from one (`NODE:PATH LOCAL`),
//! over the server's file sockets (`/v1/nodes/{node}/files/put|get`, one session stream each).
//!
//! The file is streamed in chunks, never whole in memory. A put of one file starts at once: it
//! names a resume key (from the file's identity, size and mtime), hashes as it sends, and ends
//! with a trailer holding the size and SHA-256, which the agent checks over the whole file before
//! it renames its temp file into place (an agent before protocol version 6 needs the hash first:
//! the put is then made again with the file hashed first, as copies to many nodes and of trees
//! always are, hashed once for all). A get writes a temp file beside the local target and renames
//! it once the agent's hash of the whole file matches ours. Reading and hashing (a put), writing
//! and hashing (a get) run on a blocking thread of their own beside the socket. A dropped connection is retried with resume (at most
//! [`ATTEMPTS`] attempts within [`RETRY_WITHIN`]): a put from the offset the agent reports (the
//! length of its temp file), a get from the length of our temp file.

use super::Ctx;
use crate::client::{ApiError, Client, Socket};
use crate::render::Format;
use anyhow::Context;
use fleetrun_proto::NodeId;
use fleetrun_proto::stream::STREAM_FRAME_MAX;
use fleetrun_proto::stream::client::{ClientEvent, ServerEvent, TAG_STDIN, TAG_STDOUT};
use futures_util::{SinkExt, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::io::{IsTerminal, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
NODE is a node id, or a target expression as `send --targets` takes (tag:KEY=VALUE, tag-key:KEY,
id:ID, all; terms ANDed) for many nodes: `fleetrun cp ./f 'tag:role=web:/opt/f'` puts to each
node it matches (online ones; --max-concurrency at once, none started once more than --max-errors
failed); `fleetrun cp 'tag:role=web:/var/log/x' DIR` gets each node's file into DIR/NODE_ID/x.
With -r a directory goes up (its files under NODE:PATH) or down (the node's regular files under
PATH, listed by the node's agent, go under the local directory; to many nodes each node's under
DIR/NODE_ID; an agent before protocol version 6 lists by a one-shot `find`, which also needs the
`shell` action); symlinks on the node are skipped,
at most 100000 files and 32 levels. The copy is checked end to end (SHA-256 of the whole file) and
written to a temp file beside the target, renamed into place only once it is whole: the target
never holds a half file. A dropped connection is retried (at most 8 attempts within 60 s), resuming where the copy
stopped; else the copy fails with the last error.")]
pub struct Args {
    /// The source: a local file, or NODE:PATH
    #[arg(value_name = "SRC")]
    src: String,
    /// The destination: NODE:PATH (an absolute path), or a local file or directory
    #[arg(value_name = "DST")]
    dst: String,
    /// Permission bits of the file on the node, in octal (else the existing file's, else 0644)
    #[arg(long, value_name = "MODE")]
    mode: Option<String>,
    /// Owner of the file on the node, USER or USER:GROUP (the agent must run as root)
    #[arg(long, value_name = "USER[:GROUP]")]
    owner: Option<String>,
    /// Copy a directory: to a node, its files (symlinks to files followed) go under NODE:PATH,
    /// missing directories made (0755); from a node, its regular files (symlinks skipped) go
    /// under the local directory
    #[arg(short = 'r', long)]
    recursive: bool,
    /// With a target expression: most nodes copied at once, N or N% [default: 10]
    #[arg(long, value_name = "N|N%")]
    max_concurrency: Option<String>,
    /// With a target expression: failures after which no more copies start, N or N% [default: 0]
    #[arg(long, value_name = "N|N%")]
    max_errors: Option<String>,
}

/// Most attempts of one copy.
pub const ATTEMPTS: u32 = 8;
/// Retries stop once this long has passed since the first attempt.
pub const RETRY_WITHIN: Duration = Duration::from_secs(60);
/// Bytes a message carries (one stream frame).
const CHUNK: usize = STREAM_FRAME_MAX;
/// Most files a `cp -r` from a node copies (its listing is refused beyond).
pub const TREE_FILES_MAX: usize = fleetrun_proto::stream::LIST_FILES_MAX;
/// Most path segments below the directory a `cp -r` from a node copies (deeper is refused).
pub const TREE_DEPTH_MAX: usize = fleetrun_proto::stream::LIST_DEPTH_MAX;
/// Most bytes of a node's listing of a directory.
const LISTING_MAX: usize = fleetrun_proto::stream::LIST_BYTES_MAX;
/// Most bytes of one listed path.
const LISTED_PATH_MAX: usize = 4096;
/// How long a node may take to list a directory (its walk's bound, and a few seconds more for
/// the last records to arrive).
const LISTING_WAIT: Duration =
    Duration::from_secs(fleetrun_proto::stream::LIST_TIME_MAX.as_secs() + 5);

/// One end of a copy.
enum End {
    Local(PathBuf),
    Remote(NodeId, String),
    /// A target expression and the path on each node it matches.
    Many(String, String),
}

fn parse_end(s: &str) -> End {
    if let Some((node, path)) = s.split_once(':')
        && let Ok(id) = node.parse::<NodeId>()
    {
        return End::Remote(id, path.to_owned());
    }
    if (super::exec::is_expression(s) || s.starts_with("all:"))
        && let Some(at) = s.find(":/")
    {
        return End::Many(s[..at].to_owned(), s[at + 1..].to_owned());
    }
    End::Local(PathBuf::from(s))
}

/// What a copy did, printed at its end.
#[derive(serde::Serialize)]
struct Copied {
    direction: &'static str,
    node: String,
    path: String,
    local: String,
    size: u64,
    sha256: String,
    attempts: u32,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let mode = match args.mode.as_deref() {
        None => None,
        Some(m) => Some(
            u32::from_str_radix(m, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| {
                    anyhow::anyhow!("bad --mode {m:?}: octal permission bits, e.g. 0755")
                })?,
        ),
    };
    let (owner, group) = match args.owner.as_deref() {
        None => (None, None),
        Some(o) => match o.split_once(':') {
            Some((u, g)) => (
                (!u.is_empty()).then(|| u.to_owned()),
                (!g.is_empty()).then(|| g.to_owned()),
            ),
            None => (Some(o.to_owned()), None),
        },
    };
    let show = ctx.format == Format::Table && std::io::stderr().is_terminal();
    let (src, dst) = (parse_end(&args.src), parse_end(&args.dst));
    if matches!((&src, &dst), (End::Many(..), _) | (_, End::Many(..))) {
        return many(ctx, &client, src, dst, mode, owner, group, &args).await;
    }
    let copied = match (src, dst) {
        (End::Local(src), End::Remote(node, path)) if src.is_dir() => {
            if !args.recursive {
                anyhow::bail!("{} is a directory (copy it with -r)", src.display());
            }
            let put = PutSpec {
                node,
                path,
                mode,
                owner,
                group,
                parents: true,
            };
            return put_tree(ctx, &client, &src, &put, show).await;
        }
        (End::Local(src), End::Remote(node, path)) => {
            let put = PutSpec {
                node,
                path,
                mode,
                owner,
                group,
                parents: false,
            };
            put_file(&client, &src, &put, show).await?
        }
        (End::Remote(node, path), End::Local(dst)) => {
            if mode.is_some() || owner.is_some() {
                anyhow::bail!("--mode and --owner are for copies to a node");
            }
            if args.recursive {
                let print = ctx.format == Format::Table;
                let copied = get_tree(&client, &node, &path, &dst, show, print).await?;
                return print_tree(ctx, &copied);
            }
            get_file(&client, &node, &path, &dst, show).await?
        }
        (End::Local(_), End::Local(_)) => {
            anyhow::bail!("one side must be NODE:PATH (a node id, a colon, an absolute path)")
        }
        _ => anyhow::bail!("copies between two nodes are not supported: copy to here, then on"),
    };
    match ctx.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&copied)?),
        Format::Table => println!("{}", copied.line()),
    }
    Ok(ExitCode::SUCCESS)
}

impl Copied {
    fn line(&self) -> String {
        format!(
            "{} {}:{} {} bytes sha256 {}",
            if self.direction == "put" {
                "put"
            } else {
                "got"
            },
            self.node,
            self.path,
            self.size,
            self.sha256
        )
    }
}

/// One node's outcome of a copy to or from many.
#[derive(serde::Serialize)]
struct NodeOutcome {
    node: String,
    name: String,
    copied: Option<Copied>,
    /// With -r: each file copied.
    #[serde(skip_serializing_if = "Option::is_none")]
    files: Option<Vec<Copied>>,
    error: Option<String>,
}

/// A copy to or from every node a target expression matches, at most `--max-concurrency` at
/// once; once more than `--max-errors` failed, the copies not started are not started.
#[allow(clippy::too_many_arguments)]
async fn many(
    ctx: &Ctx,
    client: &Client,
    src: End,
    dst: End,
    mode: Option<u32>,
    owner: Option<String>,
    group: Option<String>,
    args: &Args,
) -> anyhow::Result<ExitCode> {
    use fleetrun_proto::targets::{Rate, TargetExpr};
    use std::sync::atomic::{AtomicU64, Ordering};
    let (expr, path, local, put) = match (src, dst) {
        (End::Local(l), End::Many(e, p)) => (e, p, l, true),
        (End::Many(e, p), End::Local(l)) => (e, p, l, false),
        _ => anyhow::bail!(
            "a target expression goes with a local file or directory on the other side"
        ),
    };
    if !put && (mode.is_some() || owner.is_some()) {
        anyhow::bail!("--mode and --owner are for copies to nodes");
    }
    let parsed = TargetExpr::parse(&expr)
        .map_err(|e| anyhow::anyhow!("bad target expression {expr:?}: {e}"))?;
    let nodes: Vec<_> = client
        .nodes()
        .await?
        .into_iter()
        .filter(|n| super::exec::matches(&parsed, n))
        .collect();
    if nodes.is_empty() {
        anyhow::bail!("no node matches {expr:?}");
    }
    let total = nodes.len() as u64;
    let concurrency = match &args.max_concurrency {
        Some(r) => Rate::parse_concurrency(r).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => Rate::Count(10),
    }
    .resolve(total)
    .max(1);
    let max_errors = match &args.max_errors {
        Some(r) => Rate::parse_errors(r).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => Rate::Count(0),
    }
    .resolve(total);
    // A put hashes the file (or each file of the tree) once for every node.
    let mut tree = None;
    let hashed = if put && args.recursive {
        if !local.is_dir() {
            anyhow::bail!("{} is not a directory (-r copies one)", local.display());
        }
        tree = Some(hash_tree(&local).await?);
        None
    } else if put {
        let meta = std::fs::metadata(&local)
            .with_context(|| format!("cannot read {}", local.display()))?;
        if !meta.is_file() {
            anyhow::bail!(
                "{} is not a regular file (directories need -r)",
                local.display()
            );
        }
        Some(hash_file(&local).await?)
    } else {
        std::fs::create_dir_all(&local)
            .with_context(|| format!("cannot create {}", local.display()))?;
        None
    };
    let errors = AtomicU64::new(0);
    let json = ctx.format == Format::Json;
    let one = async |n: fleetrun_proto::api::Node| {
        let node = n.node_id.clone();
        let mut files = None;
        let result = if errors.load(Ordering::Relaxed) > max_errors {
            Err(anyhow::anyhow!(
                "not started: more than {max_errors} copies failed (--max-errors)"
            ))
        } else if n.ping_status != "Online" {
            Err(anyhow::anyhow!(
                "node {} is not connected ({})",
                n.node_id,
                n.ping_status
            ))
        } else if let Some((sha, size)) = &hashed {
            let spec = PutSpec {
                node: node.clone(),
                path: path.clone(),
                mode,
                owner: owner.clone(),
                group: group.clone(),
                parents: false,
            };
            put_hashed(client, &local, &spec, sha.clone(), *size, false)
                .await
                .map(Some)
        } else if let Some(tree) = &tree {
            let spec = PutSpec {
                node: node.clone(),
                path: path.clone(),
                mode,
                owner: owner.clone(),
                group: group.clone(),
                parents: true,
            };
            let r = put_files(client, tree, &spec, false, !json).await;
            tree_outcome(r, &mut files)
        } else if args.recursive {
            let dir = local.join(node.to_string());
            let r = get_tree(client, &node, &path, &dir, false, !json).await;
            tree_outcome(r, &mut files)
        } else {
            let dir = local.join(node.to_string());
            match std::fs::create_dir_all(&dir) {
                Ok(()) => get_file(client, &node, &path, &dir, false).await.map(Some),
                Err(e) => Err(anyhow::anyhow!("cannot create {}: {e}", dir.display())),
            }
        };
        if result.is_err() {
            errors.fetch_add(1, Ordering::Relaxed);
        }
        let (copied, error) = match result {
            Ok(c) => (c, None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        if !json {
            match (&copied, &error) {
                (Some(c), _) => println!("{}", c.line()),
                (_, Some(e)) => eprintln!("{node} ({}): {e}", n.name),
                _ => {}
            }
        }
        NodeOutcome {
            node: node.to_string(),
            name: n.name,
            copied,
            files,
            error,
        }
    };
    let outcomes: Vec<NodeOutcome> = futures_util::stream::iter(nodes)
        .map(one)
        .buffer_unordered(usize::try_from(concurrency).unwrap_or(usize::MAX))
        .collect()
        .await;
    let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
    if json {
        println!("{}", serde_json::to_string_pretty(&outcomes)?);
    } else {
        eprintln!(
            "{} of {} nodes copied",
            outcomes.len() - failed,
            outcomes.len()
        );
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Percent-encodes a query value (RFC 3986 unreserved bytes kept).
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A progress bar with rate on stderr, when shown.
fn progress(show: bool, total: u64, what: &str) -> Option<ProgressBar> {
    if !show {
        return None;
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_owned());
    Some(bar)
}

/// Why an attempt failed, and whether another may do better.
struct Failure {
    error: anyhow::Error,
    retry: bool,
}

fn final_(error: anyhow::Error) -> Failure {
    Failure {
        error,
        retry: false,
    }
}

fn retry(error: anyhow::Error) -> Failure {
    Failure { error, retry: true }
}

/// Whether a refusal of the upgrade may pass (the node reconnecting, the server shedding load).
fn dial_failure(e: anyhow::Error) -> Failure {
    let again = crate::client::is_retryable(&e)
        || e.downcast_ref::<ApiError>()
            .is_some_and(|a| a.code == "Unavailable" && a.message.contains("not connected"));
    Failure {
        error: e,
        retry: again,
    }
}

/// An error event from the server: final, unless the node's connection went (it may be back).
fn server_error(message: String) -> Failure {
    let again = message.contains("agent disconnected")
        || message.contains("idle timeout")
        || message.contains("is in progress");
    Failure {
        error: anyhow::anyhow!(message),
        retry: again,
    }
}

/// Runs `attempt` until it succeeds, fails for good, or the attempts or the time are used up.
async fn with_retries<T>(
    what: &str,
    mut attempt: impl AsyncFnMut(u32) -> Result<T, Failure>,
) -> anyhow::Result<(T, u32)> {
    let first = Instant::now();
    let mut delay = Duration::from_millis(500);
    for n in 1..=ATTEMPTS {
        match attempt(n).await {
            Ok(v) => return Ok((v, n)),
            Err(f) if f.retry && n < ATTEMPTS && first.elapsed() + delay < RETRY_WITHIN => {
                eprintln!(
                    "{what}: {:#}; retrying in {:.1} s",
                    f.error,
                    delay.as_secs_f64()
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(8));
            }
            Err(f) if f.retry => {
                return Err(f.error.context(format!(
                    "{what} failed after {n} attempts in {} s",
                    first.elapsed().as_secs()
                )));
            }
            Err(f) => return Err(f.error.context(format!("{what} failed"))),
        }
    }
    unreachable!("the last attempt returns")
}

/// The next server event, skipping pings; `Ok(None)` when the socket ended without a close frame
/// of its own.
async fn next_event(
    source: &mut futures_util::stream::SplitStream<Socket>,
) -> Result<Incoming, Failure> {
    loop {
        match source.next().await {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str::<ServerEvent>(t.as_str())
                    .map(Incoming::Event)
                    .map_err(|e| final_(anyhow::anyhow!("bad message from the server: {e}")));
            }
            Some(Ok(Message::Binary(b))) => return Ok(Incoming::Bytes(b)),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(Message::Close(_))) | None => {
                return Err(retry(anyhow::anyhow!("the server closed the connection")));
            }
            Some(Err(e)) => return Err(retry(anyhow::anyhow!("the connection broke: {e}"))),
        }
    }
}

enum Incoming {
    Event(ServerEvent),
    Bytes(bytes::Bytes),
}

/// Where a put goes.
struct PutSpec {
    node: NodeId,
    path: String,
    mode: Option<u32>,
    owner: Option<String>,
    group: Option<String>,
    /// Missing directories are made on the node.
    parents: bool,
}

/// The regular files under `dir` (symlinks to files followed, to directories skipped with a
/// warning), with their paths relative to it, in order.
fn walk(dir: &Path) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_owned(), String::new())];
    while let Some((d, rel)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .with_context(|| format!("cannot read {}", d.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("cannot read {}", d.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                eprintln!("skipping {}: not UTF-8", e.path().display());
                continue;
            };
            let path = e.path();
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let link = e.file_type().is_ok_and(|t| t.is_symlink());
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => out.push((path, rel)),
                Ok(m) if m.is_dir() && !link => stack.push((path, rel)),
                Ok(_) => eprintln!("skipping {}: not a regular file", path.display()),
                Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
            }
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

/// A file of a local tree, hashed: its path, its path relative to the tree, SHA-256, length.
type Hashed = (PathBuf, String, String, u64);

/// Every file of a local tree ([`walk`]), hashed.
async fn hash_tree(dir: &Path) -> anyhow::Result<Vec<Hashed>> {
    let mut out = Vec::new();
    for (local, rel) in walk(dir)? {
        let (sha, size) = hash_file(&local).await?;
        out.push((local, rel, sha, size));
    }
    Ok(out)
}

/// `cp -r DIR NODE:PATH`: each file of DIR to PATH/its relative path, one put each.
async fn put_tree(
    ctx: &Ctx,
    client: &Client,
    src: &Path,
    put: &PutSpec,
    show: bool,
) -> anyhow::Result<ExitCode> {
    let files = hash_tree(src).await?;
    let copied = put_files(client, &files, put, show, ctx.format == Format::Table).await?;
    print_tree(ctx, &copied)
}

/// The hashed files of a tree to `put.path`/their relative paths on one node, one put each
/// (a line each when `print`); the first failure ends it.
async fn put_files(
    client: &Client,
    files: &[Hashed],
    put: &PutSpec,
    show: bool,
    print: bool,
) -> anyhow::Result<Vec<Copied>> {
    let base = put.path.trim_end_matches('/');
    let mut copied = Vec::new();
    for (local, rel, sha, size) in files {
        let spec = PutSpec {
            node: put.node.clone(),
            path: format!("{base}/{rel}"),
            mode: put.mode,
            owner: put.owner.clone(),
            group: put.group.clone(),
            parents: true,
        };
        let c = put_hashed(client, local, &spec, sha.clone(), *size, show).await?;
        if print {
            println!("{}", c.line());
        }
        copied.push(c);
    }
    Ok(copied)
}

/// A tree's outcome for one of many nodes: its files go to `files`.
fn tree_outcome(
    r: anyhow::Result<Vec<Copied>>,
    files: &mut Option<Vec<Copied>>,
) -> anyhow::Result<Option<Copied>> {
    *files = Some(r?);
    Ok(None)
}

/// The end of a tree's copy: the files as JSON, or their count and bytes.
fn print_tree(ctx: &Ctx, copied: &[Copied]) -> anyhow::Result<ExitCode> {
    match ctx.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&copied)?),
        Format::Table => eprintln!(
            "{} files, {} bytes",
            copied.len(),
            copied.iter().map(|c| c.size).sum::<u64>()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// A string as one `sh` word (single-quoted).
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// What a node listed under a directory: the regular files' relative paths, in order, and the
/// symlinks skipped.
#[derive(Debug, Default, PartialEq)]
struct Listing {
    files: Vec<String>,
    symlinks: Vec<String>,
}

/// Checks one path a node listed under a directory, relative to it: it must stay inside
/// (no `..`, `.`, empty or absolute segment) and be at most [`TREE_DEPTH_MAX`] deep; returns it
/// and its depth. The node is not trusted: these paths become local ones.
fn check_listed(rel: &[u8]) -> Result<(&str, usize), String> {
    let shown = String::from_utf8_lossy(rel);
    let rel = std::str::from_utf8(rel)
        .map_err(|_| format!("the node listed a path that is not UTF-8: {shown:?}"))?;
    if rel.is_empty() || rel.len() > LISTED_PATH_MAX {
        return Err(format!(
            "the node listed a path of {} bytes (1 to {LISTED_PATH_MAX})",
            rel.len()
        ));
    }
    if rel.starts_with('/') {
        return Err(format!("the node listed an absolute path: {rel:?}"));
    }
    let mut depth = 0;
    for seg in rel.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err(format!(
                "the node listed a path that leaves the directory or is not plain: {rel:?}"
            ));
        }
        depth += 1;
    }
    if depth > TREE_DEPTH_MAX {
        return Err(format!(
            "{rel:?} is {depth} levels deep: at most {TREE_DEPTH_MAX} are copied"
        ));
    }
    Ok((rel, depth))
}

/// Parses a node's listing: NUL-terminated entries of a type byte (`f` a regular file, `l` a
/// symlink, `d` a directory that is not empty) and a relative path. A directory at the deepest
/// level copied holds what would be deeper: refused.
fn parse_listing(out: &[u8]) -> Result<Listing, String> {
    let mut listing = Listing::default();
    let mut seen = std::collections::HashSet::new();
    for entry in out.split(|b| *b == 0) {
        let Some((&kind, rel)) = entry.split_first() else {
            continue;
        };
        let (rel, depth) = check_listed(rel)?;
        match kind {
            b'd' if depth == TREE_DEPTH_MAX => {
                return Err(format!(
                    "{rel:?} holds paths {} levels deep: at most {TREE_DEPTH_MAX} are copied",
                    depth + 1
                ));
            }
            b'd' => {}
            b'f' => {
                if !seen.insert(rel) {
                    return Err(format!("the node listed {rel:?} twice"));
                }
                if listing.files.len() == TREE_FILES_MAX {
                    return Err(format!(
                        "the directory holds more than {TREE_FILES_MAX} files: copy a part of it"
                    ));
                }
                listing.files.push(rel.to_owned());
            }
            b'l' => listing.symlinks.push(rel.to_owned()),
            other => {
                return Err(format!(
                    "the node listed an entry of unknown type {:?}",
                    char::from(other)
                ));
            }
        }
    }
    listing.files.sort();
    Ok(listing)
}

/// Lists the regular files under `dir` on `node`: a `FileList` stream through the server's list
/// socket (the `cp` action), or, from a server or agent that predates it (protocol version 6), a
/// one-shot `find` through the exec session (the `shell` action). Either way the NUL-separated
/// records are at most [`LISTING_MAX`] bytes, within [`LISTING_WAIT`], checked by
/// [`parse_listing`].
async fn list_remote(client: &Client, node: &NodeId, dir: &str) -> anyhow::Result<Listing> {
    if !dir.starts_with('/') {
        anyhow::bail!("{dir:?} is not an absolute path");
    }
    let url = format!("/v1/nodes/{node}/files/list?path={}", enc(dir));
    let ws = match client.socket(&url).await {
        Ok(ws) => Some(ws),
        Err(e) if predates_list(&e) => None,
        Err(e) => return Err(e.context(format!("cannot list {dir} on {node}"))),
    };
    let (ws, eof) = match ws {
        Some(ws) => (ws, false),
        None => (find_over_exec(client, node, dir).await?, true),
    };
    let out = read_listing(ws, node, dir, eof).await?;
    parse_listing(&out).map_err(|e| anyhow::anyhow!("refused the listing of {dir} on {node}: {e}"))
}

/// Whether a refused list socket means the server (no such route) or the node's agent (before
/// protocol version 6) has no listing, so `find` over exec does it.
fn predates_list(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ApiError>().is_some_and(|a| {
        a.code == "RouteNotFound"
            || (a.code == "Unavailable" && a.message.contains("without file list sessions"))
    })
}

/// Starts `find -H DIR ... -printf '%y%P\0'` on the node through an exec session: the listing of
/// agents before protocol version 6 (it needs the `shell` action).
async fn find_over_exec(client: &Client, node: &NodeId, dir: &str) -> anyhow::Result<Socket> {
    use fleetrun_proto::stream::client::ExecRequest;
    // -H: the directory itself may be a symlink; below it none is followed (-type l lists them
    // to be skipped). Directories that are not empty are listed too, so that a tree deeper than
    // is copied is refused, not silently cut.
    let d = sh_quote(dir);
    let command = format!(
        "[ -d {d} ] || {{ echo no directory {d} on the node >&2; exit 2; }}; \
         exec find -H {d} -mindepth 1 -maxdepth {TREE_DEPTH_MAX} \\( -type f -o -type l -o -type d ! -empty \\) \
         -printf '%y%P\\0'"
    );
    let req = ExecRequest {
        command,
        run_as: String::new(),
        env: Default::default(),
        working_dir: String::new(),
        pty: None,
    };
    super::exec::open(client, node, &req)
        .await
        .with_context(|| format!("cannot list {dir} on {node}"))
}

/// Reads a listing's records from a list socket or a `find`'s exec session (`eof`: close its
/// stdin first) until its exit status, which must be 0.
async fn read_listing(ws: Socket, node: &NodeId, dir: &str, eof: bool) -> anyhow::Result<Vec<u8>> {
    use fleetrun_proto::stream::client::TAG_STDERR;
    let (mut sink, mut source) = ws.split();
    if eof {
        let eof = serde_json::to_string(&ClientEvent::Eof)?;
        sink.send(Message::Text(eof.into()))
            .await
            .context("the server closed the session")?;
    }
    let mut out = Vec::new();
    let mut err = Vec::new();
    let read = async {
        loop {
            match source.next().await {
                Some(Ok(Message::Binary(b))) => match b.split_first() {
                    Some((&TAG_STDOUT, rest)) => {
                        if out.len() + rest.len() > LISTING_MAX {
                            anyhow::bail!(
                                "the node's listing of {dir} is over {} MiB: copy a part of it",
                                LISTING_MAX >> 20
                            );
                        }
                        out.extend_from_slice(rest);
                    }
                    Some((&TAG_STDERR, rest)) => {
                        let room = 4096usize.saturating_sub(err.len());
                        err.extend_from_slice(&rest[..rest.len().min(room)]);
                    }
                    _ => anyhow::bail!("the server sent a message this CLI does not know"),
                },
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerEvent>(&t) {
                    Ok(ServerEvent::Exit { code, .. }) => return Ok(code),
                    Ok(ServerEvent::Error { message }) => anyhow::bail!("{message}"),
                    Ok(_) => {}
                    Err(e) => anyhow::bail!("bad message from the server: {e}"),
                },
                Some(Ok(Message::Close(_))) | None => {
                    anyhow::bail!("the server closed the session without an exit status")
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => anyhow::bail!("the session broke: {e}"),
            }
        }
    };
    let code = tokio::time::timeout(LISTING_WAIT, read)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the node did not list {dir} within {} s",
                LISTING_WAIT.as_secs()
            )
        })?
        .with_context(|| format!("cannot list {dir} on {node}"))?;
    let _ = sink.close().await;
    if code != 0 {
        let err = String::from_utf8_lossy(&err);
        anyhow::bail!(
            "cannot list {dir} on {node} (exit status {code}): {}",
            err.trim()
        );
    }
    Ok(out)
}

/// Makes `rel`'s directories under `root`, one segment at a time, refusing any that is there
/// but not a directory of its own (a symlink is not followed).
fn make_parents(root: &Path, rel: &str) -> anyhow::Result<PathBuf> {
    let mut at = root.to_owned();
    let segs: Vec<&str> = rel.split('/').collect();
    for seg in &segs[..segs.len().saturating_sub(1)] {
        at.push(seg);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => anyhow::bail!("{} is in the way: not a directory", at.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir(&at)
                .with_context(|| format!("cannot create {}", at.display()))?,
            Err(e) => anyhow::bail!("cannot read {}: {e}", at.display()),
        }
    }
    let target = root.join(rel);
    match std::fs::symlink_metadata(&target) {
        Ok(m) if m.is_dir() => anyhow::bail!("{} is a directory", target.display()),
        Ok(m) if m.file_type().is_symlink() => {
            anyhow::bail!("{} is a symlink: not written through", target.display())
        }
        _ => {}
    }
    Ok(target)
}

/// `cp -r NODE:DIR LOCAL`: each regular file under DIR on the node to LOCAL/its relative path
/// (LOCAL and the missing directories made), one checked get each (a line each when `print`);
/// the first failure ends it.
async fn get_tree(
    client: &Client,
    node: &NodeId,
    dir: &str,
    local: &Path,
    show: bool,
    print: bool,
) -> anyhow::Result<Vec<Copied>> {
    let listing = list_remote(client, node, dir).await?;
    for l in &listing.symlinks {
        eprintln!("skipping {node}:{dir}/{l}: a symlink");
    }
    std::fs::create_dir_all(local).with_context(|| format!("cannot create {}", local.display()))?;
    let base = dir.trim_end_matches('/');
    let mut copied = Vec::new();
    for rel in &listing.files {
        let target = make_parents(local, rel)?;
        let c = get_file(client, node, &format!("{base}/{rel}"), &target, show).await?;
        if print {
            println!("{}", c.line());
        }
        copied.push(c);
    }
    Ok(copied)
}

/// The SHA-256 and length of a local file, read in chunks.
async fn hash_file(path: &Path) -> anyhow::Result<(String, u64)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0u64;
        loop {
            let n = f
                .read(&mut buf)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            len += n as u64;
        }
        Ok((hex_of(&hasher.finalize()), len))
    })
    .await?
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn put_file(
    client: &Client,
    src: &Path,
    put: &PutSpec,
    show: bool,
) -> anyhow::Result<Copied> {
    let meta = std::fs::metadata(src).with_context(|| format!("cannot read {}", src.display()))?;
    if !meta.is_file() {
        anyhow::bail!(
            "{} is not a regular file (directories need -r)",
            src.display()
        );
    }
    let mut path = put.path.clone();
    if path.ends_with('/') {
        // A directory on the node: the file keeps its name.
        let name = src
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow::anyhow!("{} has no file name", src.display()))?;
        path.push_str(name);
    }
    let spec = PutSpec {
        node: put.node.clone(),
        path,
        mode: put.mode,
        owner: put.owner.clone(),
        group: put.group.clone(),
        parents: put.parents,
    };
    let key = Hashing::Trailer(resume_key(&meta));
    match put_one(client, src, &spec, key, meta.len(), show).await {
        Err(e) if needs_hash_first(&e) => {
            let (sha256, size) = hash_file(src).await?;
            put_hashed(client, src, &spec, sha256, size, show).await
        }
        r => r,
    }
}

/// Where a put's SHA-256 comes from.
#[derive(Clone)]
enum Hashing {
    /// Hashed before: sent up front (`sha256=`).
    Known(String),
    /// Hashed while sending, sent in the trailer; the resume key (`key=`).
    Trailer(String),
}

/// A put's resume key: 16 hex digits of a hash of the file's identity, size and times, so a
/// retry (or a later `cp` of the unchanged file) continues the node's temp file and a changed
/// file starts afresh.
fn resume_key(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    let id = format!(
        "{}:{}:{}:{}.{}:{}.{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    );
    hex_of(&Sha256::digest(id.as_bytes()))[..fleetrun_proto::stream::FILE_KEY_LEN].to_owned()
}

/// Whether the server refused a trailer put because the node's agent needs the hash first, or
/// because the server itself is older than keyed puts (it knows no `key`).
fn needs_hash_first(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<ApiError>().is_some_and(|a| {
            (a.code == "Unavailable" && a.message.contains("sha256="))
                || (a.code == "InvalidParameters" && a.message.contains("unknown field `key`"))
        })
    })
}

/// A put of a file already hashed.
async fn put_hashed(
    client: &Client,
    src: &Path,
    put: &PutSpec,
    sha256: String,
    size: u64,
    show: bool,
) -> anyhow::Result<Copied> {
    put_one(client, src, put, Hashing::Known(sha256), size, show).await
}

/// A put, hashed up front or in its trailer.
async fn put_one(
    client: &Client,
    src: &Path,
    put: &PutSpec,
    hashing: Hashing,
    size: u64,
    show: bool,
) -> anyhow::Result<Copied> {
    let mut path = put.path.clone();
    if path.ends_with('/') {
        let name = src
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow::anyhow!("{} has no file name", src.display()))?;
        path.push_str(name);
    }
    let hash = match &hashing {
        Hashing::Known(sha256) => format!("sha256={sha256}"),
        Hashing::Trailer(key) => format!("key={key}"),
    };
    let mut query = format!("path={}&size={size}&{hash}&resume=true", enc(&path));
    if let Some(m) = put.mode {
        query.push_str(&format!("&mode={m:04o}"));
    }
    if let Some(o) = &put.owner {
        query.push_str(&format!("&owner={}", enc(o)));
    }
    if let Some(g) = &put.group {
        query.push_str(&format!("&group={}", enc(g)));
    }
    if put.parents {
        query.push_str("&parents=true");
    }
    let url = format!("/v1/nodes/{}/files/put?{query}", put.node);
    let bar = progress(
        show,
        size,
        &format!("{} → {}:{path}", src.display(), put.node),
    );
    let what = format!("copy to {}:{path}", put.node);
    let (sha256, attempts) = with_retries(&what, async |_| {
        put_attempt(client, &url, src, size, &hashing, bar.as_ref()).await
    })
    .await?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    Ok(Copied {
        direction: "put",
        node: put.node.to_string(),
        path,
        local: src.display().to_string(),
        size,
        sha256,
        attempts,
    })
}

/// What a put's reader hands its sender.
enum Outgoing {
    /// A message: the data tag and a chunk of the file.
    Data(Vec<u8>),
    /// All read: the whole file's SHA-256 (when hashed here).
    Done(Option<String>),
    Failed(String),
}

/// A put's reader, on a blocking thread: the file from `offset`, in messages of [`CHUNK`]
/// behind the data tag, hashed (the prefix before `offset` too) when `hash`.
fn read_put(
    path: &Path,
    offset: u64,
    size: u64,
    hash: bool,
    out: &tokio::sync::mpsc::Sender<Outgoing>,
) -> Option<()> {
    use std::io::Seek;
    let cannot =
        |e: std::io::Error| Outgoing::Failed(format!("cannot read {}: {e}", path.display()));
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return out.blocking_send(cannot(e)).ok(),
    };
    let mut hasher = hash.then(Sha256::new);
    if let Some(h) = hasher.as_mut()
        && offset > 0
    {
        let mut prefix = (&file).take(offset);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match prefix.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => h.update(&buf[..n]),
                Err(e) => return out.blocking_send(cannot(e)).ok(),
            }
        }
    }
    if let Err(e) = file.seek(std::io::SeekFrom::Start(offset)) {
        return out.blocking_send(cannot(e)).ok();
    }
    let mut left = size - offset;
    while left > 0 {
        let want = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        let mut msg = Vec::with_capacity(want + 1);
        msg.push(TAG_STDIN);
        match (&file).take(want as u64).read_to_end(&mut msg) {
            Ok(0) => {
                let why = format!("{} shrank while being copied", path.display());
                return out.blocking_send(Outgoing::Failed(why)).ok();
            }
            Ok(n) => left -= n as u64,
            Err(e) => return out.blocking_send(cannot(e)).ok(),
        }
        if let Some(h) = hasher.as_mut() {
            h.update(&msg[1..]);
        }
        out.blocking_send(Outgoing::Data(msg)).ok()?;
    }
    let sha = hasher.map(|h| hex_of(&h.finalize()));
    out.blocking_send(Outgoing::Done(sha)).ok()
}

/// One attempt of a put, from the offset the agent reports: the whole file's SHA-256, once the
/// agent's matches ours.
async fn put_attempt(
    client: &Client,
    url: &str,
    src: &Path,
    size: u64,
    hashing: &Hashing,
    bar: Option<&ProgressBar>,
) -> Result<String, Failure> {
    let ws = client.socket(url).await.map_err(dial_failure)?;
    let (mut sink, mut source) = ws.split();
    // The agent says where to start (a resume: what its temp file holds).
    let offset = loop {
        match next_event(&mut source).await? {
            Incoming::Event(ServerEvent::File { offset, .. }) => break offset,
            Incoming::Event(ServerEvent::Error { message }) => return Err(server_error(message)),
            Incoming::Event(_) => {}
            Incoming::Bytes(_) => {
                return Err(final_(anyhow::anyhow!("the server sent bytes on a put")));
            }
        }
    };
    if offset > size {
        return Err(final_(anyhow::anyhow!(
            "the node asked for offset {offset} of a {size}-byte file"
        )));
    }
    if let Some(b) = bar {
        b.set_position(offset);
    }
    // A few messages read ahead: the reader thread reads and hashes while this one sends.
    let (tx, mut chunks) = tokio::sync::mpsc::channel(8);
    let path = src.to_owned();
    let trailer = matches!(hashing, Hashing::Trailer(_));
    tokio::task::spawn_blocking(move || read_put(&path, offset, size, trailer, &tx));
    let bar2 = bar.cloned();
    // The sender: the reader's messages, then the end (with a key, the trailer); the socket's
    // own backpressure (the server reads as the agent's credit allows) paces it.
    let mut sender = tokio::spawn(async move {
        let broke = |e| retry(anyhow::anyhow!("the connection broke: {e}"));
        loop {
            match chunks.recv().await {
                Some(Outgoing::Data(msg)) => {
                    let n = msg.len() as u64 - 1;
                    sink.send(Message::Binary(msg.into()))
                        .await
                        .map_err(broke)?;
                    if let Some(b) = &bar2 {
                        b.inc(n);
                    }
                }
                Some(Outgoing::Done(sha256)) => {
                    let end = match &sha256 {
                        Some(sha256) => ClientEvent::End {
                            size,
                            sha256: sha256.clone(),
                        },
                        None => ClientEvent::Eof,
                    };
                    let end = serde_json::to_string(&end).unwrap_or_default();
                    sink.send(Message::Text(end.into())).await.map_err(broke)?;
                    return Ok::<_, Failure>((sink, sha256));
                }
                Some(Outgoing::Failed(why)) => return Err(final_(anyhow::anyhow!(why))),
                None => return Err(final_(anyhow::anyhow!("the file's reader stopped"))),
            }
        }
    });
    let mut sent: Option<String> = None;
    let mut sender_done = false;
    // Kept open until the agent's answer.
    let mut _sink = None;
    let outcome = loop {
        tokio::select! {
            r = &mut sender, if !sender_done => {
                sender_done = true;
                match r.unwrap_or_else(|e| Err(final_(anyhow::anyhow!("the sender failed: {e}")))) {
                    Err(f) => break Err(f),
                    Ok((sink, sha)) => {
                        sent = sha;
                        _sink = Some(sink);
                    }
                }
            }
            ev = next_event(&mut source) => match ev {
                Ok(Incoming::Event(ServerEvent::Done { sha256: got })) => {
                    let ours = match hashing {
                        Hashing::Known(sha256) => sha256.clone(),
                        // The agent's done follows the trailer, so the sender has ended.
                        Hashing::Trailer(_) => match (sent.take(), sender_done) {
                            (Some(sha), _) => sha,
                            (None, false) => match (&mut sender).await {
                                Ok(Ok((sink, Some(sha)))) => {
                                    _sink = Some(sink);
                                    sha
                                }
                                _ => break Err(final_(anyhow::anyhow!("the node finished before the file was sent"))),
                            },
                            (None, true) => break Err(final_(anyhow::anyhow!("the node finished before the file was sent"))),
                        },
                    };
                    if got != ours {
                        break Err(final_(anyhow::anyhow!("the node's file has sha256 {got}, ours {ours}")));
                    }
                    break Ok(ours);
                }
                Ok(Incoming::Event(ServerEvent::Error { message })) => break Err(server_error(message)),
                Ok(_) => {}
                Err(f) => break Err(f),
            },
        }
    };
    sender.abort();
    outcome
}

async fn get_file(
    client: &Client,
    node: &NodeId,
    path: &str,
    dst: &Path,
    show: bool,
) -> anyhow::Result<Copied> {
    let target = if dst.is_dir() {
        let name = Path::new(path)
            .file_name()
            .ok_or_else(|| anyhow::anyhow!("{path} names no file"))?;
        dst.join(name)
    } else {
        dst.to_owned()
    };
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow::anyhow!("{} names no file", target.display()))?;
    let tmp = dir.join(format!(".{name}.fleetrun-get.part"));
    // A partial of an earlier run may be of another version of the file: start afresh.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(anyhow::anyhow!("cannot remove {}: {e}", tmp.display()));
        }
        _ => {}
    }
    let what = format!("copy from {node}:{path}");
    let bar: std::cell::OnceCell<Option<ProgressBar>> = std::cell::OnceCell::new();
    let ((size, sha256, mode), attempts) = with_retries(&what, async |_| {
        get_attempt(client, node, path, &tmp, |size| {
            bar.get_or_init(|| {
                progress(show, size, &format!("{node}:{path} → {}", target.display()))
            })
            .clone()
        })
        .await
    })
    .await
    .inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    if let Some(Some(b)) = bar.get() {
        b.finish_and_clear();
    }
    let f = std::fs::File::open(&tmp).with_context(|| format!("cannot open {}", tmp.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))
        .with_context(|| format!("cannot chmod {}", tmp.display()))?;
    f.sync_all()
        .with_context(|| format!("cannot sync {}", tmp.display()))?;
    std::fs::rename(&tmp, &target)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), target.display()))?;
    Ok(Copied {
        direction: "get",
        node: node.to_string(),
        path: path.to_owned(),
        local: target.display().to_string(),
        size,
        sha256,
        attempts,
    })
}

/// A get starts the writeback of what it wrote after this many bytes, so the fsync before its
/// rename finds little left to write (1 GiB of dirty pages took ~0.5 s to sync here).
const WRITEBACK_EVERY: u64 = 8 << 20;

/// Asks the kernel to start writing `len` bytes at `from` back to disk, without waiting.
fn start_writeback(file: &std::fs::File, from: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(from), Ok(len)) = (i64::try_from(from), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range(2) on a descriptor this File owns; no memory is involved. Only a
    // hint: a failure leaves the work to the final fsync.
    let _ =
        unsafe { libc::sync_file_range(file.as_raw_fd(), from, len, libc::SYNC_FILE_RANGE_WRITE) };
}

/// A get's writer, on a blocking thread: hashes the `have` bytes `tmp` already holds, then
/// appends and hashes each chunk; at the end of `chunks` (the sender dropped) the SHA-256 of it
/// all and its length.
fn write_get(
    tmp: &Path,
    have: u64,
    chunks: &mut tokio::sync::mpsc::Receiver<bytes::Bytes>,
) -> Result<(String, u64), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| format!("cannot write {}: {e}", tmp.display());
    let mut hasher = Sha256::new();
    if have > 0 {
        let f = std::fs::File::open(tmp).map_err(io)?;
        let mut prefix = f.take(have);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match prefix.read(&mut buf).map_err(io)? {
                0 => break,
                n => hasher.update(&buf[..n]),
            }
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(tmp)
        .map_err(io)?;
    let mut got = have;
    let mut synced = have;
    while let Some(data) = chunks.blocking_recv() {
        hasher.update(&data);
        file.write_all(&data).map_err(io)?;
        got += data.len() as u64;
        if got - synced >= WRITEBACK_EVERY {
            start_writeback(&file, synced, got - synced);
            synced = got;
        }
    }
    Ok((hex_of(&hasher.finalize()), got))
}

/// One attempt of a get, resuming from what `tmp` holds: the size, hash and mode, once the
/// agent's hash of the whole file matches ours.
async fn get_attempt(
    client: &Client,
    node: &NodeId,
    path: &str,
    tmp: &Path,
    bar_for: impl Fn(u64) -> Option<ProgressBar>,
) -> Result<(u64, String, u32), Failure> {
    let have = match tokio::fs::metadata(tmp).await {
        Ok(m) => m.len(),
        Err(_) => 0,
    };
    let url = format!(
        "/v1/nodes/{node}/files/get?path={}&offset={have}",
        enc(path)
    );
    let ws = client.socket(&url).await.map_err(dial_failure)?;
    let (mut sink, mut source) = ws.split();
    // The writer thread writes and hashes while this one reads the socket; a few chunks queue
    // between them, so a slow disk slows the socket (and so the agent), not memory.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
    let dest = tmp.to_owned();
    let writer = tokio::task::spawn_blocking(move || write_get(&dest, have, &mut rx));
    let mut tx = Some(tx);
    let mut info: Option<(u64, u32)> = None;
    let mut got = have;
    let mut bar = None;
    let outcome = loop {
        match next_event(&mut source).await {
            Ok(Incoming::Event(ServerEvent::File { offset, size, mode })) => {
                if offset != have || size < have {
                    break Err(final_(anyhow::anyhow!(
                        "the node sends from offset {offset} of {size} bytes; we hold {have}"
                    )));
                }
                info = Some((size, mode));
                bar = bar_for(size);
                if let Some(b) = &bar {
                    b.set_position(have);
                }
            }
            Ok(Incoming::Bytes(b)) => {
                let Some((size, _)) = info else {
                    break Err(final_(anyhow::anyhow!("bytes before the file's size")));
                };
                if b.first() != Some(&TAG_STDOUT) {
                    break Err(final_(anyhow::anyhow!("a message without the data tag")));
                }
                let data = b.slice(1..);
                if got + data.len() as u64 > size {
                    break Err(final_(anyhow::anyhow!(
                        "the node sent more than the file's {size} bytes"
                    )));
                }
                got += data.len() as u64;
                let sent = match &tx {
                    Some(tx) => tx.send(data).await.is_ok(),
                    None => false,
                };
                if !sent {
                    // The writer failed: it says why below.
                    tx = None;
                    break Ok(None);
                }
                if let Some(b) = &bar {
                    b.set_position(got);
                }
            }
            Ok(Incoming::Event(ServerEvent::Done { sha256 })) => {
                let Some((size, mode)) = info else {
                    break Err(final_(anyhow::anyhow!("done before the file's size")));
                };
                if got != size {
                    break Err(final_(anyhow::anyhow!("got {got} bytes of {size}")));
                }
                break Ok(Some((size, sha256, mode)));
            }
            Ok(Incoming::Event(ServerEvent::Error { message })) => {
                break Err(server_error(message));
            }
            Ok(Incoming::Event(_)) => {}
            Err(f) => break Err(f),
        }
    };
    let _ = sink.close().await;
    // The writer ends once its channel does; what it wrote stays for a resume.
    drop(tx);
    let written = writer
        .await
        .unwrap_or_else(|e| Err(format!("the file task failed: {e}")));
    let (size, sha256, mode) = match (outcome, written) {
        (Err(f), _) => return Err(f),
        (Ok(_), Err(e)) => return Err(final_(anyhow::anyhow!(e))),
        (Ok(None), Ok(_)) => return Err(final_(anyhow::anyhow!("the file's writer stopped"))),
        (Ok(Some(done)), Ok((ours, len))) => {
            if ours != done.1 || len != done.0 {
                let _ = tokio::fs::remove_file(tmp).await;
                return Err(final_(anyhow::anyhow!(
                    "sha256 mismatch: the node's file is {}, what arrived {ours}",
                    done.1
                )));
            }
            done
        }
    };
    Ok((size, sha256, mode))
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_server_or_agent_without_listings_makes_cp_r_list_by_find() {
        let e = |code: &str, message: &str| {
            anyhow::Error::new(ApiError {
                code: code.into(),
                message: message.into(),
            })
        };
        assert!(predates_list(&e("RouteNotFound", "no such route")));
        assert!(predates_list(&e(
            "Unavailable",
            "the node's agent speaks channel protocol version 5, without file list sessions \
             (version 7 or later is needed: upgrade the agent)"
        )));
        assert!(!predates_list(&e(
            "Unavailable",
            "node mi-1 is not connected"
        )));
        assert!(!predates_list(&e("AccessDenied", "not allowed to cp")));
        assert!(!predates_list(&e("InvalidParameters", "bad path")));
        assert!(!predates_list(&anyhow::anyhow!("cannot reach server")));
    }

    #[test]
    fn only_an_agent_that_needs_the_hash_first_makes_a_put_hash_first() {
        let e = |code: &str, message: &str| {
            anyhow::Error::new(ApiError {
                code: code.into(),
                message: message.into(),
            })
            .context("copy to mi-1:/f failed")
        };
        assert!(needs_hash_first(&e(
            "Unavailable",
            "the node's agent speaks channel protocol version 5, which takes a file's SHA-256 \
             only before its bytes: put with sha256= (or upgrade the agent)"
        )));
        assert!(!needs_hash_first(&e(
            "Unavailable",
            "node mi-1 is not connected"
        )));
        assert!(!needs_hash_first(&e("InvalidParameters", "bad sha256=")));
        // A server of protocol version 5 knows no key.
        assert!(needs_hash_first(&e(
            "InvalidParameters",
            "a file put needs Failed to deserialize query string: unknown field `key`, expected one of ..."
        )));
    }

    #[test]
    fn a_resume_key_names_one_version_of_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"one").unwrap();
        let key = resume_key(&std::fs::metadata(&f).unwrap());
        assert_eq!(key.len(), fleetrun_proto::stream::FILE_KEY_LEN);
        assert!(
            fleetrun_proto::stream::check_file_key(&key).is_ok(),
            "{key}"
        );
        assert_eq!(resume_key(&std::fs::metadata(&f).unwrap()), key);
        std::fs::write(&f, b"two!").unwrap();
        assert_ne!(resume_key(&std::fs::metadata(&f).unwrap()), key);
    }

    use super::*;

    #[test]
    fn a_listing_keeps_files_in_order_and_names_symlinks() {
        let l = parse_listing(b"fb/c\0fa\0llink\0").unwrap();
        assert_eq!(l.files, ["a", "b/c"]);
        assert_eq!(l.symlinks, ["link"]);
        assert_eq!(parse_listing(b"").unwrap(), Listing::default());
    }

    #[test]
    fn a_listing_that_leaves_the_directory_is_refused() {
        for bad in [
            &b"f../x\0"[..],
            b"fa/../../x\0",
            b"f/etc/passwd\0",
            b"fa//b\0",
            b"f./a\0",
            b"f\0",
            b"f\xff\0",
            b"xa\0",
            b"fa\0fa\0",
        ] {
            let e = parse_listing(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad:?}");
        }
        let deep = format!("f{}x\0", "d/".repeat(TREE_DEPTH_MAX));
        let e = parse_listing(deep.as_bytes()).unwrap_err();
        assert!(e.contains("levels deep"), "{e}");
        let full = format!("d{}d\0", "d/".repeat(TREE_DEPTH_MAX - 1));
        let e = parse_listing(full.as_bytes()).unwrap_err();
        assert!(e.contains("33 levels deep"), "{e}");
        let ok = format!("d{}d\0fa\0", "d/".repeat(TREE_DEPTH_MAX - 2));
        assert_eq!(parse_listing(ok.as_bytes()).unwrap().files, ["a"]);
        let long = format!("f{}\0", "a".repeat(LISTED_PATH_MAX + 1));
        assert!(
            parse_listing(long.as_bytes())
                .unwrap_err()
                .contains("bytes")
        );
    }

    #[test]
    fn too_many_files_are_refused() {
        let mut out = Vec::new();
        for i in 0..=TREE_FILES_MAX {
            out.extend_from_slice(format!("f{i}\0").as_bytes());
        }
        assert!(parse_listing(&out).unwrap_err().contains("more than"));
    }

    #[test]
    fn a_quoted_word_survives_the_shell() {
        let q = sh_quote("/tmp/it's $(x) `y`");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {q}"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "/tmp/it's $(x) `y`");
    }

    #[test]
    fn local_parents_do_not_follow_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), t.path().join("sub")).unwrap();
        let e = make_parents(t.path(), "sub/x").unwrap_err();
        assert!(format!("{e}").contains("not a directory"), "{e}");
        let p = make_parents(t.path(), "a/b/c").unwrap();
        assert_eq!(p, t.path().join("a/b/c"));
        assert!(t.path().join("a/b").is_dir());
    }
}
