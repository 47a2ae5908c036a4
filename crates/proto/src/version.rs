//! Protocol and product versions.

/// Version of the agent channel protocol (docs/protocol.md). Bumped on any incompatible frame change.
///
/// Since version 1: `Hello`, `Register`, `Welcome`, `Registered`, `Run`, `Cancel`, `Started`, `Output`,
/// `Ack`, `Finished`, `ResultAck`, `Error`.
/// Since version 2: nodes authenticate with an Ed25519 key over the server's `Challenge`
/// (`Hello`/`Register` carry a public key and signature, `Registered` no secret), and rotate it with
/// `RotateKey`, `KeyRotated`, `KeyConfirmed`.
pub const PROTOCOL_VERSION: u32 = 2;

/// Version of the fleetrun packages, reported by agents and servers.
pub const FLEETRUN_VERSION: &str = env!("CARGO_PKG_VERSION");
