//! Sessions: live byte streams between a client and a node over the node's agent connection
//! (docs/protocol.md, "Session streams"). [`streams`] is each connection's stream table (the
//! agent side); [`exec`] relays a one-shot command to a client's WebSocket.

pub mod exec;
pub mod streams;
