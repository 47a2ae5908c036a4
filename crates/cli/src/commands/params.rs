//! `fleetrun params put|list|get|delete`: the parameter store. Scripts reference a parameter as
//! `{{param:NAME}}`; the server substitutes it only in what it delivers to the node. Secure values
//! are never shown back.

use super::Ctx;
use crate::render::{self, Format};
use anyhow::{Context, bail};
use fleetrun_proto::params::{PARAM_VALUE_MAX, Param, PutParam, name_error};
use std::io::Read;
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Create a parameter, or replace its value (a new version)
    Put(PutArgs),
    /// List parameters (values of secure ones are never shown)
    List,
    /// Show one parameter (the value of a secure one is never shown)
    Get(NameArg),
    /// Delete a parameter; commands that reference it and are not yet delivered fail
    Delete(NameArg),
}

#[derive(Debug, clap::Args)]
pub struct PutArgs {
    /// 1 to 1011 of A-Z a-z 0-9 _ . - /
    #[arg(value_name = "NAME")]
    name: String,
    /// The value (at most 4096 bytes); `-` reads it from stdin (one trailing newline dropped), which
    /// keeps secrets out of shell history
    #[arg(value_name = "VALUE", allow_hyphen_values = true)]
    value: String,
    /// Encrypt the value at rest; it is never shown in listings, audit records or command output
    #[arg(long)]
    secure: bool,
}

#[derive(Debug, clap::Args)]
pub struct NameArg {
    /// The parameter's name
    #[arg(value_name = "NAME")]
    name: String,
}

pub async fn run(ctx: &Ctx, cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Put(args) => put(ctx, args).await,
        Cmd::List => list(ctx).await,
        Cmd::Get(a) => get(ctx, a).await,
        Cmd::Delete(a) => delete(ctx, a).await,
    }
}

fn check_name(name: &str) -> anyhow::Result<()> {
    match name_error(name) {
        Some(e) => bail!("{e}"),
        None => Ok(()),
    }
}

async fn put(ctx: &Ctx, args: PutArgs) -> anyhow::Result<ExitCode> {
    check_name(&args.name)?;
    let value = if args.value == "-" {
        let mut v = String::new();
        std::io::stdin()
            .take(PARAM_VALUE_MAX as u64 + 2)
            .read_to_string(&mut v)
            .context("cannot read the value from stdin (it must be UTF-8)")?;
        if v.ends_with('\n') {
            v.pop();
            if v.ends_with('\r') {
                v.pop();
            }
        }
        v
    } else {
        args.value
    };
    if value.is_empty() {
        bail!("the value is empty");
    }
    if value.len() > PARAM_VALUE_MAX {
        bail!("the value is longer than {PARAM_VALUE_MAX} bytes");
    }
    let p = ctx
        .client()?
        .put_param(
            &args.name,
            &PutParam {
                value,
                secure: args.secure,
            },
        )
        .await?;
    print(ctx, &[p], false)
}

async fn list(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let ps = ctx.client()?.params().await?;
    print(ctx, &ps, true)
}

async fn get(ctx: &Ctx, a: NameArg) -> anyhow::Result<ExitCode> {
    check_name(&a.name)?;
    let p = ctx.client()?.param(&a.name).await?;
    print(ctx, &[p], false)
}

async fn delete(ctx: &Ctx, a: NameArg) -> anyhow::Result<ExitCode> {
    check_name(&a.name)?;
    ctx.client()?.delete_param(&a.name).await?;
    if ctx.format == Format::Json {
        render::print_json(&serde_json::json!({"deleted": a.name}))?;
    } else {
        eprintln!("deleted parameter {}", a.name);
    }
    Ok(ExitCode::SUCCESS)
}

/// A table of parameters (`-o json`: the list, or the one object).
fn print(ctx: &Ctx, ps: &[Param], as_list: bool) -> anyhow::Result<ExitCode> {
    if ctx.format == Format::Json {
        match ps {
            [one] if !as_list => render::print_json(one)?,
            _ => render::print_json(&ps)?,
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = render::table(&["NAME", "TYPE", "VERSION", "UPDATED", "BY", "VALUE"]);
    for p in ps {
        t.add_row(vec![
            p.name.clone(),
            if p.secure { "secure" } else { "plain" }.to_owned(),
            p.version.to_string(),
            render::ago(&p.updated_at),
            p.updated_by.clone(),
            match &p.value {
                Some(v) => render::first_line(v, 60),
                None => "****".to_owned(),
            },
        ]);
    }
    render::print_table(&t)?;
    Ok(ExitCode::SUCCESS)
}
