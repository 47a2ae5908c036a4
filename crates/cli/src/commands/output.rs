//! `fleetrun output`: one invocation's stdout or stderr, copied byte for byte as it arrives.

use super::{Ctx, parse_command_id};
use crate::client::{Client, RETRY_DELAY_FIRST, RETRY_DELAY_MAX, Stream, is_retryable};
use anyhow::Context;
use fleetrun_proto::{CommandId, NodeId};
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The command id
    #[arg(value_name = "COMMAND_ID")]
    command: String,
    /// The node id
    #[arg(value_name = "NODE_ID")]
    node: String,
    /// Print stderr instead of stdout
    #[arg(long)]
    stderr: bool,
    /// Keep printing output as it is produced, until the invocation ends
    #[arg(long, short = 'f')]
    follow: bool,
}

/// How long `--follow` keeps trying to reconnect after the connection is lost, before it gives up.
pub const FOLLOW_RECONNECT_FOR: Duration = Duration::from_secs(300);

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let id = parse_command_id(&args.command)?;
    let node = args.node.trim().parse()?;
    let stream = if args.stderr {
        Stream::Stderr
    } else {
        Stream::Stdout
    };
    let client = ctx.client()?;
    // Raw bytes, flushed per chunk: output need not be UTF-8, and `--follow` must show lines as they come.
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // Bytes written so far: a reconnect asks for the rest from there, so nothing shows twice.
    let mut written: u64 = 0;
    // When the connection was lost (None while connected), to bound the reconnecting.
    let mut lost: Option<(Instant, Duration)> = None;
    loop {
        let r = copy(
            &client,
            &id,
            &node,
            stream,
            args.follow,
            &mut written,
            &mut out,
            &mut lost,
        )
        .await;
        let e = match r {
            Ok(()) => return Ok(ExitCode::SUCCESS),
            Err(e) if args.follow && is_retryable(&e) => e,
            Err(e) => return Err(e),
        };
        let (since, delay) = match lost {
            Some(l) => l,
            None => {
                eprintln!("connection lost ({e}); reconnecting…");
                (Instant::now(), RETRY_DELAY_FIRST)
            }
        };
        if since.elapsed() >= FOLLOW_RECONNECT_FOR {
            return Err(e.context(format!(
                "gave up reconnecting after {} s ({written} bytes shown)",
                FOLLOW_RECONNECT_FOR.as_secs()
            )));
        }
        tokio::time::sleep(delay).await;
        lost = Some((since, (delay * 2).min(RETRY_DELAY_MAX)));
    }
}

/// One request: copies the output from byte `written` on, counting what it writes.
#[allow(clippy::too_many_arguments)]
async fn copy(
    client: &Client,
    id: &CommandId,
    node: &NodeId,
    stream: Stream,
    follow: bool,
    written: &mut u64,
    out: &mut impl Write,
    lost: &mut Option<(Instant, Duration)>,
) -> anyhow::Result<()> {
    let mut body = client.output(id, node, stream, follow, *written).await?;
    if lost.take().is_some() {
        eprintln!("reconnected; continuing from byte {written}");
    }
    while let Some(chunk) = body.chunk().await? {
        out.write_all(&chunk)
            .and_then(|()| out.flush())
            .context("cannot write to stdout")?;
        *written += chunk.len() as u64;
    }
    Ok(())
}
