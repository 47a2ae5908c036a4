//! `/v1/documents`: create, list, show, update (new version), set the default version, delete.

use super::{ApiError, ApiJson};
use crate::AppState;
use crate::access::authz::{Action, Principal, Resource};
use crate::errors::Code;
use crate::run::document::{self, content::Format};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use fleetrun_proto::api::{CreateDocument, Document, SetDefaultVersion, UpdateDocument};
use serde::Deserialize;
use std::sync::Arc;

/// The content as text: a string (JSON or YAML) as it is, a JSON object pretty-printed.
fn content_text(v: &serde_json::Value) -> Result<String, ApiError> {
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Object(_) => serde_json::to_string_pretty(v).map_err(ApiError::internal),
        _ => Err(ApiError::new(
            Code::InvalidDocumentContent,
            "content must be the document's JSON or YAML text, or the JSON object itself",
        )),
    }
}

/// The declared format: JSON unless `document_format` says YAML (either case).
fn format_of(given: Option<&str>) -> Result<Format, ApiError> {
    match given {
        None => Ok(Format::Json),
        Some(f) => Ok(Format::parse(&f.to_ascii_uppercase())
            .map_err(|e| ApiError::new(Code::InvalidParameters, e.message))?),
    }
}

/// Creates a document (version 1). Answers 201.
pub async fn create(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    ApiJson(req): ApiJson<CreateDocument>,
) -> Result<(StatusCode, Json<Document>), ApiError> {
    state
        .authz
        .require(&p, Action::ManageDocuments, Resource::Document(&req.name))?;
    let text = content_text(&req.content)?;
    let format = format_of(req.document_format.as_deref())?;
    let d = document::create(
        &state.store,
        &req.name,
        &text,
        format,
        req.version_name.as_deref(),
        Default::default(),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(d.to_api(true))))
}

/// Every document at its default version, without content.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Vec<Document>>, ApiError> {
    let docs = document::list(&state.store).await?;
    state.authz.filtered(&p);
    Ok(Json(
        docs.iter()
            .filter(|d| {
                state
                    .authz
                    .allowed(&p, Action::List, Resource::Document(&d.row.name))
            })
            .map(|d| d.to_api(false))
            .collect(),
    ))
}

/// Query of `GET /v1/documents/{name}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShowQuery {
    version: Option<String>,
}

/// One version (default: the default version) with its content.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    query: Result<Query<ShowQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Document>, ApiError> {
    state
        .authz
        .require(&p, Action::List, Resource::Document(&name))?;
    let Query(q) = query.map_err(|e| ApiError::new(Code::InvalidRequest, e.body_text()))?;
    let d = document::load(&state.store, &name, q.version.as_deref(), None).await?;
    Ok(Json(d.to_api(true)))
}

/// Adds a version. Answers with it.
pub async fn update(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<UpdateDocument>,
) -> Result<Json<Document>, ApiError> {
    state
        .authz
        .require(&p, Action::ManageDocuments, Resource::Document(&name))?;
    let text = content_text(&req.content)?;
    let format = format_of(req.document_format.as_deref())?;
    let d = document::update(
        &state.store,
        &name,
        &text,
        format,
        req.document_version.as_deref(),
        req.version_name.as_deref(),
    )
    .await?;
    Ok(Json(d.to_api(true)))
}

/// Makes a version the default. Answers with it.
pub async fn set_default(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<SetDefaultVersion>,
) -> Result<Json<Document>, ApiError> {
    state
        .authz
        .require(&p, Action::ManageDocuments, Resource::Document(&name))?;
    let d = document::set_default(&state.store, &name, &req.document_version).await?;
    Ok(Json(d.to_api(false)))
}

/// Deletes a document with all its versions. Answers 204.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state
        .authz
        .require(&p, Action::ManageDocuments, Resource::Document(&name))?;
    document::delete(&state.store, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
