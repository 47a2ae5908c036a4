//! `/v1/tokens`: bearer tokens. Anyone may make and remove its own; manage-users is needed for
//! another user's. The token is shown once; the server keeps its SHA-256.

use super::{ApiError, ApiJson};
use crate::access::authz::{Action, Principal, Resource};
use crate::errors::Code;
use crate::{AppState, access::secrets};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use fleetrun_proto::api::{CreateToken, Token};
use fleetrun_proto::time::now_ms;
use serde::Deserialize;
use std::sync::Arc;

/// Longest token lifetime: ten years.
const MAX_EXPIRY_SECS: u64 = 10 * 365 * 24 * 3600;

/// Creates a token for the caller or, with manage-users, for another user.
pub async fn create(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    ApiJson(req): ApiJson<CreateToken>,
) -> Result<(StatusCode, Json<Token>), ApiError> {
    let user = req.user.unwrap_or_else(|| p.user.name.clone());
    own_or_manage(&state, &p, &user)?;
    if req.name.len() > 128 {
        return Err(ApiError::new(
            Code::InvalidParameters,
            "name is longer than 128 bytes",
        ));
    }
    let expires_at = match req.expires_in_secs {
        None => None,
        Some(s) if (1..=MAX_EXPIRY_SECS).contains(&s) => Some(now_ms() + (s as i64) * 1000),
        Some(s) => {
            return Err(ApiError::new(
                Code::InvalidParameters,
                format!("expiry must be 1 s to 10 years ({MAX_EXPIRY_SECS} s), got {s} s"),
            ));
        }
    };
    if state.store.user(&user).await?.is_none() {
        return Err(ApiError::new(Code::UserNotFound, format!("no user {user}")));
    }
    let token = format!("frt_{}", secrets::random_token(40));
    let mut t = state
        .store
        .insert_token(&secrets::hash(&token), &user, &req.name, expires_at)
        .await?;
    t.token = Some(token);
    Ok((StatusCode::CREATED, Json(t)))
}

/// Query of `GET /v1/tokens`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    user: Option<String>,
}

/// Tokens without secrets: the caller's own, or (with manage-users) anyone's.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<Token>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::new(Code::InvalidRequest, e.body_text()))?;
    let user = match q.user {
        Some(u) => {
            own_or_manage(&state, &p, &u)?;
            Some(u)
        }
        None if state
            .authz
            .allowed(&p, Action::ManageUsers, Resource::Fleet) =>
        {
            None
        }
        None => Some(p.user.name.clone()),
    };
    Ok(Json(state.store.list_tokens(user.as_deref()).await?))
}

/// Revokes a token at once.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let not_found = || ApiError::new(Code::TokenNotFound, format!("no token {id}"));
    let owner = state.store.token_user(&id).await?;
    match owner {
        Some(owner) => own_or_manage(&state, &p, &owner)?,
        None => {
            // Say "not found" only to whom may see every token; others learn nothing.
            state
                .authz
                .require(&p, Action::ManageUsers, Resource::Fleet)?;
            return Err(not_found());
        }
    }
    if state.store.delete_token(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found())
    }
}

fn own_or_manage(state: &AppState, p: &Principal, user: &str) -> Result<(), ApiError> {
    if user == p.user.name {
        state.authz.self_service(p);
        Ok(())
    } else {
        Ok(state
            .authz
            .require(p, Action::ManageUsers, Resource::Fleet)?)
    }
}
