//! Brute-force guard: a source address that fails authentication too often (bad API token, bad
//! SigV4 signature or key, bad node signature or activation code) is refused for the rest of the
//! window before its credentials are even looked at.
//!
//! Counted per IP address in fixed windows. The table is pruned of expired windows when it grows, so
//! a spray of addresses cannot grow it without bound.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures allowed per source in one window.
pub const MAX_FAILURES: u32 = 10;
/// Length of a window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Sources tracked before expired windows are pruned.
const PRUNE_AT: usize = 10_000;

/// Per-source failure counts.
#[derive(Default)]
pub struct AuthGuard {
    windows: Mutex<HashMap<IpAddr, Window>>,
}

struct Window {
    start: Instant,
    failures: u32,
}

impl AuthGuard {
    /// `Err(retry_after)` when `ip` used up its failures in the current window.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        match self.lock().get(&ip) {
            Some(w) if w.failures >= MAX_FAILURES && now < w.start + WINDOW => {
                Err((w.start + WINDOW - now).max(Duration::from_secs(1)))
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed authentication from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut windows = self.lock();
        if windows.len() >= PRUNE_AT {
            windows.retain(|_, w| now < w.start + WINDOW);
        }
        let w = windows.entry(ip).or_insert(Window {
            start: now,
            failures: 0,
        });
        if now >= w.start + WINDOW {
            *w = Window {
                start: now,
                failures: 0,
            };
        }
        w.failures += 1;
        if w.failures == MAX_FAILURES {
            tracing::warn!(%ip, "too many failed authentications; refusing this source for {WINDOW:?}");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Window>> {
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_refused_after_too_many_failures_and_others_are_not() {
        let g = AuthGuard::default();
        let bad: IpAddr = [10, 0, 0, 1].into();
        let good: IpAddr = [10, 0, 0, 2].into();
        for _ in 0..MAX_FAILURES {
            assert!(g.check(bad).is_ok());
            g.failed(bad);
        }
        let retry = g.check(bad).unwrap_err();
        assert!(retry <= WINDOW && retry >= Duration::from_secs(1));
        assert!(g.check(good).is_ok());
    }
}
