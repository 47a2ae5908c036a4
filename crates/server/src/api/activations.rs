//! `POST /v1/activations`, `GET /v1/activations`: codes that agents register with.

use super::{ApiError, ApiJson, page_limit};
use crate::access::authz::{Action, Principal, Resource};
use crate::errors::{Answered, Code};
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
    let activation = create_activation(&state, &p, req, "").await?;
    Ok((StatusCode::CREATED, Json(activation)))
}

/// Checks and stores an activation; shared with SSM's CreateActivation (which also names an IAM
/// role, kept only to be shown back).
pub(crate) async fn create_activation<D>(
    state: &AppState,
    p: &Principal,
    req: CreateActivation,
    iam_role: &str,
) -> Result<Activation, Answered<D>> {
    state
        .authz
        .require(p, Action::ManageActivations, Resource::Fleet)?;
    if req.tags.len() > MAX_TAGS {
        return Err(Answered::new(
            Code::InvalidTag,
            format!("at most {MAX_TAGS} tags"),
        ));
    }
    for (k, v) in &req.tags {
        check_tag_key(k).map_err(|e| Answered::new(Code::InvalidTag, e.0))?;
        check_tag_value(v).map_err(|e| Answered::new(Code::InvalidTag, e.0))?;
    }
    let limit = page_limit(req.limit, 1, MAX_LIMIT).map_err(|e| Answered::from(e.error))?;
    let expires_in = req.expires_in_secs.unwrap_or(DEFAULT_EXPIRY_SECS);
    if !(1..=MAX_EXPIRY_SECS).contains(&expires_in) {
        return Err(Answered::new(
            Code::InvalidParameters,
            format!("expiry must be 1 s to 30 days ({MAX_EXPIRY_SECS} s), got {expires_in} s"),
        ));
    }
    if req.description.len() > 256 {
        return Err(Answered::new(
            Code::InvalidParameters,
            "description is longer than 256 bytes",
        ));
    }
    let name = &req.default_instance_name;
    if name.len() > 256 || name.chars().any(char::is_control) {
        return Err(Answered::new(
            Code::InvalidParameters,
            "a default instance name is at most 256 bytes, without control characters",
        ));
    }
    if iam_role.len() > 64 {
        return Err(Answered::new(
            Code::InvalidParameters,
            "an IAM role is at most 64 characters",
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
            (name, iam_role),
        )
        .await?;
    Ok(Activation {
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
        default_instance_name: req.default_instance_name,
        iam_role: iam_role.to_owned(),
    })
}

/// Deletes an activation (nodes registered with it stay). Answers 204.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<StatusCode, ApiError> {
    delete_activation(&state, &p, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes an activation; shared with SSM's DeleteActivation.
pub(crate) async fn delete_activation<D>(
    state: &AppState,
    p: &Principal,
    id: &str,
) -> Result<(), Answered<D>> {
    state
        .authz
        .require(p, Action::ManageActivations, Resource::Fleet)?;
    if id.len() > 64 || !state.store.delete_activation(id).await? {
        return Err(Answered::new(
            Code::ActivationNotFound,
            format!("no activation {id:.64}"),
        ));
    }
    Ok(())
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
