//! `GET /v1/sessions`, `GET /v1/sessions/{session_id}`, `POST /v1/sessions/{session_id}/terminate`,
//! `GET /v1/sessions/{session_id}/recording`: session records and their recordings, seen on the
//! nodes one may `shell` or `port-forward` on; a terminate needs `terminate-session` on the session's node (admins
//! have every action).

use crate::AppState;
use crate::access::audit as trail;
use crate::access::authz::{Action, Principal};
use crate::api::{ApiError, page_limit};
use crate::errors::{Answered, Code};
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use fleetrun_proto::api::{RecordingStatus, Session, SessionStatus};
use fleetrun_proto::time::now_ms;
use fleetrun_store::AuditEntry;
use futures_util::StreamExt;
use object_store::ObjectStoreExt;
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;

/// Default page of a listing.
const PAGE_DEFAULT: i64 = 50;

/// `GET /v1/sessions` query.
#[derive(Deserialize)]
pub struct ListQuery {
    /// Only the running ones.
    #[serde(default)]
    active: bool,
    /// At most this many (1 to 1000).
    limit: Option<i64>,
    /// The sessions after this one in the listing (the last id of a page gives the next page).
    before: Option<String>,
}

/// Sessions on the nodes the caller may open a shell on, newest first.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<Session>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::new(Code::InvalidRequest, e.body_text()))?;
    let limit = page_limit(q.limit, PAGE_DEFAULT, fleetrun_store::SESSIONS_PAGE_MAX)?;
    let cursor = match q.before.as_deref() {
        Some(id) => Some(state.store.session_cursor(id).await?.ok_or_else(|| {
            ApiError::new(
                Code::InvalidParameters,
                format!("before: no session {id} (it may have been purged)"),
            )
        })?),
        None => None,
    };
    let scope = session_scope(&state, &p).await?;
    let after = cursor.as_ref().map(|(at, id)| (*at, id.as_str()));
    Ok(Json(
        state
            .store
            .list_sessions(q.active, scope.as_filter(), after, limit)
            .await?,
    ))
}

/// The nodes whose sessions one may see: those one may open a shell or a port forward on.
pub(crate) async fn session_scope<D>(
    state: &AppState,
    p: &Principal,
) -> Result<crate::access::authz::NodeScope, Answered<D>> {
    let shell = state
        .authz
        .node_scope(&state.store, p, Action::Shell)
        .await?;
    let forward = state
        .authz
        .node_scope(&state.store, p, Action::PortForward)
        .await?;
    Ok(shell.union(forward))
}

/// A session the caller may see; one on a node outside its scope is not found (as one that does
/// not exist), so a refusal does not tell whether it exists.
pub(crate) async fn visible<D>(
    state: &AppState,
    p: &Principal,
    id: &str,
) -> Result<Session, Answered<D>> {
    let missing = || Answered::new(Code::SessionNotFound, format!("no session {id}"));
    let s = state.store.get_session(id).await?.ok_or_else(missing)?;
    let scope = session_scope(state, p).await?;
    if scope.contains(&s.node_id) {
        Ok(s)
    } else {
        Err(missing())
    }
}

/// One session.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Session>, ApiError> {
    Ok(Json(visible(&state, &p, &id).await?))
}

/// Ends a running session: the agent is told to close the stream, the client hears
/// "terminated by USER". Answers the session as it was when told.
pub async fn terminate(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Session>, ApiError> {
    let s = visible(&state, &p, &id).await?;
    if !stop(&state, &p, &s).await? {
        return Err(ApiError::new(
            Code::SessionEnded,
            format!("session {id} is not running"),
        ));
    }
    Ok(Json(s))
}

/// Tells a visible session to end ("terminated by USER"), with `terminate-session` on its node;
/// false when it was not running. Shared with SSM's TerminateSession.
pub(crate) async fn stop<D>(
    state: &AppState,
    p: &Principal,
    s: &Session,
) -> Result<bool, Answered<D>> {
    state
        .authz
        .require_node(&state.store, p, Action::TerminateSession, &s.node_id)
        .await?;
    Ok(s.status == SessionStatus::Active
        && state
            .sessions
            .stop(&s.session_id, format!("terminated by {}", p.name())))
}

/// A session's recording, streamed as stored (asciicast v2, `application/x-asciicast`). Only an
/// ended session's: the upload completes at the end (an object store shows no half-uploaded
/// object), so a running one's is refused (409 RecordingNotReady), as is one that has none or whose
/// recording failed (404 RecordingNotFound). Each download is audited (`sessions.recording.read`:
/// who, which session, its node).
pub async fn recording(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let s = visible(&state, &p, &id).await?;
    let none = |why: &str| ApiError::new(Code::RecordingNotFound, format!("session {id} {why}"));
    match s.recording {
        RecordingStatus::Complete => {}
        RecordingStatus::None => return Err(none("has no recording")),
        RecordingStatus::Failed => {
            return Err(none("has no recording: it could not be written"));
        }
        RecordingStatus::Recording => {
            return Err(ApiError::new(
                Code::RecordingNotReady,
                format!("session {id} is still running; its recording can be read once it ends"),
            ));
        }
    }
    let got = state
        .objects
        .get(&super::recording::object_path(&s.session_id))
        .await;
    let got = match got {
        Ok(g) => g,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(none("has no recording: its object is gone"));
        }
        Err(e) => {
            tracing::error!(session = %id, "cannot read a recording: {e}");
            return Err(ApiError::new(
                Code::Internal,
                "cannot read the recording from the object store",
            ));
        }
    };
    let entry = AuditEntry {
        at: now_ms(),
        principal: p.name().to_owned(),
        source: addr.to_string(),
        action: "sessions.recording.read".into(),
        node_ids: vec![s.node_id.to_string()],
        params: serde_json::json!({ "session_id": s.session_id, "bytes": got.meta.size }),
        result: "Served".into(),
        ..AuditEntry::default()
    };
    trail::record(&state.store, entry, true).await;
    let size = got.meta.size;
    let body = Body::from_stream(got.into_stream().map(|r| r.map_err(std::io::Error::other)));
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-asciicast".to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        body,
    )
        .into_response())
}
