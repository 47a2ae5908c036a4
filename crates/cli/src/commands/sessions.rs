//! `fleetrun sessions`: the session records (execs), newest first; `sessions show ID`,
//! `sessions terminate ID`.

use super::Ctx;
use crate::render::{self, Format};
use clap::{Args as ClapArgs, Subcommand};
use fleetrun_proto::api::Session;
use std::process::ExitCode;

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Only the running ones
    #[arg(long)]
    active: bool,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Show one session
    Show {
        /// Session id
        session_id: String,
    },
    /// End a running session: the node's process is stopped, its client told who ended it
    Terminate {
        /// Session id
        session_id: String,
    },
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let sessions = match args.cmd {
        Some(Cmd::Show { session_id }) => {
            let s = client.session(session_id.trim()).await?;
            if ctx.format == Format::Json {
                render::print_json(&s)?;
            } else {
                print(std::slice::from_ref(&s))?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        Some(Cmd::Terminate { session_id }) => {
            let s = client.terminate_session(session_id.trim()).await?;
            if ctx.format == Format::Json {
                render::print_json(&s)?;
            } else {
                render::emit(&format!(
                    "terminated session {} on {}\n",
                    s.session_id, s.node_id
                ))?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        None => client.sessions(args.active).await?,
    };
    if ctx.format == Format::Json {
        render::print_json(&sessions)?;
        return Ok(ExitCode::SUCCESS);
    }
    print(&sessions)?;
    Ok(ExitCode::SUCCESS)
}

fn print(sessions: &[Session]) -> anyhow::Result<()> {
    let mut t = render::table(&[
        "SESSION ID",
        "NODE ID",
        "PRINCIPAL",
        "STATUS",
        "STARTED",
        "DURATION",
        "EXIT",
        "IN",
        "OUT",
        "REASON",
        "COMMAND",
    ]);
    for s in sessions {
        t.add_row(vec![
            s.session_id.clone(),
            s.node_id.to_string(),
            s.principal.clone(),
            format!("{:?}", s.status),
            render::ago(&s.started_at),
            render::between(Some(&s.started_at), s.ended_at.as_deref()),
            render::opt(s.exit_code),
            render::bytes(s.bytes_in),
            render::bytes(s.bytes_out),
            render::or_dash(&s.end_reason),
            render::first_line(&s.command, 40),
        ]);
    }
    render::print_table(&t)
}
