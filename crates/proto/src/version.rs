//! Protocol and product versions.

/// Version of the agent channel protocol (docs/protocol.md). Bumped on any incompatible frame change.
///
/// Since version 1: `Hello`, `Register`, `Welcome`, `Registered`, `Run`, `Cancel`, `Started`, `Output`,
/// `Ack`, `Finished`, `ResultAck`, `Error`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Version of the fleetrun packages, reported by agents and servers.
pub const FLEETRUN_VERSION: &str = env!("CARGO_PKG_VERSION");
