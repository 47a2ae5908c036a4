//! Brute-force guard: a source address that fails authentication too often (bad API token, bad
//! SigV4 signature or key, bad node signature or activation code) is refused for the rest of the
//! window before its credentials are even looked at.
//!
//! Counted per IP address in fixed windows. The table is pruned of expired windows when it grows, so
//! a spray of addresses cannot grow it without bound.
//!
//! [`RateLimiter`] bounds the requests of each authenticated principal (token bucket).

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

/// Per-principal request rate limit: a token bucket per principal holding up to `burst` requests,
/// refilled at `rate` per second. Buckets idle long enough to be full again are forgotten when the
/// table grows, so its size is bounded by the principals active in the last `burst / rate` seconds.
pub struct RateLimiter {
    /// Requests per second; 0 turns the limit off.
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Principals tracked before full buckets are pruned.
const BUCKETS_PRUNE_AT: usize = 10_000;

impl RateLimiter {
    /// Default requests per second per principal.
    pub const DEFAULT_RATE: u32 = 50;
    /// Default burst: requests a quiet principal may make at once.
    pub const DEFAULT_BURST: u32 = 200;

    /// `rate` requests per second with bursts of `burst`; `rate` 0 allows everything.
    pub fn new(rate: u32, burst: u32) -> Self {
        RateLimiter {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from `principal`'s bucket; `Err(retry_after)` when it is empty.
    pub fn check(&self, principal: &str) -> Result<(), Duration> {
        self.check_at(principal, Instant::now())
    }

    fn check_at(&self, principal: &str, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= BUCKETS_PRUNE_AT && !buckets.contains_key(principal) {
            let full_after = Duration::from_secs_f64(self.burst / self.rate);
            buckets.retain(|_, b| now.saturating_duration_since(b.at) < full_after);
        }
        let b = match buckets.get_mut(principal) {
            Some(b) => b,
            None => buckets.entry(principal.to_owned()).or_insert(Bucket {
                tokens: self.burst,
                at: now,
            }),
        };
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter::new(Self::DEFAULT_RATE, Self::DEFAULT_BURST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_principal_gets_its_burst_then_the_rate_and_others_are_not_affected() {
        let l = RateLimiter::new(10, 20);
        let t0 = Instant::now();
        for _ in 0..20 {
            assert!(l.check_at("alice", t0).is_ok());
        }
        let retry = l.check_at("alice", t0).unwrap_err();
        assert!(retry > Duration::ZERO && retry <= Duration::from_millis(100));
        assert!(l.check_at("bob", t0).is_ok());
        // 10/s: after 0.5 s, five more.
        let t1 = t0 + Duration::from_millis(500);
        for _ in 0..5 {
            assert!(l.check_at("alice", t1).is_ok());
        }
        assert!(l.check_at("alice", t1).is_err());
        // Never more than the burst, however long the principal was quiet.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..20 {
            assert!(l.check_at("alice", t2).is_ok());
        }
        assert!(l.check_at("alice", t2).is_err());
    }

    #[test]
    fn zero_rate_is_off_and_the_table_stays_bounded() {
        let off = RateLimiter::new(0, 1);
        for _ in 0..1000 {
            assert!(off.check("x").is_ok());
        }
        let l = RateLimiter::new(1000, 1);
        let t0 = Instant::now();
        for i in 0..BUCKETS_PRUNE_AT * 3 {
            // 1000/s with a burst of 1: a bucket is full again after 1 ms.
            let now = t0 + Duration::from_millis(i as u64 / 100);
            assert!(l.check_at(&format!("p{i}"), now).is_ok());
        }
        let len = l.buckets.lock().unwrap().len();
        assert!(len <= BUCKETS_PRUNE_AT, "{len}");
    }

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
