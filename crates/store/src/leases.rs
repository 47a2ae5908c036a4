//! Server replicas on one database: their membership, which replica owns (dispatches) each
//! command, and the fencing of an earlier owner's writes.
//!
//! A replica heartbeats its row in `replicas`; each heartbeat also renews the leases of the
//! active commands it owns. A command whose lease ran out (its owner stopped heartbeating) is
//! taken over by [`Store::claim_commands`], which bumps the command's `owner_epoch`. The owner's
//! dispatch writes carry a [`Fence`] (owner, epoch), checked in the write's own transaction with
//! the command's row locked: once another replica has claimed the command, the old owner's
//! writes change nothing and return [`StoreError::Fenced`]. Results reported by agents carry no
//! fence: they are facts about a node, whichever replica hears them.
//!
//! Every time here is the database's clock (`Dialect::now_ms`), in SQL: replicas never compare
//! their own clocks.

use super::{Columns, Conn, Result, Store, StoreError, with_conn, with_pool};
use fleetrun_proto::CommandId;

/// The statuses of a command that has not ended (the ones a lease matters for).
pub(crate) const ACTIVE: &str = "('Pending', 'InProgress', 'Cancelling')";

/// What a command's owner's writes carry: they apply only while the command is still owned by
/// `owner` at `epoch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The owning replica's id.
    pub owner: String,
    /// The claim's epoch (1 for the replica that created the command, +1 per takeover).
    pub epoch: i64,
}

/// Who owns a new command: the replica that creates it, for a first lease of `lease_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The replica's id.
    pub replica_id: String,
    /// Ms (by the database's clock) until the lease runs out unless renewed.
    pub lease_ms: u32,
}

/// A replica's membership row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replica {
    /// Its id.
    pub replica_id: String,
    /// Where its peers reach it.
    pub address: String,
    /// Its first heartbeat (epoch ms, database clock).
    pub started_at: i64,
    /// Its last heartbeat (epoch ms, database clock).
    pub heartbeat_at: i64,
}

/// Who owns a command, and until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandLease {
    /// The owning replica ("" for none).
    pub owner: String,
    /// The owner's epoch (0: never owned).
    pub epoch: i64,
    /// When the lease runs out (epoch ms, database clock).
    pub lease_until: i64,
}

impl CommandLease {
    /// The fence of the lease's holder.
    pub fn fence(&self) -> Fence {
        Fence {
            owner: self.owner.clone(),
            epoch: self.epoch,
        }
    }
}

/// Checks `fence` (when given) against command `id`'s owner, in the caller's transaction, before
/// it writes: on PostgreSQL the command's row stays locked until that transaction ends, so no
/// claim can commit between the check and the write. Fails with [`StoreError::Fenced`] when
/// another owner or epoch holds the command, and `Missing` when the command does not exist;
/// either way before anything is written.
pub(crate) async fn hold(conn: Conn<'_>, id: &CommandId, fence: Option<&Fence>) -> Result<()> {
    let Some(fence) = fence else { return Ok(()) };
    let held = with_conn!(conn, |c, d| {
        let sql = format!(
            "SELECT owner, owner_epoch FROM commands WHERE command_id = $1{}",
            d.lock_rows()
        );
        // Only the dialect's fixed fragment is formatted in.
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.as_str())
            .fetch_optional(c)
            .await?
            .map(|r| (r.text("owner"), r.int("owner_epoch")))
    });
    match held {
        None => Err(StoreError::Missing("fenced command")),
        Some((owner, epoch)) if owner == fence.owner && epoch == fence.epoch => Ok(()),
        Some((held_by, epoch)) => Err(StoreError::Fenced {
            command: id.clone(),
            held_by,
            epoch,
        }),
    }
}

/// Whether `e` is a refusal by [`hold`]: nothing was written, so the transaction may go on.
pub(crate) fn refused(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Fenced { .. } | StoreError::Missing("fenced command")
    )
}

impl Store {
    /// The database's clock, in epoch ms: the clock every lease and heartbeat is measured by.
    pub async fn db_now_ms(&self) -> Result<i64> {
        with_pool!(self, read, |pool, d| {
            let sql = format!("SELECT {} AS now", d.now_ms());
            // Only the dialect's fixed fragment is formatted in.
            Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_one(pool)
                .await?)
        })
    }

    /// Records that replica `replica_id` (reached at `address`) is alive, now by the database's
    /// clock, and renews in the same transaction the leases of the active commands it owns to
    /// `lease_ms` from now. Returns how many leases it renewed.
    ///
    /// A lease that ran out is renewed too while no other replica has claimed its command: the
    /// owner's epoch is unchanged, so its writes were never fenced.
    pub async fn heartbeat_replica(
        &self,
        replica_id: &str,
        address: &str,
        lease_ms: u32,
    ) -> Result<u64> {
        with_pool!(self, write, |pool, d| {
            let now = d.now_ms();
            let mut tx = pool.begin().await?;
            // The clock read once (PostgreSQL's moves within a statement); `WHERE true` keeps
            // SQLite from reading ON CONFLICT as a join's ON.
            let upsert = format!(
                "INSERT INTO replicas (replica_id, address, started_at, heartbeat_at)
                 SELECT $1, $2, t, t FROM (SELECT {now} AS t) clock WHERE true
                 ON CONFLICT (replica_id) DO UPDATE
                 SET address = excluded.address, heartbeat_at = excluded.heartbeat_at"
            );
            // Only the dialect's fixed fragments are formatted in; values are bound.
            sqlx::query(sqlx::AssertSqlSafe(upsert))
                .bind(replica_id)
                .bind(address)
                .execute(&mut *tx)
                .await?;
            let renew = format!(
                "UPDATE commands SET lease_until = {now} + $2
                 WHERE owner = $1 AND status IN {ACTIVE}"
            );
            let renewed = sqlx::query(sqlx::AssertSqlSafe(renew))
                .bind(replica_id)
                .bind(i64::from(lease_ms))
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            Ok(renewed)
        })
    }

    /// The replicas whose last heartbeat is at most `within_ms` old (database clock), by id.
    pub async fn live_replicas(&self, within_ms: u32) -> Result<Vec<Replica>> {
        with_pool!(self, read, |pool, d| {
            let sql = format!(
                "SELECT replica_id, address, started_at, heartbeat_at FROM replicas
                 WHERE heartbeat_at >= {} - $1 ORDER BY replica_id",
                d.now_ms()
            );
            // Only the dialect's fixed fragment is formatted in; values are bound.
            Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(i64::from(within_ms))
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| Replica {
                    replica_id: r.text("replica_id"),
                    address: r.text("address"),
                    started_at: r.int("started_at"),
                    heartbeat_at: r.int("heartbeat_at"),
                })
                .collect())
        })
    }

    /// Removes replica `replica_id` (its clean shutdown) and ends the leases of the active
    /// commands it owns at once, so a peer takes them over without waiting for them to run out.
    /// Returns how many leases it ended. The replica still owns them (same epoch) until then.
    pub async fn remove_replica(&self, replica_id: &str) -> Result<u64> {
        with_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM replicas WHERE replica_id = $1")
                .bind(replica_id)
                .execute(&mut *tx)
                .await?;
            let released = format!(
                "UPDATE commands SET lease_until = 0 WHERE owner = $1 AND status IN {ACTIVE}"
            );
            // Only a fixed fragment is formatted in; values are bound.
            let released = sqlx::query(sqlx::AssertSqlSafe(released))
                .bind(replica_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            Ok(released)
        })
    }

    /// Takes over up to `limit` active commands whose lease has run out (by the database's
    /// clock) — an unowned command's lease is 0, so those too — for replica `replica_id`, with a
    /// lease of `lease_ms`: each one's epoch goes up by one, fencing its earlier owner. Returns
    /// the commands taken with their new epoch, in no particular order.
    ///
    /// One statement. On PostgreSQL the candidates are locked as they are picked, skipping any
    /// another transaction holds (a racing claim, a fenced write, a renewal): replicas claiming
    /// at once never take the same command, and a row whose lease was renewed after the
    /// statement began is checked again on its new version, so it is not taken. On SQLite the
    /// one writer serializes claims.
    pub async fn claim_commands(
        &self,
        replica_id: &str,
        lease_ms: u32,
        limit: u32,
    ) -> Result<Vec<(CommandId, i64)>> {
        with_pool!(self, write, |pool, d| {
            let now = d.now_ms();
            // MATERIALIZED: the candidates are picked (and locked) once, whatever the plan.
            let sql = format!(
                "WITH picked AS MATERIALIZED (
                     SELECT command_id FROM commands
                     WHERE status IN {ACTIVE} AND lease_until < {now}
                     ORDER BY lease_until, command_id LIMIT $3{})
                 UPDATE commands SET owner = $1, owner_epoch = owner_epoch + 1,
                     lease_until = {now} + $2
                 WHERE command_id IN (SELECT command_id FROM picked)
                 RETURNING command_id, owner_epoch",
                d.lock_rows_skip_locked()
            );
            // Only the dialect's fixed fragments are formatted in; values are bound.
            Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(replica_id)
                .bind(i64::from(lease_ms))
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?
                .iter()
                .filter_map(|r| Some((r.text("command_id").parse().ok()?, r.int("owner_epoch"))))
                .collect())
        })
    }

    /// Takes back, for a new run of replica `replica_id` (a restart on the same data dir), the
    /// active commands its earlier run owned, whether or not their lease ran out: each one's epoch
    /// goes up by one, so a write of that earlier run still under way is fenced, and the lease is
    /// `lease_ms` from now. Returns the commands with their new epoch, in no particular order.
    ///
    /// Only for a replica id no other live process uses (the server locks its data dir, where
    /// the id is kept).
    pub async fn reclaim_own_commands(
        &self,
        replica_id: &str,
        lease_ms: u32,
    ) -> Result<Vec<(CommandId, i64)>> {
        with_pool!(self, write, |pool, d| {
            let sql = format!(
                "UPDATE commands SET owner_epoch = owner_epoch + 1, lease_until = {} + $2
                 WHERE owner = $1 AND status IN {ACTIVE}
                 RETURNING command_id, owner_epoch",
                d.now_ms()
            );
            // Only the dialect's fixed fragment is formatted in; values are bound.
            Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(replica_id)
                .bind(i64::from(lease_ms))
                .fetch_all(pool)
                .await?
                .iter()
                .filter_map(|r| Some((r.text("command_id").parse().ok()?, r.int("owner_epoch"))))
                .collect())
        })
    }

    /// Who owns command `id`, at which epoch, until when; None when it does not exist.
    pub async fn command_lease(&self, id: &CommandId) -> Result<Option<CommandLease>> {
        with_pool!(self, read, |pool| {
            Ok(sqlx::query(
                "SELECT owner, owner_epoch, lease_until FROM commands WHERE command_id = $1",
            )
            .bind(id.as_str())
            .fetch_optional(pool)
            .await?
            .map(|r| CommandLease {
                owner: r.text("owner"),
                epoch: r.int("owner_epoch"),
                lease_until: r.int("lease_until"),
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::tests::new_command;
    use crate::{Finish, InvocationRow};
    use fleetrun_proto::status::details;
    use fleetrun_proto::{CommandStatus, InvocationStatus, NodeId};
    use std::collections::HashSet;
    use std::time::{Duration, Instant};

    /// A lease no test waits out.
    const LONG: u32 = 600_000;

    /// Stores command `seed` on `nodes`, owned by `owner` for `lease_ms` (None: unowned).
    async fn stored(
        store: &Store,
        seed: u128,
        nodes: &[NodeId],
        owner: Option<(&str, u32)>,
    ) -> CommandId {
        let id = CommandId::from_random(seed);
        let mut c = new_command(&id, nodes);
        c.owner = owner.map(|(replica_id, lease_ms)| Owner {
            replica_id: replica_id.into(),
            lease_ms,
        });
        store.insert_command(&c).await.expect("insert");
        id
    }

    fn lease(owner: &str, epoch: i64) -> Fence {
        Fence {
            owner: owner.into(),
            epoch,
        }
    }

    async fn lease_of(store: &Store, id: &CommandId) -> CommandLease {
        store.command_lease(id).await.expect("lease").expect("row")
    }

    /// Waits, bounded, until the database's clock is past `t` (epoch ms).
    async fn db_clock_past(store: &Store, t: i64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while store.db_now_ms().await.expect("db now") <= t {
            assert!(
                Instant::now() < deadline,
                "the database's clock never passed {t}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test]
    async fn the_database_clock_is_epoch_ms() {
        let (_dir, stores) = crate::testing::stores().await;
        for (kind, store) in stores {
            let local = fleetrun_proto::time::now_ms();
            let db = store.db_now_ms().await.expect("db now");
            // The same machine's clock: the unit and epoch are right.
            assert!((db - local).abs() < 60_000, "{kind}: {db} vs {local}");
            db_clock_past(&store, db).await;
            assert!(store.db_now_ms().await.unwrap() > db, "{kind}: it moves");
        }
    }

    /// Heartbeats upsert a replica (its start kept, its address and heartbeat moved), the live
    /// ones are those heard from within the window by the database's clock, and a removed one
    /// is gone.
    #[tokio::test]
    async fn replicas_heartbeat_are_listed_while_live_and_removed() {
        let (_dir, stores) = crate::testing::stores().await;
        for (kind, store) in stores {
            let before = store.db_now_ms().await.unwrap();
            assert_eq!(
                store
                    .heartbeat_replica("b", "10.0.0.2:7000", LONG)
                    .await
                    .unwrap(),
                0
            );
            assert_eq!(
                store
                    .heartbeat_replica("a", "10.0.0.1:7000", LONG)
                    .await
                    .unwrap(),
                0
            );
            let after = store.db_now_ms().await.unwrap();
            let live = store.live_replicas(LONG).await.unwrap();
            let ids: Vec<_> = live.iter().map(|r| r.replica_id.as_str()).collect();
            assert_eq!(ids, ["a", "b"], "{kind}: by id");
            for r in &live {
                assert!(
                    (before..=after).contains(&r.heartbeat_at),
                    "{kind}: {r:?} by the database's clock ({before}..{after})"
                );
                assert_eq!(r.started_at, r.heartbeat_at, "{kind}");
            }
            let (first_a, b) = (live[0].clone(), live[1].clone());

            // a beats again, later, from a new address; b falls silent.
            db_clock_past(&store, b.heartbeat_at + 1_000).await;
            store
                .heartbeat_replica("a", "10.0.0.9:7000", LONG)
                .await
                .unwrap();
            let live = store.live_replicas(500).await.unwrap();
            assert_eq!(live.len(), 1, "{kind}: {live:?}");
            let a = &live[0];
            assert_eq!(
                (a.replica_id.as_str(), a.address.as_str()),
                ("a", "10.0.0.9:7000")
            );
            assert!(a.heartbeat_at > b.heartbeat_at + 1_000, "{kind}");
            assert_eq!(
                a.started_at, first_a.started_at,
                "{kind}: its start is kept"
            );

            store.remove_replica("a").await.unwrap();
            let ids: Vec<_> = store
                .live_replicas(LONG)
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.replica_id)
                .collect();
            assert_eq!(ids, ["b"], "{kind}");
        }
    }

    /// A heartbeat renews the leases of its replica's active commands only: not another
    /// replica's, not an ended command's. A clean removal ends its leases at once.
    #[tokio::test]
    async fn heartbeats_renew_only_the_owners_active_leases() {
        let (_dir, stores) = crate::testing::stores().await;
        for (kind, store) in stores {
            let n = [NodeId::from_random(1)];
            let mine = stored(&store, 1, &n, Some(("a", 1_000))).await;
            let cancelling = stored(&store, 2, &n, Some(("a", 1_000))).await;
            let ended = stored(&store, 3, &n, Some(("a", 1_000))).await;
            let theirs = stored(&store, 4, &n, Some(("b", 1_000))).await;
            let unowned = stored(&store, 5, &n, None).await;
            store
                .set_command_status(&cancelling, CommandStatus::Cancelling, "Cancelling", None)
                .await
                .unwrap();
            store
                .set_command_status(&ended, CommandStatus::Success, "Success", None)
                .await
                .unwrap();
            let first = lease_of(&store, &mine).await;
            assert_eq!((first.owner.as_str(), first.epoch), ("a", 1), "{kind}");
            assert_eq!(lease_of(&store, &unowned).await.lease_until, 0, "{kind}");
            let untouched = [
                lease_of(&store, &ended).await,
                lease_of(&store, &theirs).await,
            ];

            let before = store.db_now_ms().await.unwrap();
            let renewed = store.heartbeat_replica("a", "a:1", LONG).await.unwrap();
            assert_eq!(renewed, 2, "{kind}: mine and the cancelling one");
            for id in [&mine, &cancelling] {
                let l = lease_of(&store, id).await;
                assert!(l.lease_until >= before + i64::from(LONG), "{kind}: {l:?}");
                assert_eq!((l.owner.as_str(), l.epoch), ("a", 1), "{kind}: same epoch");
            }
            let now = [
                lease_of(&store, &ended).await,
                lease_of(&store, &theirs).await,
            ];
            assert_eq!(now, untouched, "{kind}");

            // A clean shutdown: its active leases end now, and a peer takes them at once.
            assert_eq!(store.remove_replica("a").await.unwrap(), 2, "{kind}");
            assert_eq!(lease_of(&store, &mine).await.lease_until, 0, "{kind}");
            let mut taken = store.claim_commands("c", LONG, 10).await.unwrap();
            taken.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
            let mut expected = vec![(mine.clone(), 2), (cancelling.clone(), 2), (unowned, 1)];
            expected.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
            assert_eq!(taken, expected, "{kind}");
            assert_eq!(
                lease_of(&store, &ended).await.owner,
                "a",
                "{kind}: never taken"
            );
        }
    }

    /// A restarted replica takes back its own active commands at once, live lease or not, with
    /// a new epoch that fences its earlier run; never another's, never an ended one.
    #[tokio::test]
    async fn a_restarted_replica_takes_back_its_own_commands_with_a_new_epoch() {
        let (_dir, stores) = crate::testing::stores().await;
        for (kind, store) in stores {
            let n = [NodeId::from_random(1)];
            let live = stored(&store, 1, &n, Some(("a", LONG))).await;
            let lapsed = stored(&store, 2, &n, Some(("a", 1))).await;
            let ended = stored(&store, 3, &n, Some(("a", LONG))).await;
            let theirs = stored(&store, 4, &n, Some(("b", 1))).await;
            store
                .set_command_status(&ended, CommandStatus::Success, "Success", None)
                .await
                .unwrap();
            db_clock_past(&store, lease_of(&store, &lapsed).await.lease_until).await;
            let before = store.db_now_ms().await.unwrap();
            let mut back = store.reclaim_own_commands("a", LONG).await.unwrap();
            back.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
            let mut expected = vec![(live.clone(), 2), (lapsed.clone(), 2)];
            expected.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
            assert_eq!(back, expected, "{kind}");
            assert!(lease_of(&store, &lapsed).await.lease_until >= before + i64::from(LONG));
            let l = lease_of(&store, &theirs).await;
            assert_eq!((l.owner.as_str(), l.epoch), ("b", 1), "{kind}");
            assert_eq!(lease_of(&store, &ended).await.epoch, 1, "{kind}");
            // The earlier run's fence no longer holds.
            let refused = store
                .set_command_status(&live, CommandStatus::Failed, "Failed", Some(&lease("a", 1)))
                .await;
            assert!(
                matches!(refused, Err(StoreError::Fenced { .. })),
                "{kind}: {refused:?}"
            );
        }
    }

    /// A claim takes an expired lease (epoch + 1) and an unowned command (epoch 1), never a
    /// live lease or an ended command, at most `limit` at a time; the new lease then holds.
    #[tokio::test]
    async fn a_claim_takes_expired_leases_only() {
        let (_dir, stores) = crate::testing::stores().await;
        for (kind, store) in stores {
            let n = [NodeId::from_random(1)];
            let live = stored(&store, 1, &n, Some(("a", LONG))).await;
            let expiring = stored(&store, 2, &n, Some(("a", 1))).await;
            let ended = stored(&store, 3, &n, Some(("a", 1))).await;
            let unowned = stored(&store, 4, &n, None).await;
            store
                .set_command_status(&ended, CommandStatus::Failed, "Failed", None)
                .await
                .unwrap();
            let gone = lease_of(&store, &ended).await.lease_until;
            db_clock_past(
                &store,
                lease_of(&store, &expiring).await.lease_until.max(gone),
            )
            .await;

            // Limit 1: the oldest lease first (the unowned one's is 0).
            let first = store.claim_commands("b", LONG, 1).await.unwrap();
            assert_eq!(first, vec![(unowned.clone(), 1)], "{kind}");
            let second = store.claim_commands("b", LONG, 10).await.unwrap();
            assert_eq!(second, vec![(expiring.clone(), 2)], "{kind}");
            let l = lease_of(&store, &expiring).await;
            assert_eq!((l.owner.as_str(), l.epoch), ("b", 2), "{kind}");
            assert!(
                store
                    .claim_commands("c", LONG, 10)
                    .await
                    .unwrap()
                    .is_empty(),
                "{kind}: b's new lease, a's live one and the ended command are not taken"
            );
            let l = lease_of(&store, &live).await;
            assert_eq!((l.owner.as_str(), l.epoch), ("a", 1), "{kind}");
            let l = lease_of(&store, &ended).await;
            assert_eq!((l.owner.as_str(), l.epoch), ("a", 1), "{kind}");
        }
    }

    /// A lease is set, and runs out, by the database's clock: a tiny one is `lease_ms` past the
    /// database's time of the insert, and a claim takes it once that clock has passed it.
    #[tokio::test]
    async fn a_tiny_lease_runs_out_by_the_database_clock() {
        let (_dir, stores) = crate::testing::stores().await;
        for (kind, store) in stores {
            let before = store.db_now_ms().await.unwrap();
            let id = stored(&store, 1, &[NodeId::from_random(1)], Some(("a", 40))).await;
            let after = store.db_now_ms().await.unwrap();
            let l = lease_of(&store, &id).await;
            assert!(
                (before + 40..=after + 40).contains(&l.lease_until),
                "{kind}: {l:?} in {before}+40..{after}+40"
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            let taken = loop {
                let taken = store.claim_commands("b", LONG, 10).await.unwrap();
                if !taken.is_empty() {
                    break taken;
                }
                assert!(Instant::now() < deadline, "{kind}: the lease never ran out");
                tokio::time::sleep(Duration::from_millis(2)).await;
            };
            let claimed_by = store.db_now_ms().await.unwrap();
            assert_eq!(taken, vec![(id.clone(), 2)], "{kind}");
            assert!(claimed_by > l.lease_until, "{kind}");
            let l = lease_of(&store, &id).await;
            assert!(
                l.lease_until >= claimed_by - 1_000 + i64::from(LONG),
                "{kind}: {l:?}"
            );
        }
    }

    /// What the fenced writes could change about a command, to compare.
    async fn snapshot(store: &Store, id: &CommandId) -> String {
        let cmd = store.get_command(id).await.unwrap().expect("command");
        let row = store.command_row(id).await.unwrap().expect("row");
        let invs = store.list_invocations(id).await.unwrap();
        let rows: Vec<_> = store
            .invocation_rows(id)
            .await
            .unwrap()
            .into_iter()
            .map(|r: InvocationRow| (r.node_id, r.status, r.delivered, r.started))
            .collect();
        format!(
            "{}\n{}\n{:?}\n{rows:?}\n{:?}",
            serde_json::to_string(&cmd).unwrap(),
            serde_json::to_string(&invs).unwrap(),
            (row.status, row.cancel_requested),
            lease_of(store, id).await,
        )
    }

    /// After a takeover, every dispatch write of the old owner (its old epoch) is refused as
    /// Fenced and changes nothing; the new owner's writes pass, and so do unfenced results.
    #[tokio::test]
    async fn after_a_takeover_the_old_owners_writes_are_fenced() {
        let (_dir, stores) = crate::testing::stores().await;
        for (kind, store) in stores {
            fenced_writes(kind, &store).await;
        }
    }

    async fn fenced_writes(kind: &str, store: &Store) {
        let n: Vec<NodeId> = (0..4).map(NodeId::from_random).collect();
        let id = CommandId::from_random(7);
        let mut c = new_command(&id, &n);
        c.owner = Some(Owner {
            replica_id: "a".into(),
            lease_ms: 1,
        });
        let old = c.fence().expect("owned");
        assert_eq!(old, lease("a", 1));
        store.insert_command(&c).await.unwrap();
        // a's own write passes while it holds the command.
        store
            .mark_delivered(&id, &n[3..], 2, Some(&old))
            .await
            .unwrap();
        db_clock_past(store, lease_of(store, &id).await.lease_until).await;
        let taken = store.claim_commands("b", LONG, 10).await.unwrap();
        assert_eq!(taken, vec![(id.clone(), 2)], "{kind}");
        let new = lease_of(store, &id).await.fence();
        assert_eq!(new, lease("b", 2), "{kind}");

        store
            .mark_delivered(&id, &n[..1], 3, Some(&new))
            .await
            .unwrap();
        let before = snapshot(store, &id).await;
        let fail = Finish::without_running(InvocationStatus::Failed, details::FAILED, 4, "x");
        // The old owner, and a fence of the right epoch but another owner.
        for stale in [old.clone(), lease("a", 2)] {
            let s = Some(&stale);
            let results = [
                store.mark_delivered(&id, &n, 5, s).await,
                store.mark_undelivered(&id, &n[0], s).await,
                store.mark_cancelling(&id, &n, s).await,
                store.mark_cancel_requested(&id, s).await,
                store
                    .set_command_status(&id, CommandStatus::Failed, "Failed", s)
                    .await,
                store
                    .finish_invocations(&id, &[(n[1].clone(), fail.clone())], s)
                    .await
                    .map(|_| ()),
            ];
            for (i, r) in results.into_iter().enumerate() {
                match r {
                    Err(StoreError::Fenced {
                        command,
                        held_by,
                        epoch,
                    }) => assert_eq!(
                        (&command, held_by.as_str(), epoch),
                        (&id, "b", 2),
                        "{kind}: write {i}"
                    ),
                    other => panic!("{kind}: write {i} of {stale:?}: {other:?}"),
                }
            }
            assert_eq!(
                snapshot(store, &id).await,
                before,
                "{kind}: nothing changed"
            );
        }
        let e = store
            .mark_cancel_requested(&id, Some(&old))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(id.as_str()) && e.contains("\"b\""),
            "{kind}: {e}"
        );
        let missing = store
            .set_command_status(
                &CommandId::from_random(8),
                CommandStatus::Failed,
                "x",
                Some(&new),
            )
            .await;
        assert!(
            matches!(missing, Err(StoreError::Missing(_))),
            "{kind}: {missing:?}"
        );

        // An agent's result carries no fence; the new owner's writes pass.
        let ok = Finish::without_running(InvocationStatus::Success, details::SUCCESS, 6, "ok");
        let ended = store
            .finish_invocations(&id, &[(n[3].clone(), ok)], None)
            .await
            .unwrap();
        assert_eq!(ended, vec![n[3].clone()], "{kind}");
        let s = Some(&new);
        store.mark_undelivered(&id, &n[0], s).await.unwrap();
        store.mark_delivered(&id, &n[1..3], 7, s).await.unwrap();
        let ended = store
            .finish_invocations(&id, &[(n[1].clone(), fail)], s)
            .await
            .unwrap();
        assert_eq!(ended, vec![n[1].clone()], "{kind}");
        store.mark_cancelling(&id, &n[2..3], s).await.unwrap();
        store.mark_cancel_requested(&id, s).await.unwrap();
        store
            .set_command_status(&id, CommandStatus::Cancelled, "Cancelled", s)
            .await
            .unwrap();
        let rows = store.invocation_rows(&id).await.unwrap();
        let got: Vec<_> = rows.iter().map(|r| (r.status, r.delivered)).collect();
        use InvocationStatus::{Cancelling, Failed, Pending, Success};
        assert_eq!(
            got,
            [
                (Pending, false),
                (Failed, true),
                (Cancelling, true),
                (Success, true)
            ],
            "{kind}"
        );
        let row = store.command_row(&id).await.unwrap().unwrap();
        assert_eq!(
            (row.status, row.cancel_requested),
            (CommandStatus::Cancelled, true)
        );
        let cmd = store.get_command(&id).await.unwrap().unwrap();
        assert_eq!((cmd.completed_count, cmd.error_count), (2, 1), "{kind}");
    }

    /// Two replicas (two pools on one PostgreSQL database) claiming at once from 50 expired
    /// commands: each command is taken exactly once, none is lost, and its row names the replica
    /// that was told it took it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replicas_claiming_at_once_take_each_command_once() {
        let url = fleetrun_testkit::shared_postgres().create_database();
        let one = Store::open_postgres(&url).await.expect("one");
        let two = Store::open_postgres(&url).await.expect("two");
        let mut all = HashSet::new();
        for i in 0..50 {
            all.insert(
                stored(
                    &one,
                    1000 + i,
                    &[NodeId::from_random(i)],
                    Some(("dead", LONG)),
                )
                .await,
            );
        }
        // Its clean shutdown ends its 50 leases at once.
        assert_eq!(one.remove_replica("dead").await.unwrap(), 50);

        let start = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let racer = |store: Store, me: &'static str| {
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                let mut mine = Vec::new();
                loop {
                    let got = store.claim_commands(me, LONG, 3).await.expect("claim");
                    if got.is_empty() {
                        return mine;
                    }
                    mine.extend(got);
                }
            })
        };
        let (a, b) = (racer(one.clone(), "one"), racer(two.clone(), "two"));
        let (a, b) = (a.await.expect("one"), b.await.expect("two"));

        let mut seen = HashSet::new();
        for (me, taken) in [("one", &a), ("two", &b)] {
            for (id, epoch) in taken {
                assert!(seen.insert(id.clone()), "{id} claimed twice");
                assert_eq!(*epoch, 2, "{id}");
                let l = lease_of(&one, id).await;
                assert_eq!((l.owner.as_str(), l.epoch), (me, 2), "{id}");
            }
        }
        assert_eq!(
            seen,
            all,
            "every command claimed ({} + {})",
            a.len(),
            b.len()
        );
        assert!(
            two.claim_commands("three", LONG, 100)
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// On PostgreSQL a claim does not wait for a fenced write in flight: it skips the command the
    /// write holds, and the write (its fence still holding when it was checked) commits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_skips_a_command_a_fenced_write_holds() {
        let url = fleetrun_testkit::shared_postgres().create_database();
        let store = Store::open_postgres(&url).await.expect("store");
        let id = stored(&store, 1, &[NodeId::from_random(1)], Some(("a", 1))).await;
        db_clock_past(&store, lease_of(&store, &id).await.lease_until).await;
        let crate::Db::Postgres(pool) = &store.db else {
            unreachable!("a PostgreSQL store")
        };
        // The first step of a fenced write, its transaction left open.
        let mut tx = pool.begin().await.unwrap();
        hold(Conn::from(&mut *tx), &id, Some(&lease("a", 1)))
            .await
            .expect("a still holds it");
        assert!(
            store
                .claim_commands("b", LONG, 10)
                .await
                .unwrap()
                .is_empty(),
            "the held command is skipped, not waited for"
        );
        tx.commit().await.unwrap();
        assert_eq!(
            store.claim_commands("b", LONG, 10).await.unwrap(),
            vec![(id, 2)]
        );
    }
}
