//! `GET /v1/storage`: what the server keeps, and for how long.

use super::ApiError;
use crate::AppState;
use crate::access::authz::{Action, Principal, Resource};
use axum::extract::State;
use axum::{Extension, Json};
use fleetrun_proto::api::Storage;
use fleetrun_proto::time::rfc3339;
use std::sync::Arc;

/// Sizes and counts of stored state.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Storage>, ApiError> {
    state.authz.require(&p, Action::List, Resource::Fleet)?;
    let totals = state.store.totals().await?;
    let database_bytes = state.store.database_bytes().await?;
    Ok(Json(Storage {
        database_bytes,
        output_bytes: totals.output_bytes,
        commands: totals.commands,
        invocations: totals.invocations,
        retention_secs: state.retention.as_secs(),
        oldest_command_at: totals.oldest_command_at.map(rfc3339),
        live_output_actors: state.outputs.live() as u64,
        output_s3_queued: state.store.queued_exports().await?,
    }))
}
