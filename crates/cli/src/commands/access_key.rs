//! `fleetrun access-key create|list`: SigV4 keys for the SSM-compatible API (AWS CLI, boto3, SDKs).

use super::Ctx;
use crate::render::{self, Format};
use anyhow::bail;
use fleetrun_proto::api::CreateAccessKey;
use std::process::ExitCode;

/// Longest note the server takes, in bytes.
const NAME_MAX: usize = 128;

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Create an access key and print its secret (shown only this once)
    Create(CreateArgs),
    /// List access keys (secrets are not shown)
    List,
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// A note saying what the key is for (at most 128 bytes)
    #[arg(long, value_name = "NOTE")]
    name: Option<String>,
    /// The user the key acts as (default: you; another user's needs manage-access-keys)
    #[arg(long)]
    user: Option<String>,
}

pub async fn run(ctx: &Ctx, cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Create(args) => create(ctx, args).await,
        Cmd::List => list(ctx).await,
    }
}

async fn create(ctx: &Ctx, args: CreateArgs) -> anyhow::Result<ExitCode> {
    let name = args.name.unwrap_or_default();
    if name.len() > NAME_MAX {
        bail!("--name is longer than {NAME_MAX} bytes");
    }
    let client = ctx.client()?;
    let key = client
        .create_access_key(&CreateAccessKey {
            name,
            user: args.user,
        })
        .await?;
    if ctx.format == Format::Json {
        render::print_json(&key)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = render::table(&["ACCESS KEY ID", "SECRET ACCESS KEY", "USER", "NAME"]);
    t.add_row(vec![
        key.access_key_id.clone(),
        key.secret_access_key.clone(),
        key.user.clone(),
        key.name.clone(),
    ]);
    render::print_table(&t)?;
    eprintln!(
        "\nthe secret is shown only this once; use the key with the AWS CLI or an SDK (any region):\n  \
         export AWS_ACCESS_KEY_ID={} AWS_SECRET_ACCESS_KEY={} AWS_DEFAULT_REGION=us-east-1\n  \
         aws ssm describe-instance-information --endpoint-url {}",
        key.access_key_id,
        key.secret_access_key,
        client.base()
    );
    Ok(ExitCode::SUCCESS)
}

async fn list(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let keys = ctx.client()?.access_keys().await?;
    if ctx.format == Format::Json {
        render::print_json(&keys)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = render::table(&["ACCESS KEY ID", "USER", "NAME", "CREATED"]);
    for k in &keys {
        t.add_row(vec![
            k.access_key_id.clone(),
            k.user.clone(),
            k.name.clone(),
            render::ago(&k.created_at),
        ]);
    }
    render::print_table(&t)?;
    Ok(ExitCode::SUCCESS)
}
