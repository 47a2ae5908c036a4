//! The agent library's error type: what makes [`crate::run`] give up (everything else is retried).

use std::path::PathBuf;

/// A fatal error: bad settings, an unusable state directory, or a server that refuses the node.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A setting is invalid; the message names it.
    #[error("{0}")]
    Config(String),
    /// The state directory holds no identity and no activation code was given.
    #[error("no identity in {} and no --activation-code given", .0.display())]
    NoIdentity(PathBuf),
    /// A file in the state directory could not be read or written.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The state directory's journal was written by a newer agent.
    #[error(transparent)]
    JournalFormat(#[from] crate::journal::NewerFormat),
    /// The server refused to register the node.
    #[error("registration refused by the server ({code}): {message}")]
    RegistrationRefused {
        /// The server's error code.
        code: String,
        /// The server's explanation.
        message: String,
    },
    /// The server speaks another channel protocol version than this agent.
    #[error(
        "protocol version mismatch: this agent speaks channel protocol version {agent}, the server {}; \
         run an agent of the server's protocol version (the server said: {message})",
        .server.map_or_else(|| "another version".to_owned(), |v| format!("version {v}"))
    )]
    ProtocolVersion {
        /// This agent's version.
        agent: u32,
        /// The server's, when its upgrade response named it.
        server: Option<u32>,
        /// The server's explanation.
        message: String,
    },
    /// The server rejected the node's identity or settings.
    #[error("connection refused by the server ({code}): {message}")]
    Rejected {
        /// The server's error code, e.g. `UnknownNode`.
        code: String,
        /// The server's explanation.
        message: String,
    },
}
