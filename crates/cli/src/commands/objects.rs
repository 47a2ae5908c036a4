//! `fleetrun objects put|get|ls|rm`: objects kept in the server's object store for users (script
//! inputs, results, files). Transfers stream in chunks with a progress bar on a terminal; the
//! SHA-256 is computed on this side too and must equal the server's.

use super::Ctx;
use crate::client::Client;
use crate::render::{self, Format};
use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncReadExt;

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Upload a file as an object (replacing one under the key once the upload is complete)
    Put {
        /// The local file (`-` for stdin is not supported: the size must be known)
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The object's key, e.g. inputs/collector.tar.gz [default: the file's name]
        #[arg(value_name = "KEY")]
        key: Option<String>,
    },
    /// Download an object to a file, or to stdout with `-`
    Get {
        /// The object's key
        #[arg(value_name = "KEY")]
        key: String,
        /// Where to write it [default: the key's last segment in this directory]; `-` for stdout
        #[arg(value_name = "DEST")]
        dest: Option<PathBuf>,
    },
    /// List objects, in key order
    Ls {
        /// Only keys that start with this
        #[arg(value_name = "PREFIX", default_value = "")]
        prefix: String,
        /// Most objects to list
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: u32,
        /// The page after this key (the last key of the previous page)
        #[arg(long, value_name = "KEY")]
        after: Option<String>,
    },
    /// Delete an object
    Rm {
        /// The object's key
        #[arg(value_name = "KEY")]
        key: String,
    },
}

/// Bytes read from the file per chunk sent.
const CHUNK: usize = 256 * 1024;

pub async fn run(ctx: &Ctx, cmd: Cmd) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    match cmd {
        Cmd::Put { file, key } => put(ctx, &client, &file, key).await,
        Cmd::Get { key, dest } => get(&client, &key, dest).await,
        Cmd::Ls {
            prefix,
            limit,
            after,
        } => ls(ctx, &client, &prefix, limit, after.as_deref()).await,
        Cmd::Rm { key } => {
            client.delete_object(&key).await?;
            eprintln!("deleted {key}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A byte-count progress bar on stderr when a person is watching.
fn progress(total: Option<u64>, what: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = match total {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::no_length(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_owned());
    Some(bar)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn put(
    ctx: &Ctx,
    client: &Client,
    file: &Path,
    key: Option<String>,
) -> anyhow::Result<ExitCode> {
    let key = match key {
        Some(k) => k,
        None => file
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
            .with_context(|| format!("give a KEY: {} has no usable file name", file.display()))?,
    };
    fleetrun_proto::api::check_object_key(&key).map_err(anyhow::Error::msg)?;
    let f = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("cannot open {}", file.display()))?;
    let meta = f.metadata().await?;
    if !meta.is_file() {
        bail!("{} is not a regular file", file.display());
    }
    let size = meta.len();
    let bar = progress(Some(size), &format!("put {key}"));
    // The file is hashed as it is read, so the SHA-256 is of the bytes that were sent.
    let hasher = Arc::new(Mutex::new(Sha256::new()));
    let state = (f, hasher.clone(), bar.clone(), vec![0u8; CHUNK]);
    let stream = futures_util::stream::unfold(state, |(mut f, h, bar, mut buf)| async move {
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                if let Ok(mut h) = h.lock() {
                    h.update(&buf[..n]);
                }
                if let Some(b) = &bar {
                    b.inc(n as u64);
                }
                let chunk = bytes::Bytes::copy_from_slice(&buf[..n]);
                Some((Ok::<_, std::io::Error>(chunk), (f, h, bar, buf)))
            }
            Err(e) => Some((Err(e), (f, h, bar, buf))),
        }
    });
    let stored = client
        .put_object(&key, size, reqwest::Body::wrap_stream(stream))
        .await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let stored = stored?;
    let local = hasher
        .lock()
        .map(|h| hex(&h.clone().finalize()))
        .unwrap_or_default();
    if stored.sha256 != local || stored.size != size {
        bail!(
            "the server stored {} bytes with SHA-256 {}, but {} bytes with SHA-256 {local} were sent (the file changed while it was read?)",
            stored.size,
            stored.sha256,
            size
        );
    }
    if ctx.format == Format::Json {
        render::print_json(&stored)?;
    } else {
        println!(
            "{}  {}  {}",
            stored.sha256,
            render::bytes(stored.size),
            stored.key
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn get(client: &Client, key: &str, dest: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let (mut body, len, sha256) = client.get_object(key).await?;
    let to_stdout = dest.as_deref() == Some(Path::new("-"));
    let dest = match dest {
        Some(d) if !to_stdout => d,
        None => PathBuf::from(key.rsplit('/').next().unwrap_or(key)),
        Some(_) => PathBuf::new(),
    };
    // A file is written beside its final name and renamed once whole and checked: never a half
    // file under the name.
    let part = {
        let mut name = dest.as_os_str().to_owned();
        name.push(".fleetrun-part");
        PathBuf::from(name)
    };
    let mut out: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(&part)
                .with_context(|| format!("cannot create {}", part.display()))?,
        ))
    };
    let bar = progress(len, &format!("get {key}"));
    let mut hasher = Sha256::new();
    let mut got: u64 = 0;
    let result = async {
        while let Some(chunk) = body.chunk().await? {
            hasher.update(&chunk);
            out.write_all(&chunk)?;
            got += chunk.len() as u64;
            if let Some(b) = &bar {
                b.set_position(got);
            }
        }
        out.flush()?;
        anyhow::Ok(())
    }
    .await;
    drop(out);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let checked = result.and_then(|()| {
        let local = hex(&hasher.finalize());
        if !sha256.is_empty() && local != sha256 {
            bail!("{key}: received bytes with SHA-256 {local}, the server's record says {sha256}");
        }
        if len.is_some_and(|n| n != got) {
            bail!("{key}: received {got} bytes of {}", len.unwrap_or(0));
        }
        Ok(local)
    });
    match checked {
        Ok(local) => {
            if !to_stdout {
                std::fs::rename(&part, &dest)
                    .with_context(|| format!("cannot rename to {}", dest.display()))?;
                eprintln!("{local}  {}  {}", render::bytes(got), dest.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if !to_stdout {
                let _ = std::fs::remove_file(&part);
            }
            Err(e)
        }
    }
}

async fn ls(
    ctx: &Ctx,
    client: &Client,
    prefix: &str,
    limit: u32,
    after: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let list = client.objects(prefix, after, limit).await?;
    if ctx.format == Format::Json {
        render::print_json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = render::table(&["KEY", "SIZE", "SHA-256", "CREATED", "BY"]);
    for o in &list {
        t.add_row(vec![
            o.key.clone(),
            render::bytes(o.size),
            o.sha256.clone(),
            render::ago(&o.created_at),
            o.created_by.clone(),
        ]);
    }
    render::print_table(&t)?;
    if let Some(last) = list.last()
        && list.len() == limit as usize
    {
        eprintln!("(more may follow: --after {})", last.key);
    }
    Ok(ExitCode::SUCCESS)
}
