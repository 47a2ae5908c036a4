//! Bounds on what clients can hold open: counts of connections (or handshakes) per source address and
//! in total, and the process's descriptor limit they all draw on.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// Descriptors kept back from the connection cap for the database, output objects, logs and TLS
/// files, so a full house of clients cannot starve the server's own work (half the limit when it
/// is below twice this).
pub const FD_RESERVE: u64 = 256;

/// Counts of things held open per source address and in total; a [`Slot`] is one of them, released
/// when dropped. Clones share the counts.
#[derive(Clone, Debug, Default)]
pub struct Counter {
    inner: Arc<Mutex<Counts>>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
    /// Woken when the total drops to 0 (shutdown waits on it for the last socket).
    emptied: Arc<tokio::sync::Notify>,
}

/// Why a [`Counter`] refused a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The source address holds `limit` already.
    PerAddress {
        /// The per-address limit.
        limit: usize,
    },
    /// The whole server holds `limit` already.
    Total {
        /// The total limit.
        limit: usize,
    },
}

impl Counter {
    /// Takes a slot for `ip` unless it holds `per_address` already or all hold `total` (0 = no
    /// limit, for either).
    pub fn acquire(&self, ip: IpAddr, per_address: usize, total: usize) -> Result<Slot, Refused> {
        let mut c = self.inner.lock();
        if total > 0 && c.total >= total {
            return Err(Refused::Total { limit: total });
        }
        let n = c.per_address.get(&ip).copied().unwrap_or(0);
        if per_address > 0 && n >= per_address {
            return Err(Refused::PerAddress { limit: per_address });
        }
        c.total += 1;
        c.per_address.insert(ip, n + 1);
        Ok(Slot {
            counts: self.inner.clone(),
            ip,
        })
    }

    /// Slots held in total.
    pub fn total(&self) -> usize {
        self.inner.lock().total
    }

    /// Returns once no slot is held (at once if none is).
    pub async fn wait_empty(&self) {
        let emptied = self.inner.lock().emptied.clone();
        loop {
            // Registered before the count is read, so a release in between is not missed.
            let notified = emptied.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.total() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Slots held by `ip`.
    pub fn held_by(&self, ip: IpAddr) -> usize {
        self.inner.lock().per_address.get(&ip).copied().unwrap_or(0)
    }
}

/// One connection (or handshake) counted by a [`Counter`], until dropped.
#[derive(Debug)]
pub struct Slot {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock();
        c.total = c.total.saturating_sub(1);
        if c.total == 0 {
            c.emptied.notify_waiters();
        }
        if let Some(n) = c.per_address.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_address.remove(&self.ip);
            }
        }
    }
}

/// Raises the process's soft limit of open descriptors to its hard limit (a server holds one per
/// client, and the soft default, often 1024, is far below what the hard limit allows). Returns the
/// soft limit in force afterwards; None if it cannot be read.
pub fn raise_nofile_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft >= hard {
        return Some(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => {
            tracing::debug!(from = soft, to = hard, "raised the open-file limit");
            Some(hard)
        }
        Err(e) => {
            tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            Some(soft)
        }
    }
}

/// The total connection cap when none is configured: the descriptor limit less [`FD_RESERVE`]
/// (or less half of it, when it is small).
pub fn default_max_connections(nofile: Option<u64>) -> usize {
    let fds = nofile.unwrap_or(1024);
    let n = fds.saturating_sub(FD_RESERVE.min(fds / 2)).max(1);
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// The per-address cap in force: at most half the total, so one source can never take every
/// connection (0, no per-address limit, becomes that half too).
pub fn effective_per_address(per_address: usize, total: usize) -> usize {
    let half = (total / 2).max(1);
    if per_address == 0 {
        half
    } else {
        per_address.min(half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_address_and_in_total_and_released_on_drop() {
        let c = Counter::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = c.acquire(a, 2, 3).unwrap();
        let _a2 = c.acquire(a, 2, 3).unwrap();
        assert_eq!(
            c.acquire(a, 2, 3).unwrap_err(),
            Refused::PerAddress { limit: 2 }
        );
        let _b1 = c.acquire(b, 2, 3).unwrap();
        assert_eq!(c.acquire(b, 2, 3).unwrap_err(), Refused::Total { limit: 3 });
        drop(a1);
        assert_eq!(c.held_by(a), 1);
        assert!(c.acquire(a, 2, 3).is_ok());
        // 0 means no limit.
        let many: Vec<_> = (0..10).map(|_| c.acquire(a, 0, 0).unwrap()).collect();
        assert_eq!(c.total(), 12);
        drop(many);
        assert_eq!(c.total(), 2);
    }

    #[test]
    fn the_soft_descriptor_limit_is_raised_to_the_hard_one() {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // Lower the soft limit (this test process only; the hard one stays) and raise it again.
        let low = hard.min(512);
        setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
        assert_eq!(raise_nofile_limit(), Some(hard));
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
        assert_eq!(default_max_connections(Some(1024)), 768);
        assert_eq!(default_max_connections(Some(100)), 50);
        assert_eq!(effective_per_address(256, 768), 256);
        assert_eq!(effective_per_address(256, 50), 25);
        assert_eq!(effective_per_address(0, 50), 25);
    }
}

/// A request body that must arrive whole within a deadline: past it, reading fails with
/// [`BodyTimedOut`] (a client that stops mid-body must not hold its connection and handler).
pub struct DeadlineBody {
    inner: axum::body::Body,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    limit: std::time::Duration,
    /// Each frame moves the deadline on (a limit on time without bytes, for streamed uploads).
    idle: bool,
}

/// A request body did not arrive within the body read timeout.
#[derive(Debug, thiserror::Error)]
#[error("request body not received within {} (the body read timeout)", humantime::format_duration(*.0))]
pub struct BodyTimedOut(pub std::time::Duration);

impl DeadlineBody {
    /// `inner`, which must end within `limit` from now.
    pub fn new(inner: axum::body::Body, limit: std::time::Duration) -> Self {
        DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(limit)),
            limit,
            idle: false,
        }
    }

    /// `inner`, which may take any time but must never go `limit` without a byte.
    pub fn idle(inner: axum::body::Body, limit: std::time::Duration) -> Self {
        let mut body = DeadlineBody::new(inner, limit);
        body.idle = true;
        body
    }
}

impl http_body::Body for DeadlineBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            if self.idle {
                let next = tokio::time::Instant::now() + self.limit;
                self.deadline.as_mut().reset(next);
            }
            return Poll::Ready(frame);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let limit = self.limit;
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut(limit)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Most bytes of a refused body read and dropped after its answer (see the `Drop` below).
pub const DRAIN_MAX: usize = 8 * 1024 * 1024;

/// A body its handler did not read to the end (one over its limit, a request refused before its
/// body was needed) is read on and dropped, at most [`DRAIN_MAX`] bytes within what is left of the
/// body read timeout, while the answer goes out: closing a connection with unread bytes makes the
/// kernel reset it, and a client still sending then gets that reset instead of the answer
/// (seen with a 3 MiB body to the 2 MiB SSM door). A body drained whole keeps its connection.
impl Drop for DeadlineBody {
    fn drop(&mut self) {
        use http_body::Body as _;
        if self.inner.is_end_stream() || self.deadline.is_elapsed() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let body = std::mem::replace(&mut self.inner, axum::body::Body::empty());
        let until = self
            .deadline
            .deadline()
            .min(tokio::time::Instant::now() + self.limit);
        runtime.spawn(drain(body, until));
    }
}

/// Reads `body` to its end and drops it, unless it is over [`DRAIN_MAX`] or `until` comes first.
async fn drain(body: axum::body::Body, until: tokio::time::Instant) {
    use futures_util::StreamExt;
    let mut data = body.into_data_stream();
    let mut left = DRAIN_MAX;
    let _ = tokio::time::timeout_at(until, async {
        while let Some(Ok(chunk)) = data.next().await {
            match left.checked_sub(chunk.len()) {
                Some(l) => left = l,
                None => return,
            }
        }
    })
    .await;
}

/// The body read timeout an error (of reading a body) comes from, if it does.
pub fn body_timed_out(e: &(dyn std::error::Error + 'static)) -> Option<std::time::Duration> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<BodyTimedOut>() {
            return Some(t.0);
        }
        cur = err.source();
    }
    None
}
