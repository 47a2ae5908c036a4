//! Sessions: live byte streams between a client and a node over the node's agent connection
//! (docs/protocol.md, "Session streams"). [`streams`] is each connection's stream table (the
//! agent side); [`exec`] relays a one-shot command to a client's WebSocket; [`forward`] carries
//! a port forward's TCP connections, one data WebSocket each; [`files`] puts and gets files; [`live`] holds the running ones
//! (terminate, timeouts); [`api`] lists, shows and terminates their records and serves their
//! recordings, which [`recording`] writes. [`transfer`] drives streams from the server itself
//! (a saved script run's helper commands and files). [`tickets`] are the sessions SSM's
//! StartSession started, waiting for their client.

pub mod api;
pub mod exec;
pub mod files;
pub mod forward;
pub mod live;
pub mod recording;
pub mod streams;
pub mod tickets;
pub mod transfer;
