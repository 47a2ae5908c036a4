//! `fleetrun policies ...`: check Cedar policy files before giving them to a user, and show what
//! policies may name.

use fleetrun_server::access::authz;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Check a policy file against fleetrun's schema (exit 1 naming what is wrong)
    Validate {
        /// The Cedar policy file
        file: PathBuf,
    },
    /// Print the schema: entity types, node tags, and every action policies may name
    Schema,
    /// Print the built-in roles' policies
    Roles,
}

/// Runs locally: no server needed.
pub fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Validate { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            match authz::validate(&text) {
                Ok(n) => {
                    println!("{}: {n} policies, valid", file.display());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("{}: invalid policy: {e}", file.display());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Cmd::Schema => {
            print!("{}", authz::SCHEMA.trim_start());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Roles => {
            print!("{}", authz::ROLE_POLICIES.trim_start());
            Ok(ExitCode::SUCCESS)
        }
    }
}
