//! `POST /v1/access-keys`, `GET /v1/access-keys`: SigV4 keys for the SSM-compatible API.

use super::{ApiError, ApiJson};
use crate::access::authz::{Action, Principal, Resource};
use crate::errors::Code;
use crate::{AppState, access::secrets};
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use fleetrun_proto::api::{AccessKey, CreateAccessKey};
use fleetrun_proto::time::{now_ms, rfc3339};
use std::sync::Arc;

/// Creates a key; the secret is in this answer only.
pub async fn create(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    ApiJson(req): ApiJson<CreateAccessKey>,
) -> Result<(StatusCode, Json<AccessKey>), ApiError> {
    let user = req.user.unwrap_or_else(|| p.user.name.clone());
    if user == p.user.name {
        state.authz.self_service(&p);
    } else {
        state
            .authz
            .require(&p, Action::ManageAccessKeys, Resource::Fleet)?;
        if state.store.user(&user).await?.is_none() {
            return Err(ApiError::new(Code::UserNotFound, format!("no user {user}")));
        }
    }
    if req.name.len() > 128 {
        return Err(ApiError::new(
            Code::InvalidParameters,
            "name is longer than 128 bytes",
        ));
    }
    // Shaped like AWS keys (20 upper-case characters, 40-character secret) so tools that check accept them.
    let access_key_id = format!("FRAK{}", secrets::random_token(16).to_ascii_uppercase());
    let secret_access_key = secrets::random_token(40);
    let (nonce, sealed) = state.secret_box.seal(secret_access_key.as_bytes());
    state
        .store
        .insert_access_key(&access_key_id, &nonce, &sealed, &req.name, &user)
        .await?;
    let key = AccessKey {
        access_key_id,
        secret_access_key,
        name: req.name,
        user,
        created_at: rfc3339(now_ms()),
    };
    Ok((StatusCode::CREATED, Json(key)))
}

/// Lists keys without their secrets: the caller's, or everyone's with manage-access-keys.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Vec<AccessKey>>, ApiError> {
    let only = if state
        .authz
        .allowed(&p, Action::ManageAccessKeys, Resource::Fleet)
    {
        None
    } else {
        Some(p.user.name.as_str())
    };
    let keys = state.store.list_access_keys(only).await?;
    Ok(Json(
        keys.into_iter()
            .map(|(access_key_id, name, user, created)| AccessKey {
                access_key_id,
                secret_access_key: String::new(),
                name,
                user,
                created_at: rfc3339(created),
            })
            .collect(),
    ))
}
