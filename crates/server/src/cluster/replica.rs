//! This server's replica: its id (kept in the data dir, which it locks), the heartbeat that keeps
//! it a member and renews the leases of the commands it owns, its estimate of the database's
//! clock, and the taking of commands to dispatch (its own at start, then any whose lease ran out).
//!
//! A command is dispatched by one replica at a time, its owner, whose every dispatch write
//! carries the owner's fence ([`Fence`]); the store refuses a write once another replica (or a
//! later run of this one) has taken the command, and the dispatcher stops there
//! (`run::dispatch`). One server on its own is a group of one: the same path, with its own
//! commands taken back at once on restart.

use crate::AppState;
use crate::run::dispatch;
use anyhow::Context;
use fleetrun_proto::CommandId;
use fleetrun_proto::time::now_ms;
use fleetrun_store::{Fence, Owner, StoreError};
use nix::fcntl::{Flock, FlockArg};
use std::collections::HashSet;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// Most commands one claim takes; the rest wait for the next round of the same beat.
const CLAIM_BATCH: u32 = 256;

/// Longest replica id read from the data dir.
const ID_MAX: usize = 100;

/// This server as a member of the replicas on its database.
pub struct Replica {
    id: String,
    lease: Duration,
    /// The database's clock minus this process's, in ms, as the last heartbeat measured it.
    clock_offset: AtomicI64,
    /// The other replicas alive at the last heartbeat (their heartbeat within a lease).
    peers: parking_lot::RwLock<HashSet<String>>,
}

impl Replica {
    /// Replica `id` holding command leases of `lease`.
    pub fn new(id: String, lease: Duration) -> Self {
        Replica {
            id,
            lease,
            clock_offset: AtomicI64::new(0),
            peers: Default::default(),
        }
    }

    /// Its id, unique among the replicas of a database and kept across restarts.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn lease_ms(&self) -> u32 {
        u32::try_from(self.lease.as_millis()).unwrap_or(u32::MAX)
    }

    /// The owner of a command this replica creates.
    pub fn owner(&self) -> Owner {
        Owner {
            replica_id: self.id.clone(),
            lease_ms: self.lease_ms(),
        }
    }

    /// This replica's fence for a command it holds at `epoch`.
    pub fn fence(&self, epoch: i64) -> Fence {
        Fence {
            owner: self.id.clone(),
            epoch,
        }
    }

    /// Now by the database's clock (epoch ms), estimated from this process's clock: deadlines
    /// are measured by it, so replicas whose clocks disagree still agree on them.
    pub fn now_ms(&self) -> i64 {
        now_ms().saturating_add(self.clock_offset.load(Ordering::Relaxed))
    }

    /// Whether `replica` is another replica alive at the last heartbeat.
    pub fn is_live_peer(&self, replica: &str) -> bool {
        replica != self.id && self.peers.read().contains(replica)
    }

    /// Takes `replica` as alive until the next heartbeat says otherwise: it just spoke on the bus.
    pub fn saw_peer(&self, replica: &str) {
        if replica != self.id && !self.peers.read().contains(replica) {
            self.peers.write().insert(replica.to_owned());
        }
    }

    /// Reads the other replicas alive now (one lease) and keeps them.
    async fn see_peers(&self, store: &fleetrun_store::Store) -> Result<(), StoreError> {
        let live = store.live_replicas(self.lease_ms()).await?;
        *self.peers.write() = live
            .into_iter()
            .map(|r| r.replica_id)
            .filter(|id| *id != self.id)
            .collect();
        Ok(())
    }

    /// Reads the database's clock and keeps its offset from ours (taken at the read's midpoint).
    async fn measure_clock(&self, store: &fleetrun_store::Store) -> Result<(), StoreError> {
        let before = now_ms();
        let db = store.db_now_ms().await?;
        let after = now_ms();
        let midpoint = before + (after - before) / 2;
        self.clock_offset.store(db - midpoint, Ordering::Relaxed);
        Ok(())
    }
}

/// The lock a running server holds on its data dir: one process per data dir, so one per
/// replica id. Released when dropped (or when the process ends, however it ends).
pub struct DataDirLock(#[allow(dead_code)] Flock<File>);

/// Locks `data_dir` for this process and returns the replica id kept there (`replica.id`,
/// made on first start).
pub fn identify(data_dir: &Path) -> anyhow::Result<(String, DataDirLock)> {
    let lock_path = data_dir.join("server.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => DataDirLock(lock),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => anyhow::bail!(
            "another fleetrun server uses data dir {} (it holds {}): stop it, or give this \
             server a data dir of its own",
            data_dir.display(),
            lock_path.display()
        ),
        Err((_, e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()));
        }
    };
    let id_path = data_dir.join("replica.id");
    let id = match std::fs::read_to_string(&id_path) {
        Ok(text) => {
            let id = text.trim();
            let valid = !id.is_empty()
                && id.len() <= ID_MAX
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !valid {
                anyhow::bail!(
                    "{} does not hold a replica id (1 to {ID_MAX} of A-Z a-z 0-9 - _ .): \
                     fix it, or remove it to get a new id",
                    id_path.display()
                );
            }
            id.to_owned()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = new_id();
            crate::app::write_private_file(&id_path, format!("{id}\n").as_bytes())?;
            id
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", id_path.display())),
    };
    Ok((id, lock))
}

/// A new replica id: the host's name (what an operator recognises in logs), then random hex
/// (two servers on one host, or hosts of the same name, stay apart).
fn new_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect();
    let suffix = format!("{:016x}", crate::access::secrets::random_u128() as u64);
    if host.is_empty() {
        format!("replica-{suffix}")
    } else {
        format!("{host}-{suffix}")
    }
}

/// Joins the replicas at start: the first heartbeat, then the commands this replica's earlier run
/// owned (back at once, a new epoch fencing that run), then any whose lease ran out.
pub async fn join(state: &Arc<AppState>) -> Result<(), StoreError> {
    heartbeat(state).await?;
    let replica = &state.replica;
    let own = state
        .store
        .reclaim_own_commands(replica.id(), replica.lease_ms())
        .await?;
    take(state, own, Taken::Resumed).await?;
    claim_expired(state).await
}

/// Heartbeats every third of the lease until shutdown, taking over expired commands after each.
pub async fn run(state: Arc<AppState>) {
    let beat = state.replica.lease / 3;
    let shutdown = state.shutdown.clone();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(beat) => {}
        }
        // A failed beat (the database unreachable) is retried at the next: this replica's
        // writes are fenced meanwhile if a peer took its commands, so nothing runs twice.
        if let Err(e) = beat_once(&state).await {
            tracing::warn!(replica = state.replica.id(), "heartbeat failed: {e}");
        }
    }
}

async fn beat_once(state: &Arc<AppState>) -> Result<(), StoreError> {
    heartbeat(state).await?;
    claim_expired(state).await
}

/// One heartbeat: the database's clock measured, this replica's row and leases renewed, the
/// live peers read.
async fn heartbeat(state: &AppState) -> Result<(), StoreError> {
    let replica = &state.replica;
    replica.measure_clock(&state.store).await?;
    state
        .store
        .heartbeat_replica(replica.id(), &state.public_url, replica.lease_ms())
        .await?;
    replica.see_peers(&state.store).await
}

/// Leaves the replicas at a clean shutdown, once its dispatchers stopped: its row goes and its
/// commands' leases end now, so a peer takes them over at its next beat.
pub async fn leave(state: &AppState) {
    match state.store.remove_replica(state.replica.id()).await {
        Ok(released) if released > 0 => {
            tracing::info!(
                commands = released,
                "leases released for the other replicas"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot leave the replicas (leases run out instead): {e}"),
    }
}

async fn claim_expired(state: &Arc<AppState>) -> Result<(), StoreError> {
    loop {
        let taken = state
            .store
            .claim_commands(state.replica.id(), state.replica.lease_ms(), CLAIM_BATCH)
            .await?;
        let full = taken.len() == CLAIM_BATCH as usize;
        take(state, taken, Taken::Claimed).await?;
        if !full {
            return Ok(());
        }
    }
}

#[derive(Clone, Copy)]
enum Taken {
    /// This replica's own, from its earlier run.
    Resumed,
    /// Another's (or nobody's) whose lease ran out.
    Claimed,
}

/// Starts a dispatcher for each command taken, at its new epoch.
async fn take(
    state: &Arc<AppState>,
    taken: Vec<(CommandId, i64)>,
    how: Taken,
) -> Result<(), StoreError> {
    for (id, epoch) in taken {
        let Some(row) = state.store.command_row(&id).await? else {
            continue;
        };
        match how {
            Taken::Resumed => tracing::info!(command = %id, epoch, "resuming dispatch"),
            Taken::Claimed => tracing::info!(command = %id, epoch, "taking over dispatch"),
        }
        dispatch::spawn(state.clone(), row, state.replica.fence(epoch));
    }
    Ok(())
}
