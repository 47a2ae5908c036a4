//! `fleetrun output`: one invocation's stdout or stderr, copied byte for byte as it arrives.

use super::{Ctx, parse_command_id};
use crate::client::Stream;
use anyhow::Context;
use std::io::Write;
use std::process::ExitCode;

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

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let id = parse_command_id(&args.command)?;
    let node = args.node.trim().parse()?;
    let stream = if args.stderr {
        Stream::Stderr
    } else {
        Stream::Stdout
    };
    let client = ctx.client()?;
    let mut body = client.output(&id, &node, stream, args.follow).await?;
    // Raw bytes, flushed per chunk: output need not be UTF-8, and `--follow` must show lines as they come.
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    while let Some(chunk) = body.chunk().await? {
        out.write_all(&chunk)
            .and_then(|()| out.flush())
            .context("cannot write to stdout")?;
    }
    Ok(ExitCode::SUCCESS)
}
