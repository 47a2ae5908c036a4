//! `fleetrun nodes`: the managed nodes and whether they are connected; `nodes deregister ID`.

use super::Ctx;
use crate::render::{self, Format};
use clap::Subcommand;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Revoke a node: close its connection, refuse its reconnects, end its unfinished invocations.
    /// Its history is kept; it is no longer listed or targeted
    Deregister {
        /// Node id (mi-...)
        node_id: String,
    },
}

pub async fn run(ctx: &Ctx, cmd: Option<Cmd>) -> anyhow::Result<ExitCode> {
    if let Some(Cmd::Deregister { node_id }) = cmd {
        let id = node_id.trim().parse()?;
        let node = ctx.client()?.deregister_node(&id).await?;
        if ctx.format == Format::Json {
            render::print_json(&node)?;
        } else {
            render::emit(&format!("deregistered {} ({})\n", node.node_id, node.name))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let nodes = ctx.client()?.nodes().await?;
    if ctx.format == Format::Json {
        render::print_json(&nodes)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = render::table(&[
        "NODE ID",
        "NAME",
        "PING",
        "LAST SEEN",
        "HOSTNAME",
        "OS",
        "ARCH",
        "IPS",
        "AGENT",
        "TAGS",
    ]);
    for n in &nodes {
        t.add_row(vec![
            n.node_id.to_string(),
            n.name.clone(),
            n.ping_status.clone(),
            render::ago(&n.last_seen),
            n.hostname.clone(),
            n.os.clone(),
            n.arch.clone(),
            n.ips.join(","),
            n.agent_version.clone(),
            render::tags(&n.tags),
        ]);
    }
    render::print_table(&t)?;
    Ok(ExitCode::SUCCESS)
}
