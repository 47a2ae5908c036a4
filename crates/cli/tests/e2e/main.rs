//! End-to-end tests of the `fleetrun` CLI against the real server and agent binaries (one test binary,
//! as ripgrep and Garage do, so the suite links once).
//!
//! Needs the agent binary: `cargo build -p fleetrun-agent` before `cargo test -p fleetrun-cli`.

#[path = "../support/mod.rs"]
mod support;

mod audit;
mod authz;
mod bad_input;
mod brute_force;
mod cp;
mod database;
mod deregister;
mod dev;
mod documents;
mod exec;
mod faults;
mod faults_agent;
mod faults_netcut;
mod faults_server;
mod faults_spool;
mod forward;
mod help;
mod hostile_api;
mod hostile_conn;
mod hostile_input;
mod hostile_load;
mod hostile_retry;
mod instance_ids;
mod limits;
mod node_identity;
mod node_tags;
mod objects;
mod objects_s3;
mod output;
mod params;
mod protocol_version;
mod rate;
mod recording;
mod replicas;
mod retention;
mod s3_buckets;
mod script_files;
mod scripts;
mod send;
mod shell;
mod shutdown;
mod ssm_s3_output;
mod tls;
