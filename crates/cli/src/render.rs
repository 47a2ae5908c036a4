//! Output helpers: plain tables for people, pretty JSON for scripts, and times shown relative to now.

use comfy_table::{ContentArrangement, Table, presets};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, SystemTime};

/// How results are printed (`-o`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// The API's JSON objects, pretty-printed.
    Json,
}

/// Builds a borderless table (like `kubectl get`), so it reads well and greps well.
pub fn table(headers: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(headers.iter().copied());
    for col in t.column_iter_mut() {
        col.set_padding((0, 2));
    }
    t
}

/// Writes text to stdout. Unlike `println!`, a closed pipe (`fleetrun commands | head -1`) is an error
/// that `main` turns into a quiet exit rather than a panic.
pub fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Prints a table, without the trailing spaces of the last column.
pub fn print_table(t: &Table) -> anyhow::Result<()> {
    let mut text = String::new();
    for line in t.to_string().lines() {
        text.push_str(line.trim_end());
        text.push('\n');
    }
    emit(&text)
}

/// Prints a value as pretty JSON.
pub fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    emit(&format!("{}\n", serde_json::to_string_pretty(v)?))
}

/// Parses an RFC 3339 time as the API gives it.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    // humantime takes only `Z`; the server may spell UTC as `+00:00`.
    let z;
    let s = match s.strip_suffix("+00:00") {
        Some(head) => {
            z = format!("{head}Z");
            z.as_str()
        }
        None => s,
    };
    humantime::parse_rfc3339_weak(s).ok()
}

/// A time relative to now (`12s ago`, `in 23h`); the text as given when it does not parse; `-` if empty.
pub fn ago(s: &str) -> String {
    if s.is_empty() {
        return "-".into();
    }
    let Some(t) = parse_time(s) else {
        return s.to_owned();
    };
    let now = SystemTime::now();
    match now.duration_since(t) {
        // Clocks of server and CLI differ by milliseconds; "3ms ago" would be false precision.
        Ok(d) if d.as_secs() == 0 => "just now".into(),
        Ok(d) => format!("{} ago", short_duration(d)),
        Err(e) => format!("in {}", short_duration(e.duration())),
    }
}

/// Optional time, relative to now.
pub fn ago_opt(s: Option<&str>) -> String {
    s.map(ago).unwrap_or_else(|| "-".into())
}

/// A duration in its largest whole unit: `850ms`, `42s`, `3m`, `5h`, `2d`.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        format!("{}ms", d.as_millis())
    } else if s < 120 {
        format!("{s}s")
    } else if s < 2 * 3600 {
        format!("{}m", s / 60)
    } else if s < 2 * 86_400 {
        format!("{}h", s / 3600)
    } else {
        format!("{}d", s / 86_400)
    }
}

/// How long between two API times; `-` if either is missing.
pub fn between(start: Option<&str>, end: Option<&str>) -> String {
    let (Some(a), Some(b)) = (start.and_then(parse_time), end.and_then(parse_time)) else {
        return "-".into();
    };
    match b.duration_since(a) {
        Ok(d) if d.as_secs() < 120 => format!("{:.1}s", d.as_secs_f64()),
        Ok(d) => short_duration(d),
        Err(_) => "-".into(),
    }
}

/// Milliseconds as `between` shows a duration: `1.5s` under two minutes, else its largest unit.
pub fn duration_ms(ms: u64) -> String {
    let d = Duration::from_millis(ms);
    if d.as_secs() < 120 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        short_duration(d)
    }
}

/// A byte count in binary units: `512 B`, `1.5 KiB`, `20.0 MiB`, `3.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Text, or `-` when empty.
pub fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

/// `k=v,k2=v2`.
pub fn tags(tags: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    parts.join(",")
}

/// The first line of some text, cut to `max` characters (with `…` when cut).
pub fn first_line(s: &str, max: usize) -> String {
    let line = s.lines().next().unwrap_or("");
    let mut out: String = line.chars().take(max).collect();
    if line.chars().count() > max || s.lines().nth(1).is_some() {
        out.push('…');
    }
    out
}

/// An optional number, `-` when absent.
pub fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// An exit code; `-` for SSM's -1 (not ended, or never started).
pub fn exit_code(code: i32, signal: Option<i32>) -> String {
    match (code, signal) {
        (_, Some(sig)) => format!("sig {sig}"),
        (-1, None) => "-".into(),
        (c, None) => c.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_durations() {
        assert!(parse_time("2024-05-01T10:00:00Z").is_some());
        assert!(parse_time("2024-05-01T10:00:00.123+00:00").is_some());
        assert_eq!(ago("not a time"), "not a time");
        assert_eq!(ago(""), "-");
        assert_eq!(
            between(Some("2024-05-01T10:00:00Z"), Some("2024-05-01T10:00:01.5Z")),
            "1.5s"
        );
        assert_eq!(short_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(first_line("a\nb", 10), "a…");
        assert_eq!(first_line("abc", 10), "abc");
        assert_eq!(exit_code(-1, None), "-");
        assert_eq!(duration_ms(1500), "1.5s");
        assert_eq!(duration_ms(3_600_000), "60m");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(20 * 1024 * 1024), "20.0 MiB");
        assert_eq!(or_dash(""), "-");
    }
}
