//! A client's port forward (`fleetrun port-forward`, `fleetrun proxy`; see docs/protocol.md,
//! "Port forwards"): one control WebSocket per forward session and one data WebSocket per TCP
//! connection, each carried to the node as a `StreamKind::Tcp` stream.
//!
//! - Control: `GET /v1/nodes/{node_id}/port-forward?host=HOST&port=PORT` (the `port-forward`
//!   action on the node; a host other than the node's own loopback also needs
//!   `port-forward-remote`). The server answers [`ForwardEvent::Ready`] with the session's id,
//!   and later at most one [`ForwardEvent::Error`] (terminated, idle timeout, max duration) before
//!   its close. The client sends nothing; closing the socket ends the session and its connections.
//! - Data: `GET /v1/sessions/{session_id}/tcp` (the session's own user only): one TCP connection
//!   to the session's `host:port` from the node. Binary messages are raw bytes both ways (at most
//!   [`DATA_MESSAGE_MAX`] from the client); text messages are `crate::stream::client` events: the
//!   client's `{"type":"eof"}` half-closes the connection on the node; the server's
//!   `{"type":"started"}` says it is connected, `{"type":"error",...}` why it failed; a normal
//!   close follows the node's peer closing, after its last bytes.

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// Largest binary message a client may send on a data socket (one stream frame).
pub const DATA_MESSAGE_MAX: usize = crate::stream::STREAM_FRAME_MAX;

/// The host a forward reaches when none is given: the node itself.
pub const DEFAULT_HOST: &str = "localhost";

/// A server's text message on a control socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ForwardEvent {
    /// The forward session is open: data sockets name `session_id`.
    Ready {
        /// The session's id (its record, its data sockets, a terminate).
        session_id: String,
        /// The host the node connects to.
        host: String,
        /// The port it connects to.
        port: u16,
    },
    /// The session ended from the server (or was refused); the socket closes after it.
    Error {
        /// Why, in words.
        message: String,
    },
}

/// Whether `host` is the node itself: `localhost`, an address in 127.0.0.0/8, or `::1` (also
/// bracketed). Anything else, names that may resolve to loopback included, counts as remote.
pub fn is_node_local(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match bare.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => a.is_loopback(),
        Ok(IpAddr::V6(a)) => a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v| v.is_loopback()),
        Err(_) => false,
    }
}

/// A host as the node should resolve it: an IPv6 address without its brackets.
pub fn bare_host(host: &str) -> &str {
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(inner) if inner.parse::<std::net::Ipv6Addr>().is_ok() => inner,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_nodes_own_loopback_is_local() {
        for h in [
            "localhost",
            "LocalHost",
            "127.0.0.1",
            "127.9.8.7",
            "::1",
            "[::1]",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_node_local(h), "{h}");
        }
        for h in [
            "10.0.0.1",
            "db.internal",
            "0.0.0.0",
            "localhost.example",
            "::",
            "128.0.0.1",
            "",
        ] {
            assert!(!is_node_local(h), "{h}");
        }
        assert_eq!(bare_host("[::1]"), "::1");
        assert_eq!(bare_host("[x]"), "[x]");
        assert_eq!(bare_host("db"), "db");
    }
}
