//! Command and invocation statuses, named and serialized as SSM's.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Status of one command on one node (SSM's `CommandInvocationStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InvocationStatus {
    /// Not yet started on the node (not delivered, or delivered and queued).
    Pending,
    /// Running on the node.
    InProgress,
    /// Delivery is being retried (reserved; fleetrun redelivers silently).
    Delayed,
    /// Exited 0.
    Success,
    /// Exited non-zero, was killed by a signal, or could not start.
    Failed,
    /// Ran past its execution timeout, or was not delivered before its delivery timeout.
    TimedOut,
    /// Cancelled before it finished (or skipped after max errors was exceeded).
    Cancelled,
    /// A cancel has been sent to the node and not yet confirmed.
    Cancelling,
}

/// Status of a command rolled up over its invocations (SSM's `CommandStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CommandStatus {
    /// No invocation has started yet.
    Pending,
    /// Some invocations have started and not all have ended.
    InProgress,
    /// Every invocation succeeded.
    Success,
    /// Max errors was exceeded, or some invocation did not succeed (status details say which).
    Failed,
    /// Every invocation that did not succeed timed out.
    TimedOut,
    /// The command was cancelled.
    Cancelled,
    /// A cancel is under way.
    Cancelling,
}

/// Status details, the finer reason SSM reports beside a status.
pub mod details {
    /// Waiting to be delivered.
    pub const PENDING: &str = "Pending";
    /// Delivered, waiting to start on the node.
    pub const DELIVERED: &str = "Delivered";
    /// Running.
    pub const IN_PROGRESS: &str = "InProgress";
    /// Exited 0.
    pub const SUCCESS: &str = "Success";
    /// Exited non-zero or by a signal.
    pub const FAILED: &str = "Failed";
    /// Killed after its execution timeout.
    pub const EXECUTION_TIMED_OUT: &str = "Execution Timed Out";
    /// Not started before its delivery timeout.
    pub const DELIVERY_TIMED_OUT: &str = "Delivery Timed Out";
    /// The node could not run it (for example its working directory does not exist).
    pub const UNDELIVERABLE: &str = "Undeliverable";
    /// Not run: the node's platform is not the one the command is for (a saved script's).
    pub const INVALID_PLATFORM: &str = "InvalidPlatform";
    /// The agent restarted while it ran, so its result is unknown.
    pub const TERMINATED: &str = "Terminated";
    /// Killed for exceeding the command's memory limit.
    pub const MEMORY_LIMIT_EXCEEDED: &str = "Memory Limit Exceeded";
    /// Cancelled by an operator.
    pub const CANCELLED: &str = "Cancelled";
    /// A cancel was sent to the node.
    pub const CANCELLING: &str = "Cancelling";
    /// Not started because the command exceeded its max errors.
    pub const MAX_ERRORS_EXCEEDED: &str = "Skipped: Max Errors Exceeded";
    /// Command-level: every invocation ended, some did not succeed, max errors was not exceeded.
    pub const INCOMPLETE: &str = "Incomplete";
    /// Command-level: the target expression matched no node.
    pub const NO_INSTANCES_IN_TAG: &str = "No Instances In Tag";
}

impl InvocationStatus {
    /// Whether the invocation has ended for good.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Success | Self::Failed | Self::TimedOut | Self::Cancelled
        )
    }
    /// The status's name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::InProgress => "InProgress",
            Self::Delayed => "Delayed",
            Self::Success => "Success",
            Self::Failed => "Failed",
            Self::TimedOut => "TimedOut",
            Self::Cancelled => "Cancelled",
            Self::Cancelling => "Cancelling",
        }
    }
    /// Parses a status name as serialized.
    pub fn parse(s: &str) -> Option<Self> {
        ALL_INVOCATION.iter().copied().find(|v| v.as_str() == s)
    }
}

const ALL_INVOCATION: [InvocationStatus; 8] = [
    InvocationStatus::Pending,
    InvocationStatus::InProgress,
    InvocationStatus::Delayed,
    InvocationStatus::Success,
    InvocationStatus::Failed,
    InvocationStatus::TimedOut,
    InvocationStatus::Cancelled,
    InvocationStatus::Cancelling,
];

const ALL_COMMAND: [CommandStatus; 7] = [
    CommandStatus::Pending,
    CommandStatus::InProgress,
    CommandStatus::Success,
    CommandStatus::Failed,
    CommandStatus::TimedOut,
    CommandStatus::Cancelled,
    CommandStatus::Cancelling,
];

impl CommandStatus {
    /// Whether the command has ended for good.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Success | Self::Failed | Self::TimedOut | Self::Cancelled
        )
    }
    /// The status's name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::InProgress => "InProgress",
            Self::Success => "Success",
            Self::Failed => "Failed",
            Self::TimedOut => "TimedOut",
            Self::Cancelled => "Cancelled",
            Self::Cancelling => "Cancelling",
        }
    }
    /// Parses a status name as serialized.
    pub fn parse(s: &str) -> Option<Self> {
        ALL_COMMAND.iter().copied().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for InvocationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for CommandStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in ALL_INVOCATION {
            assert_eq!(InvocationStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        for s in ALL_COMMAND {
            assert_eq!(CommandStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(InvocationStatus::parse("Nope"), None);
    }
}
