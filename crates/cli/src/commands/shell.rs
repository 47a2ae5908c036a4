//! `fleetrun shell NODE`: an interactive login shell on one node, on a PTY there, with our
//! terminal in raw mode so every key (Ctrl-C, Ctrl-Z, arrows) goes to the remote side as bytes;
//! our window's size follows SIGWINCH. `fleetrun shell NODE -c CMD` runs one command, the same
//! as `fleetrun exec` (no PTY unless `-t`). The exit status is the remote shell's.
//!
//! The local terminal is restored on every way out: the [`RawMode`] guard on return (an exit, an
//! error, SIGTERM/SIGHUP/SIGINT to us, the server or the agent going away, all of which end the
//! relay) and a panic hook for a panic on any thread.

use super::Ctx;
use super::exec;
use anyhow::Context;
use fleetrun_proto::stream::client::{ExecRequest, PtyRequest};
use std::io::IsTerminal;
use std::process::ExitCode;
use tokio::sync::watch;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Without -c: the login shell of the user (--run-as, else the agent's) on a PTY, as `ssh HOST` gives.
Our terminal is put in raw mode for the session, so Ctrl-C, Ctrl-Z and Ctrl-D reach the remote
shell; it is restored when the session ends, however it ends. TERM is ours (xterm-256color when
unset); the remote window follows ours. Stdin must be a terminal (else give -c, or -t to get a PTY
anyway).

With -c CMD: the command, by `sh -c` without a PTY (exactly `fleetrun exec NODE -- CMD`: stdout and
stderr apart, our stdin piped to it when it is not a terminal), or by the user's shell on a PTY
with -t.

With --stream-url URL --session-token TOKEN: the session SSM's StartSession started (its StreamUrl
and TokenValue), which runs what StartSession said: the login shell, or AWS-StartInteractiveCommand's
command, on a PTY. No API token is needed: the session token is good once, for 60 s.

The exit status is the remote shell's or command's (128 + N when signal N ended it).")]
pub struct Args {
    /// The node: its id; its name or IP address, or a target expression (tag:KEY=VALUE,
    /// tag-key:KEY, id:ID; terms ANDed), when exactly one node has it
    #[arg(value_name = "NODE", required_unless_present = "stream_url")]
    node: Option<String>,
    /// Run this command instead of the interactive shell
    #[arg(short = 'c', long = "command", value_name = "CMD")]
    command: Option<String>,
    /// Give the session a PTY even with -c or when stdin is not a terminal
    #[arg(short = 't', long = "tty")]
    tty: bool,
    /// Run as this user on the node (the agent must run as root)
    #[arg(long, value_name = "USER")]
    run_as: Option<String>,
    /// Working directory on the node (with -c and no PTY; a shell starts in the user's home)
    #[arg(long, value_name = "DIR", requires = "command", conflicts_with = "tty")]
    cwd: Option<String>,
    /// Join the session SSM's StartSession started: its StreamUrl (the node, and the shell or
    /// command, are the session's)
    #[arg(long, value_name = "URL", conflicts_with_all = ["node", "command", "cwd"], requires = "session_token")]
    stream_url: Option<String>,
    /// StartSession's TokenValue, for --stream-url (good once, for 60 s)
    #[arg(
        long,
        value_name = "TOKEN",
        env = "FLEETRUN_SESSION_TOKEN",
        hide_env_values = true,
        requires = "stream_url"
    )]
    session_token: Option<String>,
}

/// `TERM` sent when ours is unset or empty: what most terminal emulators are today.
pub const TERM_DEFAULT: &str = "xterm-256color";
/// The window size sent when ours cannot be read (stdout is not a terminal).
const SIZE_DEFAULT: (u16, u16) = (24, 80);

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let stdin_is_tty = std::io::stdin().is_terminal();
    let pty = args.tty || args.command.is_none();
    if pty && !args.tty && !stdin_is_tty {
        anyhow::bail!(
            "stdin is not a terminal: give the command with -c CMD (it reads our stdin), or -t for a PTY anyway"
        );
    }
    let (client, path) = match (args.stream_url, args.session_token) {
        (Some(url), Some(token)) => ctx.stream_client(&url, token)?,
        _ => {
            let client = ctx.client()?;
            let given = args.node.unwrap_or_default();
            let node = exec::resolve(&client, &given).await?;
            (client, format!("/v1/nodes/{node}/exec"))
        }
    };
    let open = async |req: &ExecRequest| {
        let ws = client
            .socket(&path)
            .await
            .context("cannot open the session")?;
        exec::start(ws, req).await
    };
    let mut req = ExecRequest {
        command: args.command.unwrap_or_default(),
        run_as: args.run_as.unwrap_or_default(),
        env: Default::default(),
        working_dir: args.cwd.unwrap_or_default(),
        pty: None,
    };
    if !pty {
        // `fleetrun exec`'s path, unchanged.
        let signals = exec::Signals::catch()?;
        let ws = open(&req).await?;
        return exec::relay(ws, !stdin_is_tty, None, signals).await;
    }
    let (rows, cols) = window_size();
    let term = std::env::var("TERM")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| TERM_DEFAULT.to_owned());
    req.pty = Some(PtyRequest { term, rows, cols });
    let signals = exec::Signals::catch()?;
    let ws = open(&req).await?;
    let (size_tx, size_rx) = watch::channel((rows, cols));
    let follow = tokio::spawn(follow_window(size_tx));
    let raw = if stdin_is_tty {
        Some(RawMode::enable()?)
    } else {
        None
    };
    // Debug builds only, for the e2e test of the panic hook alone: a panic on another thread,
    // then an exit that runs no destructor (so `RawMode`'s drop cannot be what restores).
    #[cfg(debug_assertions)]
    if std::env::var_os("FLEETRUN_TEST_PANIC_IN_RAW_MODE").is_some() {
        let _ = std::thread::spawn(|| panic!("a test panic in raw mode")).join();
        #[allow(clippy::exit)] // The point: an exit that skips every destructor.
        std::process::exit(101);
    }
    let ended = exec::relay(ws, true, Some(size_rx), signals).await;
    drop(raw);
    follow.abort();
    ended
}

/// Our window's size (rows, columns), or 24 x 80 when it cannot be read.
fn window_size() -> (u16, u16) {
    match crossterm::terminal::size() {
        Ok((cols, rows)) if cols > 0 && rows > 0 => (rows, cols),
        _ => SIZE_DEFAULT,
    }
}

/// Sends our window's size on every SIGWINCH (tokio's signal stream: crossterm's event reader
/// would read stdin, which is the session's).
async fn follow_window(sizes: watch::Sender<(u16, u16)>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut winch) = signal(SignalKind::window_change()) else {
        return;
    };
    while winch.recv().await.is_some() {
        let size = window_size();
        sizes.send_if_modified(|s| std::mem::replace(s, size) != size);
    }
}

/// Our terminal in raw mode while this lives: restored when it is dropped, and by a panic hook
/// (installed once) should anything panic first.
struct RawMode;

impl RawMode {
    fn enable() -> anyhow::Result<RawMode> {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                let _ = crossterm::terminal::disable_raw_mode();
                previous(info);
            }));
        });
        crossterm::terminal::enable_raw_mode().context("cannot put the terminal in raw mode")?;
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}
