//! `fleetrun sessions`: the session records (execs), newest first; `sessions show ID`,
//! `sessions terminate ID`, and a session's recording: `sessions recording ID`, `sessions play ID`
//! (in `recording.rs`).

use super::Ctx;
use super::recording::{self, Pace};
use crate::render::{self, Format};
use clap::{Args as ClapArgs, Subcommand};
use fleetrun_proto::api::{RecordingStatus, Session};
use std::process::ExitCode;

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Only the running ones
    #[arg(long)]
    active: bool,
    /// Most sessions to list (all by default, page by page)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// Sessions asked for per request (the server answers at most 1000)
    #[arg(long, value_name = "N", default_value_t = PAGE_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..=PAGE_MAX))]
    page_size: u32,
}

/// Sessions per request unless `--page-size` says otherwise.
const PAGE_DEFAULT: u32 = 200;
/// The most the server answers in one page (`fleetrun_store::SESSIONS_PAGE_MAX`).
const PAGE_MAX: i64 = 1_000;

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
    /// Write an ended session's recording (asciicast v2, which asciinema plays) to stdout
    Recording {
        /// Session id
        session_id: String,
        /// Write it even when stdout is a terminal
        #[arg(long)]
        force: bool,
    },
    /// Replay an ended session's recording in this terminal, with its timings (Ctrl-C stops)
    Play {
        /// Session id
        session_id: String,
        /// Times faster than recorded, e.g. 2 or 0.5
        #[arg(long, value_name = "N", default_value = "1", value_parser = recording::parse_speed)]
        speed: f64,
        /// Cut pauses longer than 1 s (or --max-idle) to that
        #[arg(long)]
        skip_idle: bool,
        /// Cut pauses longer than SECS to SECS (implies --skip-idle)
        #[arg(long, value_name = "SECS", value_parser = recording::parse_idle)]
        max_idle: Option<f64>,
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
        Some(Cmd::Recording { session_id, force }) => {
            return recording::download(&client, session_id.trim(), force).await;
        }
        Some(Cmd::Play {
            session_id,
            speed,
            skip_idle,
            max_idle,
        }) => {
            let max_idle = max_idle.or(skip_idle.then_some(recording::SKIP_IDLE_DEFAULT));
            let pace = Pace { speed, max_idle };
            return recording::play(&client, session_id.trim(), pace).await;
        }
        None => list(&client, &args).await?,
    };
    if ctx.format == Format::Json {
        render::print_json(&sessions)?;
        return Ok(ExitCode::SUCCESS);
    }
    print(&sessions)?;
    Ok(ExitCode::SUCCESS)
}

/// Every session (or the first `--limit`), following the pages: each next one starts after the
/// last session of the one before, and a short page is the last.
async fn list(client: &crate::client::Client, args: &Args) -> anyhow::Result<Vec<Session>> {
    let mut all: Vec<Session> = Vec::new();
    loop {
        let left = args.limit.map_or(u64::MAX, |n| n - all.len() as u64);
        let want = u32::try_from(left).unwrap_or(u32::MAX).min(args.page_size);
        if want == 0 {
            return Ok(all);
        }
        let before = all.last().map(|s| s.session_id.as_str());
        let page = client.sessions(args.active, want, before).await?;
        let done = page.len() < want as usize;
        all.extend(page);
        if done {
            return Ok(all);
        }
    }
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
        "RECORDING",
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
            recording_cell(s),
            render::first_line(&s.command, 40),
        ]);
    }
    render::print_table(&t)
}

/// Its recording: the size once stored, else where it is.
fn recording_cell(s: &Session) -> String {
    match s.recording {
        RecordingStatus::None => "-".into(),
        RecordingStatus::Recording => "recording".into(),
        RecordingStatus::Complete => render::bytes(s.recording_bytes),
        RecordingStatus::Failed => "failed".into(),
    }
}
