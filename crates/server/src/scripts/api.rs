//! `/v1/scripts`: saved scripts (issue 12) — create, list, show, update (a new version), delete,
//! and run. Authorized by `read-scripts` / `manage-scripts` on the script (a run also by
//! `send-command` on every node, as any send); audited by the API middleware like every call.
//!
//! A run is a send (`run::send`) of AWS-RunShellScript with the script's body, so it has every
//! send's statuses, rate control, timeouts, cancel and output. It runs only on nodes of the
//! script's platform: the others' invocations are stored ended (Failed, `InvalidPlatform`) with
//! the command, so nothing reaches them. The script and version run are stored with it too.

use crate::AppState;
use crate::access::authz::{Action, Principal, Resource};
use crate::api::{ApiError, ApiJson, page_limit};
use crate::errors::Code;
use crate::run::send::{Idempotency, SendOptions};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use fleetrun_proto::CommandId;
use fleetrun_proto::api::{
    CreateScript, Script, ScriptResult, ScriptRun, SendCommand, UpdateScript, check_script,
    check_script_name,
};
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
    let version = parse_version(q.version.as_deref())?;
    Ok(Json(to_api(&load(&state, &name, version).await?, true)))
}

/// A `?version=` value: a number from 1 to [`SCRIPT_VERSIONS_MAX`], or none for the latest.
fn parse_version(given: Option<&str>) -> Result<Option<i64>, ApiError> {
    let Some(v) = given else { return Ok(None) };
    match v.parse::<i64>() {
        Ok(n) if (1..=SCRIPT_VERSIONS_MAX).contains(&n) => Ok(Some(n)),
        _ => Err(ApiError::new(
            Code::InvalidScript,
            format!("version must be a number from 1 to {SCRIPT_VERSIONS_MAX}, got {v:?}"),
        )),
    }
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

/// `POST /v1/scripts/{name}/run` query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunQuery {
    /// The version to run (default: the latest).
    version: Option<String>,
}

/// Runs a script (its latest version, or `?version=N`) on the nodes and with the rollout the body
/// gives (a send's members, without document, parameters, commands or working directory). Answers
/// as a send does: 201 with the command, or 200 marked replayed for a retry with the same
/// `Idempotency-Key`.
pub async fn run(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    query: Result<Query<RunQuery>, axum::extract::rejection::QueryRejection>,
    headers: axum::http::HeaderMap,
    ApiJson(mut req): ApiJson<SendCommand>,
) -> Result<axum::response::Response, ApiError> {
    state
        .authz
        .require(&p, Action::ReadScripts, Resource::Script(&name))?;
    let Query(q) = query.map_err(|e| ApiError::new(Code::InvalidRequest, e.body_text()))?;
    checked_name(&name)?;
    let version = parse_version(q.version.as_deref())?;
    for (given, member) in [
        (req.document_name.is_some(), "document_name"),
        (req.document_version.is_some(), "document_version"),
        (!req.parameters.is_empty(), "parameters"),
        (!req.commands.is_empty(), "commands"),
        (req.working_directory.is_some(), "working_directory"),
    ] {
        if given {
            return Err(ApiError::new(
                Code::InvalidParameters,
                format!(
                    "{member}: a script run takes its script from the saved script; leave it out"
                ),
            ));
        }
    }
    let script = load(&state, &name, version).await?;
    let idempotency = crate::api::commands::idempotency_key(&headers)?.map(|key| Idempotency {
        key: format!("native-script:{key}"),
        request_hash: crate::run::send::request_hash(&(&name, script.version, &req)),
    });
    req.commands = vec![script.body.clone()];
    let opts = SendOptions {
        idempotency,
        platform: Some(script.platform.clone()),
        script: Some((name.clone(), script.version)),
        script_files: fleetrun_store::ScriptFiles {
            input: script.input_uri.clone(),
            output: script.output_path.clone(),
        },
        ..SendOptions::default()
    };
    let sent = crate::run::send::send_command(&state, &p, req, opts).await?;
    Ok(crate::api::commands::sent_response(sent))
}

/// `GET /v1/commands/{command_id}/script`: the saved script (name, version) a command ran.
pub async fn of_command(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(command_id): Path<String>,
) -> Result<Json<ScriptRun>, ApiError> {
    let id: CommandId = crate::api::parse_id(&command_id, Code::InvalidCommandId)?;
    if state.store.get_command(&id).await?.is_none() {
        return Err(ApiError::new(
            Code::CommandNotFound,
            format!("no command {id}"),
        ));
    }
    // Readable by those who may read some of the command's output, as its other facts are.
    state
        .authz
        .command_scope(&state.store, &p, Action::ReadOutput, &id)
        .await?;
    let (name, version) = state.store.script_run(&id).await?.ok_or_else(|| {
        ApiError::new(
            Code::CommandNotFound,
            format!("command {id} did not run a saved script"),
        )
    })?;
    // At most one result per node; a command has at most the send's target limit of nodes.
    let prefix = format!("results/{id}/");
    let mut results = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = state
            .store
            .list_objects(&prefix, after.as_deref(), fleetrun_store::OBJECTS_PAGE_MAX)
            .await?;
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        for o in page {
            let node = o
                .key
                .strip_prefix(&prefix)
                .and_then(|rest| rest.split('/').next())
                .and_then(|n| n.parse().ok());
            if let Some(node_id) = node {
                results.push(ScriptResult {
                    node_id,
                    key: o.key,
                    size: o.size,
                    sha256: o.sha256,
                });
            }
        }
    }
    Ok(Json(ScriptRun {
        command_id: id,
        name,
        version: version.max(0) as u64,
        results,
    }))
}
