//! This server as one replica of several on one database: its identity, its heartbeat, and the
//! commands it owns (dispatches) under a lease, taken over from a replica that went silent.

pub mod replica;
