//! `PUT|GET|DELETE /v1/params/{name}`, `GET /v1/params`: the parameter store. A secure value is
//! sealed before it is stored and never returned by this API (the SSM API's Get operations return it
//! `WithDecryption` to a principal allowed `use-param` on it). Puts go through `run::params::put`.

use super::{ApiError, ApiJson};
use crate::access::authz::{Action, Principal, Resource};
use crate::errors::Code;
use crate::{AppState, run::params};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use fleetrun_proto::params::{Param, PutParam, name_error};
use fleetrun_proto::time::rfc3339;
use fleetrun_store::{ParamRow, StoredValue};
use std::sync::Arc;

fn checked_name(name: &str) -> Result<(), ApiError> {
    match name_error(name) {
        Some(e) => Err(ApiError::new(Code::InvalidParameterName, e)),
        None => Ok(()),
    }
}

/// The API view of a row: never the value of a secure one.
fn view(row: ParamRow) -> Param {
    let (secure, value) = match row.value {
        StoredValue::Plain(v) => (false, Some(v)),
        StoredValue::Sealed(..) => (true, None),
    };
    Param {
        name: row.name,
        secure,
        value,
        version: row.version.max(0) as u64,
        updated_at: rfc3339(row.updated_at),
        updated_by: row.updated_by,
    }
}

/// Creates or replaces a parameter.
pub async fn put(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<PutParam>,
) -> Result<Json<Param>, ApiError> {
    state
        .authz
        .require(&p, Action::ManageParams, Resource::Fleet)?;
    let by = p.name().to_owned();
    checked_name(&name)?;
    // This API knows only plain and secure; a plain put over a StringList (made through the SSM
    // API) keeps it a StringList rather than silently changing its type.
    let was_list = !req.secure
        && state
            .store
            .get_param(&name)
            .await?
            .is_some_and(|row| row.list && matches!(row.value, StoredValue::Plain(_)));
    let ty = if req.secure {
        params::ParamType::SecureString
    } else if was_list {
        params::ParamType::StringList
    } else {
        params::ParamType::String
    };
    let put = params::PutRequest {
        name: &name,
        value: &req.value,
        ty,
        description: None,
        allowed_pattern: None,
        overwrite: true,
        tags: &Default::default(),
    };
    let stored = params::put(&state, &by, put).await?;
    Ok(Json(view(ParamRow {
        name,
        value: stored.value,
        list: was_list,
        description: String::new(),
        allowed_pattern: String::new(),
        version: stored.version,
        updated_at: stored.at,
        updated_by: by,
        tags: Default::default(),
    })))
}

/// Every parameter, by name.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Vec<Param>>, ApiError> {
    state.authz.require(&p, Action::List, Resource::Fleet)?;
    let rows = state.store.list_params().await?;
    Ok(Json(rows.into_iter().map(view).collect()))
}

/// One parameter.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Param>, ApiError> {
    state.authz.require(&p, Action::List, Resource::Fleet)?;
    checked_name(&name)?;
    match state.store.get_param(&name).await? {
        Some(row) => Ok(Json(view(row))),
        None => Err(not_found(&name)),
    }
}

/// Deletes a parameter. Commands already sent that reference it fail on delivery.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state
        .authz
        .require(&p, Action::ManageParams, Resource::Fleet)?;
    checked_name(&name)?;
    if state.store.delete_param(&name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found(&name))
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        Code::ParameterNotFound,
        format!("no parameter named {name:?}"),
    )
}
