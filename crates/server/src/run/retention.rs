//! Retention: a background task purges commands (rows and output objects) and ended session records
//! (with their recordings) older than the retention period, in bounded batches so a large backlog
//! never holds the database for long.

use crate::AppState;
use crate::run::output::command_prefix;
use crate::sessions::recording;
use fleetrun_proto::time::now_ms;
use fleetrun_store::Store;
use futures_util::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use std::sync::Arc;
use std::time::Duration;

/// Commands purged per batch.
const BATCH: u32 = 200;

/// Runs until shutdown: a purge pass every `interval`.
pub async fn run(state: Arc<AppState>, retention: Duration, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // A pass cut short is safe: objects go before rows, and the next start purges the rest.
        let purged = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            r = async {
                tick.tick().await;
                purge(&state.store, state.objects.as_ref(), retention).await
            } => r,
        };
        match purged {
            Ok(0) => {}
            Ok(n) => tracing::info!(commands = n, "purged commands past retention"),
            Err(e) => tracing::error!("retention purge failed: {e}"),
        }
    }
}

/// Purges every ended command older than `retention`; returns how many.
pub async fn purge(
    store: &Store,
    objects: &dyn ObjectStore,
    retention: Duration,
) -> anyhow::Result<usize> {
    let before = now_ms() - retention.as_millis() as i64;
    let mut total = 0;
    loop {
        let ids = store.expired_commands(before, BATCH).await?;
        if ids.is_empty() {
            // Session records age out with the commands, in batches too.
            while purge_sessions(store, objects, before).await? > 0 {
                tokio::task::yield_now().await;
            }
            return Ok(total);
        }
        for id in &ids {
            // Objects first: a crash between the two leaves rows whose output reads as empty, never
            // objects that nothing points to.
            let prefix = command_prefix(id);
            let locations = objects
                .list(Some(&prefix))
                .map(|m| m.map(|m| m.location))
                .boxed();
            let mut deleted = objects.delete_stream(locations);
            while let Some(r) = deleted.next().await {
                match r {
                    Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        store.delete_commands(&ids).await?;
        total += ids.len();
        tokio::task::yield_now().await;
    }
}

/// Purges one batch of session records ended before `before`, their recordings first (as output,
/// so no record outlives its object's deletion unnoticed); returns how many records went.
async fn purge_sessions(
    store: &Store,
    objects: &dyn ObjectStore,
    before: i64,
) -> anyhow::Result<u64> {
    let expired = store.expired_sessions(before, i64::from(BATCH)).await?;
    for (id, recorded) in &expired {
        if !recorded {
            continue;
        }
        match objects.delete(&recording::object_path(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let ids: Vec<String> = expired.into_iter().map(|(id, _)| id).collect();
    Ok(store.delete_sessions(&ids).await?)
}
