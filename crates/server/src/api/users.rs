//! `/v1/users` and `/v1/whoami`: the people and machines that tokens and access keys act as.

use super::{ApiError, ApiJson};
use crate::AppState;
use crate::access::authz::{self, Action, Principal, Resource};
use crate::errors::Code;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use fleetrun_proto::api::{CreateUser, UpdateUser, User, WhoAmI};
use fleetrun_store::{UserError, UserRow};
use std::sync::Arc;

/// Who the caller is. Anyone authenticated may ask.
pub async fn whoami(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
) -> Json<WhoAmI> {
    state.authz.self_service(&p);
    Json(WhoAmI {
        user: p.user.name.clone(),
        role: p.user.role,
        credential: p.credential.clone(),
    })
}

/// Creates a user (no credentials yet: `POST /v1/tokens` gives it one).
pub async fn create(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    ApiJson(req): ApiJson<CreateUser>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    state
        .authz
        .require(&p, Action::ManageUsers, Resource::Fleet)?;
    check_name(&req.name)?;
    check_policy(&req.policy)?;
    let user = UserRow {
        name: req.name,
        role: req.role,
        policy: req.policy,
    };
    Ok((
        StatusCode::CREATED,
        Json(state.store.create_user(&user).await?),
    ))
}

/// Every user. Needs manage-users (a user list says who can do what).
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Vec<User>>, ApiError> {
    state
        .authz
        .require(&p, Action::ManageUsers, Resource::Fleet)?;
    Ok(Json(state.store.list_users().await?))
}

/// One user: oneself, or anyone with manage-users.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<User>, ApiError> {
    if name == p.user.name {
        state.authz.self_service(&p);
    } else {
        state
            .authz
            .require(&p, Action::ManageUsers, Resource::Fleet)?;
    }
    state
        .store
        .get_user(&name)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::new(Code::UserNotFound, format!("no user {name}")))
}

/// Changes a user's role or policy; takes effect on its next request.
pub async fn update(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<UpdateUser>,
) -> Result<Json<User>, ApiError> {
    state
        .authz
        .require(&p, Action::ManageUsers, Resource::Fleet)?;
    if let Some(policy) = &req.policy {
        check_policy(policy)?;
    }
    Ok(Json(
        state
            .store
            .update_user(&name, req.role, req.policy.as_deref())
            .await?,
    ))
}

/// Deletes a user; its tokens and access keys stop working at once.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state
        .authz
        .require(&p, Action::ManageUsers, Resource::Fleet)?;
    state.store.delete_user(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            Code::InvalidUserName,
            format!("user name {name:?} must be 1 to 64 of A-Z a-z 0-9 _ . @ -"),
        ))
    }
}

fn check_policy(policy: &str) -> Result<(), ApiError> {
    authz::check_shape(policy)
        .map_err(|e| ApiError::new(Code::InvalidPolicy, format!("invalid policy: {e}")))?;
    if policy.trim().is_empty() {
        return Ok(());
    }
    authz::validate(policy)
        .map(|_| ())
        .map_err(|e| ApiError::new(Code::InvalidPolicy, format!("invalid policy: {e}")))
}

impl From<UserError> for ApiError {
    fn from(e: UserError) -> Self {
        match e {
            UserError::Exists(_) => ApiError::new(Code::UserExists, e.to_string()),
            UserError::NotFound(_) => ApiError::new(Code::UserNotFound, e.to_string()),
            UserError::LastAdmin(_) => ApiError::new(Code::LastAdmin, e.to_string()),
            UserError::Store(e) => e.into(),
        }
    }
}
