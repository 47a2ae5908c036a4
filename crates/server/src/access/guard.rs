//! Brute-force guard: too many failed authentications (bad API token, bad SigV4 signature or key,
//! bad node signature or activation code) are refused for the rest of the window before the
//! credentials are even looked at.
//!
//! Counted in fixed windows twice: per credential id (an API token's hash prefix, a SigV4 access
//! key id), locked after [`MAX_FAILURES_PER_CREDENTIAL`], so guessing one credential stops soon from
//! anywhere; and per source address, locked only after the much higher
//! [`MAX_FAILURES_PER_ADDRESS`], so one client behind a NAT that fails a few times does not lock out
//! its neighbours' valid credentials, while a source spraying guesses is still stopped. The tables
//! are pruned of expired windows when they grow, and never hold more than [`TRACKED_MAX`] entries, so
//! a spray of addresses or credentials cannot grow them without bound.
//!
//! [`RateLimiter`] bounds the requests of each authenticated principal (token bucket).

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Failures allowed per credential id in one window.
pub const MAX_FAILURES_PER_CREDENTIAL: u32 = 10;
/// Failures allowed per source address in one window (all credentials together).
pub const MAX_FAILURES_PER_ADDRESS: u32 = 100;
/// Length of a window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Entries of a table before expired windows are pruned.
const PRUNE_AT: usize = 10_000;
/// Most entries of a table: past it (after pruning) new sources or credentials are not counted
/// until windows expire (the other table still is).
pub const TRACKED_MAX: usize = 100_000;

/// Failure counts per source address and per credential id.
#[derive(Default)]
pub struct AuthGuard {
    windows: Mutex<Table<IpAddr>>,
    credentials: Mutex<Table<[u8; 16]>>,
}

/// Windows by key, and when the table was last pruned full.
struct Table<K> {
    map: HashMap<K, Window>,
    full_prune: Option<Instant>,
}

impl<K> Default for Table<K> {
    fn default() -> Self {
        Table {
            map: HashMap::new(),
            full_prune: None,
        }
    }
}

struct Window {
    start: Instant,
    failures: u32,
}

/// A credential id as the guard keys it: a hash, so a long header costs no more than a short one.
fn credential_key(credential: &str) -> [u8; 16] {
    let digest = Sha256::digest(credential.as_bytes());
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

fn locked<K: Hash + Eq>(table: &Table<K>, key: &K, max: u32) -> Result<(), Duration> {
    let now = Instant::now();
    match table.map.get(key) {
        Some(w) if w.failures >= max && now < w.start + WINDOW => {
            Err((w.start + WINDOW - now).max(Duration::from_secs(1)))
        }
        _ => Ok(()),
    }
}

/// Counts a failure of `key`; true when it reaches `max` (just locked). Expired windows are pruned
/// when the table reaches a multiple of [`PRUNE_AT`] entries, and when it is full at most once a
/// second, so a table kept full by a spray costs one pass per [`PRUNE_AT`] new entries (or per
/// second), not one per failure.
fn count<K: Hash + Eq>(table: &mut Table<K>, key: K, max: u32) -> bool {
    let now = Instant::now();
    if !table.map.contains_key(&key) {
        let len = table.map.len();
        if len >= TRACKED_MAX {
            if table
                .full_prune
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
            {
                return false;
            }
            table.full_prune = Some(now);
            table.map.retain(|_, w| now < w.start + WINDOW);
            if table.map.len() >= TRACKED_MAX {
                return false;
            }
        } else if len >= PRUNE_AT && len.is_multiple_of(PRUNE_AT) {
            table.map.retain(|_, w| now < w.start + WINDOW);
        }
    }
    let w = table.map.entry(key).or_insert(Window {
        start: now,
        failures: 0,
    });
    if now >= w.start + WINDOW {
        *w = Window {
            start: now,
            failures: 0,
        };
    }
    w.failures = w.failures.saturating_add(1);
    w.failures == max
}

impl AuthGuard {
    /// `Err(retry_after)` when `ip` used up its failures in the current window.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        locked(&self.windows.lock(), &ip, MAX_FAILURES_PER_ADDRESS)
    }

    /// `Err(retry_after)` when `ip`, or the credential id the request presents, used up its
    /// failures in the current window.
    pub fn check_credential(&self, ip: IpAddr, credential: Option<&str>) -> Result<(), Duration> {
        self.check(ip)?;
        match credential {
            Some(c) => locked(
                &self.credentials.lock(),
                &credential_key(c),
                MAX_FAILURES_PER_CREDENTIAL,
            ),
            None => Ok(()),
        }
    }

    /// Counts a failed authentication from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        if count(&mut self.windows.lock(), ip, MAX_FAILURES_PER_ADDRESS) {
            tracing::warn!(%ip, "too many failed authentications; refusing this source for {WINDOW:?}");
        }
    }

    /// Counts a failed authentication from `ip` presenting `credential` (None when the request
    /// named none: a missing or malformed header counts for the address only).
    pub fn failed_credential(&self, ip: IpAddr, credential: Option<&str>) {
        self.failed(ip);
        if let Some(c) = credential
            && count(
                &mut self.credentials.lock(),
                credential_key(c),
                MAX_FAILURES_PER_CREDENTIAL,
            )
        {
            tracing::warn!(%ip, credential = %c, "too many failed authentications; refusing this credential for {WINDOW:?}");
        }
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
        let mut buckets = self.buckets.lock();
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
        let len = l.buckets.lock().len();
        assert!(len <= BUCKETS_PRUNE_AT, "{len}");
    }

    #[test]
    fn a_source_is_refused_after_too_many_failures_and_others_are_not() {
        let g = AuthGuard::default();
        let bad: IpAddr = [10, 0, 0, 1].into();
        let good: IpAddr = [10, 0, 0, 2].into();
        for _ in 0..MAX_FAILURES_PER_ADDRESS {
            assert!(g.check(bad).is_ok());
            g.failed(bad);
        }
        let retry = g.check(bad).unwrap_err();
        assert!(retry <= WINDOW && retry >= Duration::from_secs(1));
        assert!(g.check_credential(bad, Some("tok_valid")).is_err());
        assert!(g.check(good).is_ok());
    }

    // Fails before the change: 10 failures locked the address, valid credentials with it.
    #[test]
    fn a_credential_is_locked_but_its_neighbours_are_not() {
        let g = AuthGuard::default();
        let nat: IpAddr = [192, 0, 2, 1].into();
        let elsewhere: IpAddr = [192, 0, 2, 2].into();
        for _ in 0..MAX_FAILURES_PER_CREDENTIAL {
            assert!(g.check_credential(nat, Some("tok_guessed")).is_ok());
            g.failed_credential(nat, Some("tok_guessed"));
        }
        assert!(g.check_credential(nat, Some("tok_guessed")).is_err());
        // The same credential from anywhere else is locked too: guessing must not move.
        assert!(g.check_credential(elsewhere, Some("tok_guessed")).is_err());
        // Another credential from the same address gets in.
        assert!(g.check_credential(nat, Some("tok_valid")).is_ok());
        assert!(g.check_credential(nat, None).is_ok());
    }

    #[test]
    fn the_credential_table_stays_bounded() {
        let g = AuthGuard::default();
        for i in 0..TRACKED_MAX + 10 {
            let c = format!("tok_{i}");
            count(
                &mut g.credentials.lock(),
                credential_key(&c),
                MAX_FAILURES_PER_CREDENTIAL,
            );
        }
        assert!(g.credentials.lock().map.len() <= TRACKED_MAX);
    }
}
