//! `fleetrun audit`: query the audit trail; `fleetrun audit verify`: check its hash chain.

use super::Ctx;
use crate::render::{self, Format};
use clap::Subcommand;
use fleetrun_proto::api::{AuditAnchor, AuditQuery};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Only this principal (`admin`, an access key id, a node id, `anonymous`)
    #[arg(long, value_name = "P")]
    principal: Option<String>,
    /// Only this action (`commands.send`); a trailing `*` matches a prefix (`ssm.*`)
    #[arg(long, value_name = "A")]
    action: Option<String>,
    /// Only records naming this node
    #[arg(long, value_name = "ID")]
    node: Option<String>,
    /// Not older than this: a duration back from now (`1h`, `30m`) or an RFC 3339 time
    #[arg(long, value_name = "WHEN")]
    since: Option<String>,
    /// At most this many records, newest first
    #[arg(long, default_value_t = 100, value_name = "N")]
    limit: u32,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Walk the hash chain; exit 1 with the first bad record when it is broken
    Verify {
        /// A file holding the head of the last verification (`SEQ HASH`): the chain must still hold
        /// that record, so removing the newest records is found too; rewritten with the new head
        /// after an intact walk. Keep it where the server's database cannot reach.
        #[arg(long, value_name = "FILE")]
        anchor: Option<std::path::PathBuf>,
    },
}

/// Reads an anchor file (`SEQ HASH`); a missing file is no anchor yet (the first verification).
fn read_anchor(path: &std::path::Path) -> anyhow::Result<Option<AuditAnchor>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => anyhow::bail!("cannot read anchor file {}: {e}", path.display()),
    };
    let mut parts = text.split_whitespace();
    match (
        parts.next().map(str::parse::<u64>),
        parts.next(),
        parts.next(),
    ) {
        (Some(Ok(seq)), Some(hash), None) => Ok(Some(AuditAnchor {
            seq,
            hash: hash.to_owned(),
        })),
        _ => anyhow::bail!(
            "anchor file {} must hold `SEQ HASH` (as `fleetrun audit verify --anchor` writes it)",
            path.display()
        ),
    }
}

fn write_anchor(path: &std::path::Path, head: &AuditAnchor) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{} {}\n", head.seq, head.hash))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| anyhow::anyhow!("cannot write anchor file {}: {e}", path.display()))
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    if let Some(Cmd::Verify { anchor }) = args.cmd {
        let known = anchor.as_deref().map(read_anchor).transpose()?.flatten();
        let v = client.audit_verify(known.as_ref()).await?;
        if let (Some(path), Some(head)) = (&anchor, &v.head) {
            write_anchor(path, head)?;
        }
        if ctx.format == Format::Json {
            render::print_json(&v)?;
        } else if v.ok {
            render::emit(&format!("audit chain intact: {} records\n", v.records))?;
        }
        if !v.ok {
            eprintln!(
                "audit chain broken at record {}: {}",
                v.first_bad_seq.unwrap_or(0),
                v.reason.as_deref().unwrap_or("unknown reason")
            );
            return Ok(ExitCode::FAILURE);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let since = args.since.as_deref().map(since_time).transpose()?;
    let q = AuditQuery {
        principal: args.principal,
        action: args.action,
        node: args.node,
        since,
        until: None,
        limit: Some(args.limit),
    };
    let records = client.audit(&q).await?;
    if ctx.format == Format::Json {
        render::print_json(&records)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = render::table(&[
        "SEQ",
        "TIME",
        "PRINCIPAL",
        "SOURCE",
        "ACTION",
        "RESULT",
        "RESOURCES",
        "PARAMS",
    ]);
    for r in &records {
        let mut res = Vec::new();
        if !r.command_id.is_empty() {
            res.push(format!("command:{}", r.command_id));
        }
        res.extend(r.node_ids.iter().map(|n| format!("node:{n}")));
        if !r.document.is_empty() {
            res.push(format!("document:{}", r.document));
        }
        let params = if r.params.is_null() {
            String::new()
        } else {
            r.params.to_string()
        };
        t.add_row(vec![
            r.seq.to_string(),
            r.time.clone(),
            r.principal.clone(),
            r.source.clone(),
            r.action.clone(),
            r.result.clone(),
            render::or_dash(&res.join(" ")),
            render::or_dash(&render::first_line(&params, 120)),
        ]);
    }
    render::print_table(&t)?;
    Ok(ExitCode::SUCCESS)
}

/// `1h` (back from now) or an RFC 3339 time, as RFC 3339.
fn since_time(s: &str) -> anyhow::Result<String> {
    if let Some(t) = render::parse_time(s) {
        return Ok(humantime::format_rfc3339(t).to_string());
    }
    let d: Duration = humantime::parse_duration(s.trim()).map_err(|_| {
        anyhow::anyhow!("--since takes a duration (1h, 30m) or an RFC 3339 time, got {s:?}")
    })?;
    let t = SystemTime::now()
        .checked_sub(d)
        .ok_or_else(|| anyhow::anyhow!("--since {s} is too far back"))?;
    Ok(humantime::format_rfc3339(t).to_string())
}
