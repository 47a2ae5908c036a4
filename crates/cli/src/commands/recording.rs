//! `fleetrun sessions recording ID` (the asciicast file, to stdout) and `fleetrun sessions play
//! ID` (replayed in this terminal with its timings). Both stream: the file is read chunk by chunk
//! and, to play, line by line, never whole.
//!
//! Playing writes the recorded output to stdout and nothing else: the player changes no terminal
//! mode (no raw mode, no resize), so it has nothing to restore. A resize in the recording
//! (`"r"`) is reported on stderr; input events (`"i"`) and markers are skipped. Ctrl-C stops it
//! (exit 130).

use crate::client::{Client, Output};
use anyhow::{Context, bail};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;
use tokio::time::Instant;

/// Longest line a recording may have (an event is one stream frame, JSON-escaped: well below).
pub const LINE_MAX: usize = 1024 * 1024;
/// The pause `--skip-idle` cuts longer ones to, without `--max-idle`.
pub const SKIP_IDLE_DEFAULT: f64 = 1.0;
/// Fastest `--speed`.
pub const SPEED_MAX: f64 = 10_000.0;

/// `sessions recording ID`: copies the file to stdout, refusing a terminal unless `force`.
pub async fn download(client: &Client, id: &str, force: bool) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    if stdout.is_terminal() && !force {
        bail!(
            "stdout is a terminal: redirect the recording to a file (fleetrun sessions recording {id} > session.cast), play it with `fleetrun sessions play {id}`, or pass --force"
        );
    }
    let mut body = client.recording(id).await?;
    let mut out = stdout.lock();
    while let Some(chunk) = body.chunk().await? {
        out.write_all(&chunk).context("cannot write to stdout")?;
    }
    out.flush().context("cannot write to stdout")?;
    Ok(ExitCode::SUCCESS)
}

/// How to play.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// Times faster than recorded.
    pub speed: f64,
    /// No pause longer than this many seconds (before the speed applies).
    pub max_idle: Option<f64>,
}

/// A `--speed`: a positive number up to [`SPEED_MAX`].
pub fn parse_speed(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= SPEED_MAX => Ok(v),
        _ => Err(format!(
            "{s:?} is not a speed: use a number above 0 and up to {SPEED_MAX}, e.g. 2 or 0.5"
        )),
    }
}

/// A `--max-idle`: seconds, above 0.
pub fn parse_idle(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!(
            "{s:?} is not a pause: use seconds above 0, e.g. 2 or 0.5"
        )),
    }
}

/// `sessions play ID`: replays the recording's output with its timings until it ends or Ctrl-C.
pub async fn play(client: &Client, id: &str, pace: Pace) -> anyhow::Result<ExitCode> {
    let body = client.recording(id).await?;
    let mut lines = Lines::new(body);
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    let played = async {
        let (n, header) = lines.next().await?.context("the recording is empty")?;
        check_header(n, &header)?;
        let started = Instant::now();
        // Playback position (seconds, scaled) and the recorded time of the event before.
        let (mut at, mut prev) = (0.0f64, 0.0f64);
        let stdout = std::io::stdout();
        while let Some((n, line)) = lines.next().await? {
            let (t, code, data) = event(n, &line)?;
            let mut gap = (t - prev).max(0.0);
            prev = prev.max(t);
            if let Some(m) = pace.max_idle {
                gap = gap.min(m);
            }
            at += gap / pace.speed;
            let due = Duration::try_from_secs_f64(at)
                .ok()
                .and_then(|d| started.checked_add(d))
                .with_context(|| {
                    format!("line {n} of the recording is too far out to play ({t} s)")
                })?;
            tokio::time::sleep_until(due).await;
            match code.as_str() {
                "o" => {
                    let mut out = stdout.lock();
                    out.write_all(data.as_bytes())
                        .and_then(|()| out.flush())
                        .context("cannot write to stdout")?;
                }
                "r" => eprintln!("fleetrun: the recorded terminal was resized to {data}"),
                _ => {}
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::select! {
        r = played => r.map(|()| ExitCode::SUCCESS),
        _ = &mut stop => {
            eprintln!("\nfleetrun: playback interrupted");
            Ok(ExitCode::from(130))
        }
    }
}

/// The header line must be an asciicast v2 header.
fn check_header(n: usize, line: &str) -> anyhow::Result<()> {
    let h: serde_json::Value = serde_json::from_str(line)
        .with_context(|| format!("line {n} of the recording is not JSON"))?;
    match h.get("version").and_then(serde_json::Value::as_u64) {
        Some(2) => Ok(()),
        Some(v) => bail!("the recording is asciicast version {v}; this player reads version 2"),
        None => bail!("the recording's first line is not an asciicast header"),
    }
}

/// An event line: `[seconds, code, data]`.
fn event(n: usize, line: &str) -> anyhow::Result<(f64, String, String)> {
    let (t, code, data): (f64, String, String) = serde_json::from_str(line)
        .with_context(|| format!("line {n} of the recording is not an asciicast event"))?;
    if !t.is_finite() || t < 0.0 {
        bail!("line {n} of the recording has a bad time {t}");
    }
    Ok((t, code, data))
}

/// The lines of a body, each at most [`LINE_MAX`] bytes, numbered from 1; empty ones skipped.
struct Lines<'a> {
    body: Output<'a>,
    buf: Vec<u8>,
    n: usize,
    done: bool,
}

impl<'a> Lines<'a> {
    fn new(body: Output<'a>) -> Self {
        Lines {
            body,
            buf: Vec::new(),
            n: 0,
            done: false,
        }
    }

    async fn next(&mut self) -> anyhow::Result<Option<(usize, String)>> {
        loop {
            let line = if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                Some(line)
            } else if self.done {
                (!self.buf.is_empty()).then(|| std::mem::take(&mut self.buf))
            } else {
                if self.buf.len() > LINE_MAX {
                    bail!(
                        "line {} of the recording is over {} bytes",
                        self.n + 1,
                        LINE_MAX
                    );
                }
                match self.body.chunk().await? {
                    Some(chunk) => self.buf.extend_from_slice(&chunk),
                    None => self.done = true,
                }
                continue;
            };
            let Some(line) = line else { return Ok(None) };
            self.n += 1;
            let text = String::from_utf8(line)
                .map_err(|_| anyhow::anyhow!("line {} of the recording is not UTF-8", self.n))?;
            let text = text.trim_end_matches(['\n', '\r']);
            if text.trim().is_empty() {
                continue;
            }
            return Ok(Some((self.n, text.to_owned())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speeds_and_pauses_are_bounded_and_errors_say_what_fits() {
        assert_eq!(parse_speed("2"), Ok(2.0));
        assert_eq!(parse_speed("0.5"), Ok(0.5));
        for bad in ["0", "-1", "fast", "NaN", "inf", "100000"] {
            let e = parse_speed(bad).unwrap_err();
            assert!(e.contains("not a speed"), "{bad}: {e}");
        }
        assert_eq!(parse_idle("1.5"), Ok(1.5));
        for bad in ["0", "-2", "inf", "x"] {
            assert!(parse_idle(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn headers_and_events_are_checked_naming_the_line() {
        assert!(check_header(1, r#"{"version":2,"width":80,"height":24}"#).is_ok());
        let e = check_header(1, r#"{"version":1}"#).unwrap_err().to_string();
        assert!(e.contains("version 1"), "{e}");
        let e = format!("{:#}", check_header(1, "nope").unwrap_err());
        assert!(e.contains("line 1"), "{e}");
        assert_eq!(
            event(2, r#"[0.5, "o", "hi"]"#).unwrap(),
            (0.5, "o".into(), "hi".into())
        );
        let e = format!("{:#}", event(7, r#"[0.5, "o"]"#).unwrap_err());
        assert!(e.contains("line 7"), "{e}");
        let e = format!("{:#}", event(3, r#"[-1, "o", ""]"#).unwrap_err());
        assert!(e.contains("bad time"), "{e}");
    }
}
