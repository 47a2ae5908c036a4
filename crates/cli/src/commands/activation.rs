//! `fleetrun activation create|list|delete`: codes that agents register with.

use super::Ctx;
use crate::render::{self, Format};
use anyhow::Context;
use fleetrun_proto::api::CreateActivation;
use fleetrun_proto::targets::parse_tag;
use std::collections::BTreeMap;
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Create an activation and print its code (shown only this once)
    Create(CreateArgs),
    /// List activations (codes are not shown)
    List,
    /// Delete an activation: no node registers with it any more (nodes that did stay)
    Delete {
        /// The activation id
        activation_id: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Tag given to every node that registers with it (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    tags: Vec<String>,
    /// Most nodes that may register with it [server default: 1]
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// How long it stays valid, e.g. 30m, 24h, 7days [server default: 24h]
    #[arg(long, value_name = "DURATION")]
    expires: Option<String>,
    /// A note for operators
    #[arg(long, default_value = "")]
    description: String,
    /// The name every node registering with it gets [default: each agent's own --name]
    #[arg(long, value_name = "NAME")]
    default_name: Option<String>,
}

pub async fn run(ctx: &Ctx, cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Create(args) => create(ctx, args).await,
        Cmd::List => list(ctx).await,
        Cmd::Delete { activation_id } => {
            ctx.client()?
                .delete_activation(activation_id.trim())
                .await?;
            if ctx.format == Format::Table {
                render::emit(&format!("activation {} deleted\n", activation_id.trim()))?;
            } else {
                render::print_json(&serde_json::json!({ "deleted": activation_id.trim() }))?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn create(ctx: &Ctx, args: CreateArgs) -> anyhow::Result<ExitCode> {
    let mut tags = BTreeMap::new();
    for t in &args.tags {
        let (k, v) = parse_tag(t)?;
        tags.insert(k, v);
    }
    let expires_in_secs = args
        .expires
        .as_deref()
        .map(|s| {
            humantime::parse_duration(s)
                .with_context(|| format!("--expires {s:?} must be a duration like 30m or 24h"))
                .map(|d| d.as_secs())
        })
        .transpose()?;
    let client = ctx.client()?;
    let a = client
        .create_activation(&CreateActivation {
            tags,
            limit: args.limit,
            expires_in_secs,
            description: args.description,
            default_instance_name: args.default_name.unwrap_or_default(),
        })
        .await?;
    if ctx.format == Format::Json {
        render::print_json(&a)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = render::table(&["CODE", "ACTIVATION ID", "TAGS", "LIMIT", "EXPIRES"]);
    t.add_row(vec![
        a.code.clone(),
        a.activation_id.clone(),
        render::tags(&a.tags),
        a.limit.to_string(),
        render::ago(&a.expires_at),
    ]);
    render::print_table(&t)?;
    let trust = match &a.ca_fingerprint {
        Some(f) => {
            eprintln!("\nserver CA fingerprint (SHA-256): {f}");
            format!(" --ca-fingerprint {f}")
        }
        None => String::new(),
    };
    let insecure = if client.base().starts_with("http://") {
        " --insecure-http"
    } else {
        ""
    };
    eprintln!(
        "\nregister an agent with:\n  fleetrun-agent --server {} --state-dir /var/lib/fleetrun-agent --activation-code {}{trust}{insecure}",
        client.base(),
        a.code
    );
    Ok(ExitCode::SUCCESS)
}

async fn list(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let list = ctx.client()?.activations().await?;
    if ctx.format == Format::Json {
        render::print_json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = render::table(&[
        "ACTIVATION ID",
        "TAGS",
        "REGISTERED",
        "CREATED",
        "EXPIRES",
        "DESCRIPTION",
    ]);
    for a in &list {
        let expires = if a.expired {
            "expired".to_owned()
        } else {
            render::ago(&a.expires_at)
        };
        t.add_row(vec![
            a.activation_id.clone(),
            render::tags(&a.tags),
            format!("{}/{}", a.registrations, a.limit),
            render::ago(&a.created_at),
            expires,
            a.description.clone(),
        ]);
    }
    render::print_table(&t)?;
    Ok(ExitCode::SUCCESS)
}
