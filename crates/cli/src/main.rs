//! `fleetrun`: the command line of fleetrun. Parses arguments, dispatches to `commands::*`, maps errors to
//! exit codes (0 ok, 1 failure or an error, 2 usage errors from clap). Reached as
//! `session-manager-plugin` (a link), it is the AWS CLI's session plugin ([`plugin`]).

mod client;
mod commands;
mod config;
mod plugin;
mod render;

use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match args.first() {
        Some(argv0) if plugin::invoked_as_plugin(argv0) => {
            match plugin::command_line(&args, |k| std::env::var(k).ok()) {
                Ok(plugin::Plugin::Version) => {
                    println!("{}", plugin::PLUGIN_VERSION);
                    return ExitCode::SUCCESS;
                }
                Ok(plugin::Plugin::Run(line)) => commands::Cli::parse_from(line),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => commands::Cli::parse_from(args),
    };
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
