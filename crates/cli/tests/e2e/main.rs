//! End-to-end tests of the `fleetrun` CLI against the real server and agent binaries (one test binary,
//! as ripgrep and Garage do, so the suite links once).
//!
//! Needs the agent binary: `cargo build -p fleetrun-agent` before `cargo test -p fleetrun-cli`.

#[path = "../support/mod.rs"]
mod support;

mod bad_input;
mod dev;
mod faults;
mod help;
mod output;
mod rate;
mod send;
