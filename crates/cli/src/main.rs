//! `fleetrun`: the command line of fleetrun. Parses arguments, dispatches to `commands::*`, maps errors to
//! exit codes (0 ok, 1 failure or an error, 2 usage errors from clap).

mod client;
mod commands;
mod config;
mod render;

use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = commands::Cli::parse();
    match commands::run(cli).await {
        Ok(code) => code,
        Err(err) => {
            // A closed pipe (`fleetrun output ... | head`) is how the reader says it has seen enough.
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
