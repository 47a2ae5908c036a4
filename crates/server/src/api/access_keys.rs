//! `POST /v1/access-keys`, `GET /v1/access-keys`: SigV4 keys for the SSM-compatible API.

use super::{ApiError, ApiJson};
use crate::clock::{now_ms, rfc3339};
use crate::{AppState, secrets};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use fleetrun_proto::api::{AccessKey, CreateAccessKey};
use std::sync::Arc;

/// Creates a key; the secret is in this answer only.
pub async fn create(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<CreateAccessKey>,
) -> Result<(StatusCode, Json<AccessKey>), ApiError> {
    if req.name.len() > 128 {
        return Err(ApiError::bad_request(
            "InvalidParameters",
            "name is longer than 128 bytes",
        ));
    }
    // Shaped like AWS keys (20 upper-case characters, 40-character secret) so tools that check accept them.
    let access_key_id = format!("FRAK{}", secrets::random_token(16).to_ascii_uppercase());
    let secret_access_key = secrets::random_token(40);
    let (nonce, sealed) = state.secret_box.seal(secret_access_key.as_bytes());
    state
        .store
        .insert_access_key(&access_key_id, &nonce, &sealed, &req.name)
        .await?;
    let key = AccessKey {
        access_key_id,
        secret_access_key,
        name: req.name,
        created_at: rfc3339(now_ms()),
    };
    Ok((StatusCode::CREATED, Json(key)))
}

/// Lists keys without their secrets.
pub async fn list(State(state): State<Arc<AppState>>) -> Result<Json<Vec<AccessKey>>, ApiError> {
    let keys = state.store.list_access_keys().await?;
    Ok(Json(
        keys.into_iter()
            .map(|(access_key_id, name, created)| AccessKey {
                access_key_id,
                secret_access_key: String::new(),
                name,
                created_at: rfc3339(created),
            })
            .collect(),
    ))
}
