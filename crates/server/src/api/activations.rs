//! `POST /v1/activations`, `GET /v1/activations`: codes that agents register with.

use super::{ApiError, ApiJson, page_limit};
use crate::access::authz::{Action, Principal, Resource};
use crate::errors::Code;
use crate::{AppState, access::secrets};
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use fleetrun_proto::api::{Activation, CreateActivation};
use fleetrun_proto::targets::{check_tag_key, check_tag_value};
use fleetrun_proto::time::{now_ms, rfc3339};
use std::sync::Arc;

const DEFAULT_EXPIRY_SECS: u64 = 24 * 3600;
const MAX_EXPIRY_SECS: u64 = 30 * 24 * 3600;
const MAX_LIMIT: u64 = 1_000_000;
const MAX_TAGS: usize = 50;

/// Creates an activation and returns its code (the only time the code is shown).
pub async fn create(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    ApiJson(req): ApiJson<CreateActivation>,
) -> Result<(StatusCode, Json<Activation>), ApiError> {
    state
        .authz
        .require(&p, Action::ManageActivations, Resource::Fleet)?;
    if req.tags.len() > MAX_TAGS {
        return Err(ApiError::new(
            Code::InvalidTag,
            format!("at most {MAX_TAGS} tags"),
        ));
    }
    for (k, v) in &req.tags {
        check_tag_key(k).map_err(|e| ApiError::new(Code::InvalidTag, e.0))?;
        check_tag_value(v).map_err(|e| ApiError::new(Code::InvalidTag, e.0))?;
    }
    let limit = page_limit(req.limit, 1, MAX_LIMIT)?;
    let expires_in = req.expires_in_secs.unwrap_or(DEFAULT_EXPIRY_SECS);
    if !(1..=MAX_EXPIRY_SECS).contains(&expires_in) {
        return Err(ApiError::new(
            Code::InvalidParameters,
            format!("expiry must be 1 s to 30 days ({MAX_EXPIRY_SECS} s), got {expires_in} s"),
        ));
    }
    if req.description.len() > 256 {
        return Err(ApiError::new(
            Code::InvalidParameters,
            "description is longer than 256 bytes",
        ));
    }
    let code = secrets::random_token(20);
    let activation_id = fleetrun_proto::CommandId::from_random(secrets::random_u128()).to_string();
    let now = now_ms();
    let expires_at = now + expires_in as i64 * 1000;
    state
        .store
        .insert_activation(
            &activation_id,
            &secrets::hash(&code),
            &req.tags,
            limit,
            &req.description,
            now,
            expires_at,
        )
        .await?;
    let activation = Activation {
        activation_id,
        code,
        tags: req.tags,
        limit,
        registrations: 0,
        created_at: rfc3339(now),
        expires_at: rfc3339(expires_at),
        expired: false,
        description: req.description,
        ca_fingerprint: state.ca_fingerprint.clone(),
    };
    Ok((StatusCode::CREATED, Json(activation)))
}

/// Lists activations (without codes).
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Vec<Activation>>, ApiError> {
    state
        .authz
        .require(&p, Action::ManageActivations, Resource::Fleet)?;
    Ok(Json(state.store.list_activations().await?))
}
