//! Wire types shared by the fleetrun server, agent and CLI.
//!
//! This crate is serde types and constants only: it knows nothing of tokio, axum, sqlx or the network.
//! Database rows and in-memory state are converted to these types at the boundary. The one exception
//! is [`auth`]: the signed messages of the node handshake, which server and agent must build alike.
#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod channel;
pub mod forward;
pub mod ids;
pub mod limits;
pub mod params;
pub mod send;
pub mod status;
pub mod stream;
pub mod targets;
pub mod time;
pub mod tls;
pub mod version;

pub use ids::{CommandId, NodeId};
pub use status::{CommandStatus, InvocationStatus};
