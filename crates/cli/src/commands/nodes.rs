//! `fleetrun nodes`: the managed nodes and whether they are connected; `nodes deregister ID`;
//! `nodes tag NODE KEY=VALUE...` and `nodes untag NODE KEY...`.

use super::Ctx;
use crate::render::{self, Format};
use anyhow::bail;
use clap::Subcommand;
use fleetrun_proto::api::{Node, NodeTagsChange};
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Revoke a node: close its connection, refuse its reconnects, end its unfinished invocations.
    /// Its history is kept; it is no longer listed or targeted
    Deregister {
        /// Node id (mi-...)
        node_id: String,
    },
    /// Set tags on a node (added, or changed when the key is there); sends by tag and tag policies
    /// see them at once. Needs manage-nodes on the node as it is and as it will be
    Tag {
        /// The node: its id, name or IP address, or a target expression matching exactly one node
        node: String,
        /// Tags to set
        #[arg(value_name = "KEY=VALUE", required = true)]
        tags: Vec<String>,
    },
    /// Remove tags from a node (a key it does not have is no error)
    Untag {
        /// The node: its id, name or IP address, or a target expression matching exactly one node
        node: String,
        /// Keys to remove
        #[arg(value_name = "KEY", required = true)]
        keys: Vec<String>,
    },
}

async fn retag(ctx: &Ctx, node: &str, change: NodeTagsChange) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let id = super::exec::resolve(&client, node).await?;
    let node: Node = client.retag_node(&id, &change).await?;
    if ctx.format == Format::Json {
        render::print_json(&node)?;
    } else {
        render::emit(&format!(
            "{} ({}): {}\n",
            node.node_id,
            node.name,
            render::tags(&node.tags)
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run(ctx: &Ctx, cmd: Option<Cmd>) -> anyhow::Result<ExitCode> {
    match cmd {
        Some(Cmd::Tag { node, tags }) => {
            let mut change = NodeTagsChange::default();
            for t in tags {
                let Some((k, v)) = t.split_once('=') else {
                    bail!("tag {t:?} is not KEY=VALUE");
                };
                change.set.insert(k.to_owned(), v.to_owned());
            }
            return retag(ctx, &node, change).await;
        }
        Some(Cmd::Untag { node, keys }) => {
            let change = NodeTagsChange {
                remove: keys,
                ..Default::default()
            };
            return retag(ctx, &node, change).await;
        }
        _ => {}
    }
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
