//! Wall-clock helpers shared by every crate: times are kept as epoch milliseconds and shown as RFC 3339.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, in epoch milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Epoch milliseconds as RFC 3339 with millisecond precision, in UTC.
pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// The epoch milliseconds of an RFC 3339 time as [`rfc3339`] writes it (0 if it does not parse).
pub fn parse_rfc3339_ms(s: &str) -> i64 {
    try_parse_rfc3339_ms(s).unwrap_or(0)
}

/// The epoch milliseconds of an RFC 3339 time (`2026-12-01T10:00:00Z`, fractions optional); None
/// if it does not parse or is before 1970.
pub fn try_parse_rfc3339_ms(s: &str) -> Option<i64> {
    humantime::parse_rfc3339_weak(s.trim_end_matches('Z'))
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_millis()).ok())
}
