//! `fleetrun commands`, `fleetrun command CMD`, `fleetrun invocations CMD`: what was sent and how it went.

use super::{Ctx, parse_command_id};
use crate::render::{self, Format};
use fleetrun_proto::api::{Command, DOCUMENT_RUN_SHELL_SCRIPT, Invocation};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Most commands to list (the server's default is 50, its maximum 1000)
    #[arg(long, value_name = "N")]
    limit: Option<u32>,
    /// The page after this one: a command id (the last of the previous page) or an RFC 3339 time
    /// (commands requested before it)
    #[arg(long, value_name = "CURSOR")]
    before: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The command id
    #[arg(value_name = "COMMAND_ID")]
    command: String,
}

pub async fn list(ctx: &Ctx, args: ListArgs) -> anyhow::Result<ExitCode> {
    let list = ctx
        .client()?
        .commands(args.limit, args.before.as_deref())
        .await?;
    if ctx.format == Format::Json {
        render::print_json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = render::table(&[
        "COMMAND ID",
        "REQUESTED",
        "STATUS",
        "DETAILS",
        "TARGETS",
        "DONE",
        "ERRORS",
        "SCRIPT",
    ]);
    for c in &list {
        t.add_row(vec![
            c.command_id.to_string(),
            render::ago(&c.requested_at),
            c.status.to_string(),
            c.status_details.clone(),
            targets(c),
            format!("{}/{}", c.completed_count, c.target_count),
            c.error_count.to_string(),
            render::first_line(&what(c), 40),
        ]);
    }
    render::print_table(&t)?;
    // A full page may have more behind it: say how to get it.
    if let Some(last) = list.last()
        && list.len() == args.limit.map_or(PAGE_DEFAULT, |n| n as usize)
    {
        eprintln!("(more may follow: --before {})", last.command_id);
    }
    Ok(ExitCode::SUCCESS)
}

/// The server's page when no `--limit` is given.
const PAGE_DEFAULT: usize = 50;

pub async fn show(ctx: &Ctx, args: ShowArgs) -> anyhow::Result<ExitCode> {
    let id = parse_command_id(&args.command)?;
    let c = ctx.client()?.command(&id).await?;
    if ctx.format == Format::Json {
        render::print_json(&c)?;
        return Ok(ExitCode::SUCCESS);
    }
    print_command(&c)?;
    Ok(ExitCode::SUCCESS)
}

pub async fn invocations(ctx: &Ctx, args: ShowArgs) -> anyhow::Result<ExitCode> {
    let id = parse_command_id(&args.command)?;
    let list = ctx.client()?.invocations(&id).await?;
    if ctx.format == Format::Json {
        render::print_json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = render::table(&[
        "NODE ID",
        "NAME",
        "STATUS",
        "DETAILS",
        "EXIT",
        "STARTED",
        "WALL",
        "CPU USER ms",
        "CPU SYS ms",
        "MAX RSS KB",
        "LIMITS",
    ]);
    for i in &list {
        t.add_row(vec![
            i.node_id.to_string(),
            i.node_name.clone(),
            i.status.to_string(),
            i.status_details.clone(),
            render::exit_code(i.exit_code, i.signal),
            render::ago_opt(i.started_at.as_deref()),
            wall(i),
            render::opt(i.cpu_user_ms),
            render::opt(i.cpu_system_ms),
            render::opt(i.max_rss_kb),
            render::or_dash(&i.limits_applied),
        ]);
    }
    render::print_table(&t)?;
    Ok(ExitCode::SUCCESS)
}

/// The command's key facts, one per line.
pub fn header(c: &Command) -> String {
    let mut lines = vec![
        format!("command:      {}", c.command_id),
        format!("status:       {} ({})", c.status, c.status_details),
        format!("requested:    {}", render::ago(&c.requested_at)),
        format!("targets:      {}", targets(c)),
        format!(
            "progress:     {}/{} done, {} errors, {} not delivered",
            c.completed_count, c.target_count, c.error_count, c.delivery_timed_out_count
        ),
        format!(
            "rate:         max concurrency {}, max errors {}",
            c.max_concurrency, c.max_errors
        ),
        format!(
            "timeouts:     execution {}s, delivery {}s",
            c.execution_timeout_secs, c.delivery_timeout_secs
        ),
    ];
    if !c.run_as.is_empty() {
        lines.push(format!("run as:       {}", c.run_as));
    }
    if let Some(l) = limits(c) {
        lines.push(format!("limits:       {l}"));
    }
    if !c.comment.is_empty() {
        lines.push(format!("comment:      {}", c.comment));
    }
    if let Some(s3) = &c.output_s3 {
        let place = match s3.prefix.trim_matches('/') {
            "" => format!("s3://{}", s3.bucket),
            p => format!("s3://{}/{p}", s3.bucket),
        };
        let pending = c
            .invocations
            .iter()
            .filter(|i| i.output_s3_pending.is_some())
            .count();
        let note = if pending > 0 {
            format!(" ({pending} not written yet)")
        } else {
            String::new()
        };
        lines.push(format!("output to:    {place}{note}"));
    }
    if c.document_name == DOCUMENT_RUN_SHELL_SCRIPT {
        lines.push(format!(
            "script:       {}",
            render::first_line(&script(c), 80)
        ));
    } else {
        lines.push(format!(
            "document:     {} version {}",
            c.document_name,
            render::or_dash(&c.document_version)
        ));
        lines.push(format!(
            "parameters:   {}",
            render::or_dash(&render::first_line(&parameters(c), 80))
        ));
    }
    lines.push(String::new());
    lines.join("\n")
}

/// Prints the header and the per-node summary.
pub fn print_command(c: &Command) -> anyhow::Result<()> {
    render::emit(&header(c))?;
    render::emit("\n")?;
    print_summary(&c.invocations)
}

/// One line per invocation: where, how it ended, what it cost, and its first line of output.
pub fn print_summary(invocations: &[Invocation]) -> anyhow::Result<()> {
    let mut t = render::table(&[
        "NODE", "NAME", "STATUS", "DETAILS", "EXIT", "CPU ms", "MAX RSS", "STDOUT",
    ]);
    for i in invocations {
        let cpu = match (i.cpu_user_ms, i.cpu_system_ms) {
            (None, None) => None,
            (u, s) => Some(u.unwrap_or(0) + s.unwrap_or(0)),
        };
        t.add_row(vec![
            i.node_id.to_string(),
            i.node_name.clone(),
            i.status.to_string(),
            i.status_details.clone(),
            render::exit_code(i.exit_code, i.signal),
            render::opt(cpu),
            i.max_rss_kb
                .map(|kb| format!("{kb} KB"))
                .unwrap_or_else(|| "-".into()),
            render::first_line(&i.stdout, 60),
        ]);
    }
    render::print_table(&t)
}

/// The command's resource limits (`memory 64 MiB, cpu 50%`), if it has any.
fn limits(c: &Command) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(mb) = c.memory_limit_mb {
        parts.push(format!("memory {mb} MiB"));
    }
    if let Some(pct) = c.cpu_limit_percent {
        parts.push(format!("cpu {pct}% of one core"));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// How long an invocation ran: the node's measure when it has ended, else from the stored times.
fn wall(i: &Invocation) -> String {
    match i.wall_ms {
        Some(ms) => render::duration_ms(ms),
        None => render::between(i.started_at.as_deref(), i.finished_at.as_deref()),
    }
}

/// Node ids and target expression, as asked for.
fn targets(c: &Command) -> String {
    let mut parts: Vec<String> = c.node_ids.iter().map(ToString::to_string).collect();
    if !c.targets.is_empty() {
        parts.push(c.targets.clone());
    }
    parts.join(" ")
}

/// What a command runs: AWS-RunShellScript's script, else the document, its version and parameters.
fn what(c: &Command) -> String {
    if c.document_name == DOCUMENT_RUN_SHELL_SCRIPT {
        return script(c);
    }
    let params = parameters(c);
    let mut s = format!("{} v{}", c.document_name, c.document_version);
    if !params.is_empty() {
        s.push(' ');
        s.push_str(&params);
    }
    s
}

/// A document's parameters as given: `k=v k2=a,b`.
fn parameters(c: &Command) -> String {
    let parts: Vec<String> = c
        .parameters
        .iter()
        .map(|(k, v)| format!("{k}={}", v.join(",")))
        .collect();
    parts.join(" ")
}

/// The script's lines, joined.
fn script(c: &Command) -> String {
    c.parameters
        .get("commands")
        .map(|lines| lines.join("\n"))
        .unwrap_or_default()
}
