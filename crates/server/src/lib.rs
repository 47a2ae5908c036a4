//! The fleetrun control plane: HTTP API, agent channel hub, dispatcher and storage.
//!
//! Start with [`start`]; the data flow of a command is in ARCHITECTURE.md. The folders are the
//! domains, edges first:
//!
//! - [`api`] (native JSON API) and [`ssm`] (SSM-compatible JSON 1.1 API): the two front doors.
//! - [`access`]: who is calling and what they may do (authn, authz, guard, audit, secrets).
//! - [`fleet`]: the connected agents (channel, hub).
//! - [`run`]: commands from acceptance to output (send, dispatch, output, documents, params,
//!   retention).
//! - [`scripts`]: saved scripts, their catalogue and inputs.
//! - [`sessions`]: live session streams to agents, relayed to clients (exec).
//! - [`net`]: the listener (TLS, connection limits and timeouts).
//! - [`objects`]: the object store (a local directory, or an S3-compatible bucket).
//! - [`cluster`]: this server as one replica of several on one database (membership, command
//!   ownership under leases, takeover).
//! - [`app`] and [`config`]: the process's settings and shared state, and its start.
//! - [`errors`]: the error kinds both front doors answer, and the trait they answer through.
//!
//! Persistent state is the `fleetrun-store` crate.

pub mod access;
pub mod api;
pub mod app;
pub mod cluster;
pub mod config;
pub mod errors;
pub mod fleet;
pub mod net;
pub mod objects;
pub mod query;
pub mod run;
pub mod scripts;
pub mod sessions;
pub mod ssm;

pub use app::{AppState, Ended, RunningServer, start};
pub use config::ServerConfig;
/// Where a server's database is (`ServerConfig::database`).
pub use fleetrun_store::Database;
