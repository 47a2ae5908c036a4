//! The listener: TLS (the server's own CA by default) and the connection layer (limits, timeouts).

pub mod conn;
pub mod tls;
