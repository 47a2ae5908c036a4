//! `/v1/objects`: objects kept for users (script inputs, results, files), under `files/KEY` of the
//! object store. `PUT /v1/objects/{key}` streams the body into the store (never whole in memory)
//! while measuring its size and SHA-256; the record (`objects` table) is written once the upload
//! is complete, so a listed object is always whole. `GET` streams it back, `DELETE` forgets it,
//! `GET /v1/objects?prefix=` lists. Authorized by `read-objects` / `write-objects` on the object.

use super::WriteError;
use crate::AppState;
use crate::access::authz::{Action, Principal, Resource};
use crate::api::{ApiError, page_limit};
use crate::errors::Code;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use fleetrun_proto::api::{ObjectInfo, check_object_key};
use fleetrun_proto::time::{now_ms, rfc3339};
use fleetrun_store::{OBJECTS_PAGE_MAX, ObjectRow};
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use parking_lot::Mutex;
use serde::Deserialize;
use std::collections::HashSet;
use std::sync::Arc;

/// Largest object: 8 MiB parts, at most S3's 10,000 of them.
pub const OBJECT_MAX: u64 = 64 * 1024 * 1024 * 1024;
/// Default page of a listing.
const PAGE_DEFAULT: i64 = 100;
/// The header of a download that carries the object's SHA-256.
pub const SHA256_HEADER: &str = "x-fleetrun-sha256";

/// Whether a request is an upload whose body is streamed to its handler rather than read whole
/// first (by the authenticating middleware, for the audit trail) and bounded by the body read
/// timeout as a whole (it is bounded by time without bytes instead).
pub fn is_streamed_upload(method: &Method, route: &str) -> bool {
    method == Method::PUT && route == "/v1/objects/{*key}"
}

/// What the audit trail keeps of a streamed upload (instead of its body): set by the handler on
/// its answer.
#[derive(Clone, Debug)]
pub struct StreamedBody(pub serde_json::Value);

/// Keys with an upload in progress: a second upload to one of them is refused (409), so the
/// record always describes the bytes under the key.
#[derive(Default)]
pub struct Uploads(Mutex<HashSet<String>>);

/// One upload's hold on its key, released when dropped.
struct Hold<'a> {
    uploads: &'a Uploads,
    key: String,
}

impl Uploads {
    fn hold(&self, key: &str) -> Option<Hold<'_>> {
        self.0.lock().insert(key.to_owned()).then(|| Hold {
            uploads: self,
            key: key.to_owned(),
        })
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.uploads.0.lock().remove(&self.key);
    }
}

/// Where an object's bytes live in the object store.
pub fn object_path(key: &str) -> ObjectPath {
    ObjectPath::from(format!("files/{key}"))
}

fn checked_key(key: &str) -> Result<&str, ApiError> {
    check_object_key(key).map_err(|e| ApiError::new(Code::InvalidObjectKey, e))?;
    Ok(key)
}

fn info(r: ObjectRow) -> ObjectInfo {
    ObjectInfo {
        key: r.key,
        size: r.size,
        sha256: r.sha256,
        created_at: rfc3339(r.created_at),
        created_by: r.created_by,
    }
}

/// `PUT /v1/objects/{key}`: stores the body under the key (replacing an object there once the new
/// one is complete); answers 201 with the object's size and SHA-256.
pub async fn put(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = checked_key(&key)?;
    state
        .authz
        .require(&p, Action::WriteObjects, Resource::Object(key))?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > OBJECT_MAX) {
        return Err(too_large());
    }
    let _hold = state.uploads.hold(key).ok_or_else(|| {
        ApiError::new(
            Code::ObjectBusy,
            format!("an upload to {key} is in progress; try again when it is done"),
        )
    })?;
    let (size, sha256) = upload(state.objects.as_ref(), &object_path(key), body).await?;
    let row = ObjectRow {
        key: key.to_owned(),
        size,
        sha256,
        created_at: now_ms(),
        created_by: p.name().to_owned(),
    };
    state.store.put_object(&row).await?;
    let summary = serde_json::json!({"key": key, "size": size, "sha256": row.sha256});
    let mut resp = (StatusCode::CREATED, Json(info(row))).into_response();
    resp.extensions_mut().insert(StreamedBody(summary));
    Ok(resp)
}

fn too_large() -> ApiError {
    ApiError::new(
        Code::PayloadTooLarge,
        format!("an object is at most {OBJECT_MAX} bytes"),
    )
}

/// Streams `body` into the object store at `path`: its size and SHA-256.
async fn upload(
    objects: &dyn ObjectStore,
    path: &ObjectPath,
    body: Body,
) -> Result<(u64, String), ApiError> {
    let written = super::write_streamed(objects, path, body.into_data_stream(), OBJECT_MAX).await;
    written.map_err(|e| match e {
        WriteError::Source(e) => match crate::net::conn::body_timed_out(&e) {
            Some(limit) => crate::api::body_timeout_error(limit),
            None => ApiError::new(Code::InvalidRequest, format!("the upload broke off: {e}")),
        },
        WriteError::TooLarge => too_large(),
        WriteError::Store(e) => {
            tracing::error!(%path, "cannot store object: {e}");
            ApiError::new(
                Code::Unavailable,
                "the object store did not take the object; try again",
            )
        }
    })
}

/// `GET /v1/objects/{key}`: the object's bytes, streamed, with its SHA-256 in a header.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let key = checked_key(&key)?;
    state
        .authz
        .require(&p, Action::ReadObjects, Resource::Object(key))?;
    let row = state
        .store
        .get_object(key)
        .await?
        .ok_or_else(|| not_found(key))?;
    let got = state.objects.get(&object_path(key)).await.map_err(|e| {
        tracing::error!(key, "object recorded but not readable: {e}");
        match e {
            object_store::Error::NotFound { .. } => ApiError::new(
                Code::ObjectNotFound,
                format!("object {key} is recorded but its bytes are gone from the object store"),
            ),
            _ => ApiError::new(
                Code::Unavailable,
                "the object store did not answer; try again",
            ),
        }
    })?;
    let stream = got.into_stream().map(|r| r.map_err(std::io::Error::other));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, row.size.to_string()),
            (header::HeaderName::from_static(SHA256_HEADER), row.sha256),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

fn not_found(key: &str) -> ApiError {
    ApiError::new(Code::ObjectNotFound, format!("no object {key}"))
}

/// `DELETE /v1/objects/{key}`: forgets the object, then removes its bytes.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    let key = checked_key(&key)?;
    state
        .authz
        .require(&p, Action::WriteObjects, Resource::Object(key))?;
    if !state.store.delete_object(key).await? {
        return Err(not_found(key));
    }
    // The record is gone first: a failure here leaves unlisted bytes, never a listed object
    // without them.
    if let Err(e) = state.objects.delete(&object_path(key)).await {
        tracing::warn!(key, "object forgotten but its bytes not removed: {e}");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/objects` query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only keys that start with this.
    #[serde(default)]
    prefix: String,
    /// The keys after this one (the last key of a page gives the next page).
    after: Option<String>,
    /// At most this many (1 to 1000).
    limit: Option<i64>,
}

/// Objects one may read, in key order (filtered one by one, as nodes are).
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<ObjectInfo>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::new(Code::InvalidRequest, e.body_text()))?;
    let limit = page_limit(q.limit, PAGE_DEFAULT, OBJECTS_PAGE_MAX)?;
    if q.prefix.len() > fleetrun_proto::api::OBJECT_KEY_MAX
        || !q.prefix.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(ApiError::new(
            Code::InvalidObjectKey,
            "prefix: printable ASCII of at most 1024 bytes",
        ));
    }
    state.authz.filtered(&p);
    let rows = state
        .store
        .list_objects(&q.prefix, q.after.as_deref(), limit)
        .await?;
    Ok(Json(
        rows.into_iter()
            .filter(|r| {
                state
                    .authz
                    .allowed(&p, Action::ReadObjects, Resource::Object(&r.key))
            })
            .map(info)
            .collect(),
    ))
}
