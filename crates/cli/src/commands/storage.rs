//! `fleetrun storage`: how much the server keeps (database, output, rows) and for how long.

use super::Ctx;
use crate::render::{self, Format};
use std::process::ExitCode;
use std::time::Duration;

pub async fn run(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let s = ctx.client()?.storage().await?;
    if ctx.format == Format::Json {
        render::print_json(&s)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = render::table(&["WHAT", "VALUE"]);
    let oldest = match &s.oldest_command_at {
        Some(at) => format!("{} ({at})", render::ago(at)),
        None => "-".into(),
    };
    for (what, value) in [
        ("database", render::bytes(s.database_bytes)),
        ("output", render::bytes(s.output_bytes)),
        ("commands", s.commands.to_string()),
        ("invocations", s.invocations.to_string()),
        (
            "retention",
            humantime::format_duration(Duration::from_secs(s.retention_secs)).to_string(),
        ),
        ("oldest command", oldest),
        ("output queued for S3", s.output_s3_queued.to_string()),
    ] {
        t.add_row(vec![what.to_owned(), value]);
    }
    render::print_table(&t)?;
    Ok(ExitCode::SUCCESS)
}
