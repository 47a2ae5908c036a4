//! `fleetrun nodes`: the managed nodes and whether they are connected.

use super::Ctx;
use crate::render::{self, Format};
use std::process::ExitCode;

pub async fn run(ctx: &Ctx) -> anyhow::Result<ExitCode> {
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
