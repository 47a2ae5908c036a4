//! Limits and defaults that the server, the agent and the CLI agree on (SSM's where SSM has one).

/// Inline stdout kept with an invocation for listings (SSM's `StandardOutputContent` cap).
pub const INLINE_STDOUT_MAX: usize = 24_000;
/// Inline stderr kept with an invocation for listings (SSM's `StandardErrorContent` cap).
pub const INLINE_STDERR_MAX: usize = 8_000;

/// Default and largest execution timeout, in seconds.
pub const EXECUTION_TIMEOUT_DEFAULT: u64 = 3_600;
/// Largest execution timeout accepted, in seconds (48 h, as SSM).
pub const EXECUTION_TIMEOUT_MAX: u64 = 172_800;
/// Default delivery timeout, in seconds.
pub const DELIVERY_TIMEOUT_DEFAULT: u64 = 3_600;
/// Smallest delivery timeout accepted, in seconds. SSM's floor is 30; fleetrun takes 1 so tests and
/// impatient operators need not wait.
pub const DELIVERY_TIMEOUT_MIN: u64 = 1;
/// Largest delivery timeout accepted, in seconds (30 days, as SSM).
pub const DELIVERY_TIMEOUT_MAX: u64 = 2_592_000;
/// Longest comment accepted (SSM's).
pub const COMMENT_MAX: usize = 100;
/// Largest script accepted, in bytes (SSM's document size).
pub const SCRIPT_MAX: usize = 64 * 1024;
/// Longest working directory accepted (SSM's).
pub const WORKING_DIR_MAX: usize = 4_096;

/// Bytes of one output stream that an agent may have sent and not yet had acknowledged. The flow-control
/// window of the channel: the agent reads no more from the command's pipe until the server acknowledges.
pub const OUTPUT_WINDOW: u64 = 4 * 1024 * 1024;
/// Largest data payload in one `Output` frame.
pub const OUTPUT_FRAME_MAX: usize = 256 * 1024;
/// Largest WebSocket message (and frame) either side of the agent channel accepts: room for an
/// `Output` frame ([`OUTPUT_FRAME_MAX`]), a `Run` (script of at most [`SCRIPT_MAX`] bytes, with its
/// parameters substituted) and a `Hello` listing thousands of known invocations, with framing.
pub const CHANNEL_MESSAGE_MAX: usize = 1024 * 1024;
const _: () = assert!(
    CHANNEL_MESSAGE_MAX >= OUTPUT_FRAME_MAX + 1024
        && CHANNEL_MESSAGE_MAX >= SCRIPT_MAX + WORKING_DIR_MAX + 1024
);

/// Largest data payload of one session-stream `StreamData` frame (either way; see
/// [`crate::stream`]).
pub const STREAM_FRAME_MAX: usize = 128 * 1024;
/// Largest credit either side may hold for a session stream (initial window plus grants not yet
/// used): what one stream may have in flight, and so in the receiver's memory.
pub const STREAM_WINDOW_MAX: u64 = 16 * 1024 * 1024;
/// The window an agent grants for a session stream's input (the server's `StreamData` to it), and
/// the server for its output: port forwards, which may be many at once.
pub const STREAM_WINDOW_DEFAULT: u64 = 1024 * 1024;
/// The window of bulk streams (exec and shell input and output, file transfers): one 1 MiB
/// window crossing CLI, server and agent held a stream near 300 MB/s on loopback, 4 MiB lets it
/// run at about 400 (BENCHMARKS.md). Still what bounds a stream's memory on each side.
pub const STREAM_WINDOW_BULK: u64 = 4 * 1024 * 1024;
/// Most session streams open at once on one agent connection, whatever the agent's own cap.
pub const STREAMS_PER_CONNECTION_MAX: usize = 256;

/// Smallest memory limit accepted, in MiB.
pub const MEMORY_LIMIT_MIN_MB: u64 = 4;
/// Largest memory limit accepted, in MiB (1 TiB).
pub const MEMORY_LIMIT_MAX_MB: u64 = 1024 * 1024;
/// Smallest CPU limit accepted, in percent of one core.
pub const CPU_LIMIT_MIN_PERCENT: u32 = 1;
/// Largest CPU limit accepted, in percent of one core (1024 cores).
pub const CPU_LIMIT_MAX_PERCENT: u32 = 102_400;

/// The header of `POST /v1/commands` that makes a send idempotent: a retry with the same key and the
/// same body answers the command the first attempt made (200, `Idempotent-Replayed: true`) instead
/// of making another.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Longest idempotency key accepted, in bytes (visible ASCII only, 0x21 to 0x7E).
pub const IDEMPOTENCY_KEY_MAX: usize = 128;

/// Checks an idempotency key: 1 to [`IDEMPOTENCY_KEY_MAX`] visible ASCII characters. The error names
/// what is wrong and the limit.
pub fn check_idempotency_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > IDEMPOTENCY_KEY_MAX {
        return Err(format!(
            "Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters, got {}",
            key.len()
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "Idempotency-Key must be visible ASCII characters (0x21 to 0x7E), without spaces"
                .to_owned(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod idempotency_tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_checked() {
        assert!(check_idempotency_key("0b7c-Abc_1.x").is_ok());
        assert!(check_idempotency_key(&"k".repeat(IDEMPOTENCY_KEY_MAX)).is_ok());
        let long = check_idempotency_key(&"k".repeat(IDEMPOTENCY_KEY_MAX + 1)).unwrap_err();
        assert!(long.contains("1 to 128"), "{long}");
        assert!(check_idempotency_key("").is_err());
        assert!(check_idempotency_key("a b").is_err());
        assert!(check_idempotency_key("é").is_err());
    }
}
