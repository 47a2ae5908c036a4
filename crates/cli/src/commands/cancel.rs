//! `fleetrun cancel`: stop a command on all its nodes, or on some.

use super::{Ctx, parse_command_id, parse_node_ids};
use crate::render::{self, Format};
use fleetrun_proto::api::CancelCommand;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The command id
    #[arg(value_name = "COMMAND_ID")]
    command: String,
    /// Only this node's invocation (repeatable); all of them when not given
    #[arg(long = "node", value_name = "NODE_ID")]
    nodes: Vec<String>,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let id = parse_command_id(&args.command)?;
    let node_ids = parse_node_ids(&args.nodes)?;
    let c = ctx
        .client()?
        .cancel(&id, &CancelCommand { node_ids })
        .await?;
    if ctx.format == Format::Json {
        render::print_json(&c)?;
    } else {
        render::emit(&format!(
            "{}  {}  {}\n",
            c.command_id, c.status, c.status_details
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}
