//! `/v1/scripts`: saved scripts (issue 12) — create, list, show, update (a new version), delete.
//! Authorized by `read-scripts` / `manage-scripts` on the script; audited by the API middleware
//! like every call. Running one (`scripts run`) is a later step.

use crate::AppState;
use crate::access::authz::{Action, Principal, Resource};
use crate::api::{ApiError, ApiJson, page_limit};
use crate::errors::Code;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use fleetrun_proto::api::{CreateScript, Script, UpdateScript, check_script, check_script_name};
use fleetrun_proto::time::rfc3339;
use fleetrun_store::{SCRIPT_VERSIONS_MAX, SCRIPTS_MAX, SCRIPTS_PAGE_MAX, ScriptRow, ScriptWrite};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Default page of a listing.
const PAGE_DEFAULT: i64 = 100;

fn to_api(r: &ScriptRow, with_body: bool) -> Script {
    Script {
        name: r.name.clone(),
        version: r.version.max(0) as u64,
        latest_version: r.latest_version.max(0) as u64,
        description: r.description.clone(),
        platform: r.platform.clone(),
        input: r.input_uri.clone(),
        output: r.output_path.clone(),
        sha256: r.hash.clone(),
        size: r.body.len() as u64,
        created_at: rfc3339(r.created_at),
        created_by: r.created_by.clone(),
        updated_at: rfc3339(r.updated_at),
        updated_by: r.updated_by.clone(),
        body: with_body.then(|| r.body.clone()),
    }
}

fn checked_name(name: &str) -> Result<(), ApiError> {
    check_script_name(name).map_err(|e| ApiError::new(Code::InvalidScript, e))
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(Code::ScriptNotFound, format!("no script named {name}"))
}

/// A checked row for a new version (number and creation facts are the store's to fill).
fn row(
    name: &str,
    description: String,
    platform: String,
    input: Option<String>,
    output: Option<String>,
    body: String,
    by: &str,
) -> Result<ScriptRow, ApiError> {
    check_script(
        &description,
        &platform,
        input.as_deref(),
        output.as_deref(),
        &body,
    )
    .map_err(|e| ApiError::new(Code::InvalidScript, e))?;
    Ok(ScriptRow {
        name: name.to_owned(),
        version: 0,
        latest_version: 0,
        description,
        platform,
        input_uri: input,
        output_path: output,
        hash: hex::encode(Sha256::digest(body.as_bytes())),
        body,
        created_at: 0,
        created_by: by.to_owned(),
        updated_at: 0,
        updated_by: by.to_owned(),
    })
}

async fn load(state: &AppState, name: &str, version: Option<i64>) -> Result<ScriptRow, ApiError> {
    match state.store.get_script(name, version).await? {
        Some(r) => Ok(r),
        None => match version {
            Some(v) if state.store.get_script(name, None).await?.is_some() => Err(ApiError::new(
                Code::ScriptNotFound,
                format!("script {name} has no version {v}"),
            )),
            _ => Err(not_found(name)),
        },
    }
}

/// Creates a script (version 1). Answers 201.
pub async fn create(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    ApiJson(req): ApiJson<CreateScript>,
) -> Result<(StatusCode, Json<Script>), ApiError> {
    state
        .authz
        .require(&p, Action::ManageScripts, Resource::Script(&req.name))?;
    checked_name(&req.name)?;
    let r = row(
        &req.name,
        req.description,
        req.platform,
        req.input,
        req.output,
        req.body,
        p.name(),
    )?;
    match state.store.insert_script(&r).await? {
        ScriptWrite::Ok(_) => {}
        ScriptWrite::Exists => {
            return Err(ApiError::new(
                Code::ScriptAlreadyExists,
                format!(
                    "a script named {} exists; `scripts update` adds a version",
                    r.name
                ),
            ));
        }
        ScriptWrite::LimitExceeded => {
            return Err(ApiError::new(
                Code::ScriptLimitExceeded,
                format!("the server keeps at most {SCRIPTS_MAX} scripts"),
            ));
        }
        ScriptWrite::Missing => return Err(ApiError::internal("a new script reported missing")),
    }
    let stored = load(&state, &r.name, Some(1)).await?;
    Ok((StatusCode::CREATED, Json(to_api(&stored, true))))
}

/// `GET /v1/scripts` query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// The scripts after this name (the last name of a page gives the next page).
    after: Option<String>,
    /// At most this many (1 to 1000).
    limit: Option<i64>,
}

/// Scripts one may read at their latest versions, by name, without bodies.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<Script>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::new(Code::InvalidRequest, e.body_text()))?;
    let limit = page_limit(q.limit, PAGE_DEFAULT, SCRIPTS_PAGE_MAX)?;
    if let Some(a) = &q.after {
        checked_name(a)?;
    }
    state.authz.filtered(&p);
    let rows = state.store.list_scripts(q.after.as_deref(), limit).await?;
    Ok(Json(
        rows.iter()
            .filter(|r| {
                state
                    .authz
                    .allowed(&p, Action::ReadScripts, Resource::Script(&r.name))
            })
            .map(|r| to_api(r, false))
            .collect(),
    ))
}

/// Query of `GET /v1/scripts/{name}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShowQuery {
    version: Option<String>,
}

/// One version (default: the latest) with its body.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    query: Result<Query<ShowQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Script>, ApiError> {
    state
        .authz
        .require(&p, Action::ReadScripts, Resource::Script(&name))?;
    let Query(q) = query.map_err(|e| ApiError::new(Code::InvalidRequest, e.body_text()))?;
    checked_name(&name)?;
    let version = match q.version.as_deref() {
        None => None,
        Some(v) => match v.parse::<i64>() {
            Ok(n) if (1..=SCRIPT_VERSIONS_MAX).contains(&n) => Some(n),
            _ => {
                return Err(ApiError::new(
                    Code::InvalidScript,
                    format!("version must be a number from 1 to {SCRIPT_VERSIONS_MAX}, got {v:?}"),
                ));
            }
        },
    };
    Ok(Json(to_api(&load(&state, &name, version).await?, true)))
}

/// Adds a version: the latest one with the members given replaced. Answers with it.
pub async fn update(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<UpdateScript>,
) -> Result<Json<Script>, ApiError> {
    state
        .authz
        .require(&p, Action::ManageScripts, Resource::Script(&name))?;
    checked_name(&name)?;
    let latest = load(&state, &name, None).await?;
    // `""` clears an optional member; absent keeps it.
    let keep_or_clear = |new: Option<String>, old: Option<String>| match new {
        Some(s) if s.is_empty() => None,
        Some(s) => Some(s),
        None => old,
    };
    let r = row(
        &name,
        req.description.unwrap_or(latest.description),
        req.platform.unwrap_or(latest.platform),
        keep_or_clear(req.input, latest.input_uri),
        keep_or_clear(req.output, latest.output_path),
        req.body.unwrap_or(latest.body),
        p.name(),
    )?;
    let version = match state.store.add_script_version(&r, p.name()).await? {
        ScriptWrite::Ok(v) => v,
        ScriptWrite::Missing => return Err(not_found(&name)),
        ScriptWrite::LimitExceeded => {
            return Err(ApiError::new(
                Code::ScriptLimitExceeded,
                format!("script {name} has {SCRIPT_VERSIONS_MAX} versions, the most it may"),
            ));
        }
        ScriptWrite::Exists => return Err(ApiError::internal("an update reported exists")),
    };
    Ok(Json(to_api(
        &load(&state, &name, Some(version)).await?,
        true,
    )))
}

/// Deletes a script with all its versions. Answers 204.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state
        .authz
        .require(&p, Action::ManageScripts, Resource::Script(&name))?;
    checked_name(&name)?;
    if !state.store.delete_script(&name).await? {
        return Err(not_found(&name));
    }
    Ok(StatusCode::NO_CONTENT)
}
