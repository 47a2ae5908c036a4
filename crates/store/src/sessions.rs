//! Session records (`sessions`): one row per interactive stream, inserted when the agent started
//! it and completed when it ended (or inserted `Failed` when it never started); `edge` presents a
//! row as an API `Session`.

use super::{Columns, Result, Store, with_pool};
use crate::commands::visible_json;
use fleetrun_proto::NodeId;
use fleetrun_proto::api::{RecordingStatus, Session, SessionStatus};
use std::collections::HashSet;

/// Most sessions one listing answers.
pub const SESSIONS_PAGE_MAX: i64 = 1_000;

/// A session as it starts.
#[derive(Clone, Debug)]
pub struct NewSession {
    /// Its id (a UUID).
    pub session_id: String,
    /// `exec`.
    pub kind: String,
    /// The node.
    pub node_id: NodeId,
    /// Who.
    pub principal: String,
    /// The client's address.
    pub source: String,
    /// The user it runs as ('' for the agent's).
    pub run_as: String,
    /// What runs.
    pub command: String,
    /// Epoch ms.
    pub started_at: i64,
    /// `Recording` when it is recorded (`Failed` when its recording could not start).
    pub recording: RecordingStatus,
}

/// How a session ended.
#[derive(Clone, Debug)]
pub struct SessionEnd {
    /// Epoch ms.
    pub ended_at: i64,
    /// Bytes from the client.
    pub bytes_in: u64,
    /// Bytes to the client.
    pub bytes_out: u64,
    /// Exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Why it ended.
    pub end_reason: String,
    /// `Ended` or `Terminated`.
    pub status: SessionStatus,
    /// How its recording ended (`None` when it had none).
    pub recording: RecordingStatus,
    /// The recording's size, when complete.
    pub recording_bytes: u64,
}

/// Which sessions by where they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SessionState {
    /// All.
    #[default]
    Any = 0,
    /// Running.
    Active = 1,
    /// Ended, terminated or failed.
    Over = 2,
}

/// What a session listing keeps (every condition given must hold).
#[derive(Clone, Debug, Default)]
pub struct SessionQuery {
    /// Running, over, or both.
    pub state: SessionState,
    /// On this node.
    pub node: Option<NodeId>,
    /// Opened by this principal.
    pub principal: Option<String>,
    /// This one.
    pub session_id: Option<String>,
    /// Started at or after (epoch ms).
    pub started_after: Option<i64>,
    /// Started at or before (epoch ms).
    pub started_before: Option<i64>,
    /// In one of these statuses (empty: any).
    pub statuses: Vec<SessionStatus>,
}

/// A session's row, as stored.
pub(crate) struct SessionRecord {
    pub(crate) session_id: String,
    pub(crate) kind: String,
    pub(crate) node_id: NodeId,
    pub(crate) principal: String,
    pub(crate) source: String,
    pub(crate) run_as: String,
    pub(crate) command: String,
    pub(crate) started_at: i64,
    pub(crate) ended_at: Option<i64>,
    pub(crate) bytes_in: i64,
    pub(crate) bytes_out: i64,
    pub(crate) exit_code: Option<i64>,
    pub(crate) end_reason: String,
    pub(crate) status: String,
    pub(crate) recording: String,
    pub(crate) recording_bytes: i64,
}

fn record(r: &impl Columns) -> Result<SessionRecord> {
    Ok(SessionRecord {
        session_id: r.text("session_id"),
        kind: r.text("kind"),
        node_id: r
            .text("node_id")
            .parse()
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        principal: r.text("principal"),
        source: r.text("source"),
        run_as: r.text("run_as"),
        command: r.text("command"),
        started_at: r.int("started_at"),
        ended_at: r.opt_int("ended_at"),
        bytes_in: r.int("bytes_in"),
        bytes_out: r.int("bytes_out"),
        exit_code: r.opt_int("exit_code"),
        end_reason: r.text("end_reason"),
        status: r.text("status"),
        recording: r.text("recording"),
        recording_bytes: r.int("recording_bytes"),
    })
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Store {
    /// Records a session the agent has started, as `Active`.
    pub async fn insert_session(&self, s: &NewSession) -> Result<()> {
        self.insert_row(s, s.recording, None).await
    }

    /// Records a session that never started, as `Failed` with `reason`: attempted at
    /// `s.started_at`, given up at `ended_at` (epoch ms), with no recording.
    pub async fn insert_failed_session(
        &self,
        s: &NewSession,
        ended_at: i64,
        reason: &str,
    ) -> Result<()> {
        self.insert_row(s, RecordingStatus::None, Some((ended_at, reason)))
            .await
    }

    /// One session row: `Active`, or `Failed` and ended when `ended` says when and why.
    async fn insert_row(
        &self,
        s: &NewSession,
        recording: RecordingStatus,
        ended: Option<(i64, &str)>,
    ) -> Result<()> {
        let status = if ended.is_some() { "Failed" } else { "Active" };
        with_pool!(self, write, |pool| {
            sqlx::query(
                "INSERT INTO sessions (session_id, kind, node_id, principal, source, run_as,
                   command, started_at, status, recording, ended_at, end_reason)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(&s.session_id)
            .bind(&s.kind)
            .bind(s.node_id.as_str())
            .bind(&s.principal)
            .bind(&s.source)
            .bind(&s.run_as)
            .bind(&s.command)
            .bind(s.started_at)
            .bind(status)
            .bind(recording.as_str())
            .bind(ended.map(|e| e.0))
            .bind(ended.map_or("", |e| e.1))
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Completes an `Active` session; false when there was none (it ended already).
    pub async fn end_session(&self, session_id: &str, end: &SessionEnd) -> Result<bool> {
        if !crate::storable(session_id) {
            return Ok(false);
        }
        let done = with_pool!(self, write, |pool| {
            sqlx::query(
                "UPDATE sessions SET ended_at = $1, bytes_in = $2, bytes_out = $3, exit_code = $4,
                   end_reason = $5, status = $6, recording = $7, recording_bytes = $8
                 WHERE session_id = $9 AND status = 'Active'",
            )
            .bind(end.ended_at)
            .bind(clamp(end.bytes_in))
            .bind(clamp(end.bytes_out))
            .bind(end.exit_code.map(i64::from))
            .bind(&end.end_reason)
            .bind(end.status.as_str())
            .bind(end.recording.as_str())
            .bind(clamp(end.recording_bytes))
            .bind(session_id)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(done > 0)
    }

    /// Marks every `Active` session `Terminated` with `reason`: at start-up, their relays died with
    /// the server that ran them (and their recordings' uploads, never completed, with them: a
    /// `recording` one becomes `failed`). Returns how many.
    pub async fn end_active_sessions(&self, at: i64, reason: &str) -> Result<u64> {
        Ok(with_pool!(self, write, |pool| {
            sqlx::query(
                "UPDATE sessions SET ended_at = $1, end_reason = $2, status = 'Terminated',
                   recording = CASE recording WHEN 'recording' THEN 'failed' ELSE recording END
                 WHERE status = 'Active'",
            )
            .bind(at)
            .bind(reason)
            .execute(pool)
            .await?
            .rows_affected()
        }))
    }

    /// Deletes up to `limit` ended sessions that ended before `before` (epoch ms); returns how many.
    pub async fn purge_sessions(&self, before: i64, limit: i64) -> Result<u64> {
        Ok(with_pool!(self, write, |pool| {
            sqlx::query(
                "DELETE FROM sessions WHERE session_id IN (SELECT session_id FROM sessions
                   WHERE ended_at < $1 AND status != 'Active' LIMIT $2)",
            )
            .bind(before)
            .bind(limit)
            .execute(pool)
            .await?
            .rows_affected()
        }))
    }

    /// Up to `limit` ended sessions that ended before `before` (epoch ms), each with whether it
    /// may have a recording object (complete or failed mid-way), for the retention purge: objects
    /// go first, then [`Store::delete_sessions`].
    pub async fn expired_sessions(&self, before: i64, limit: i64) -> Result<Vec<(String, bool)>> {
        Ok(with_pool!(self, read, |pool| {
            sqlx::query(
                "SELECT session_id,
                   CAST(CASE WHEN recording != 'none' THEN 1 ELSE 0 END AS BIGINT) AS recorded
                 FROM sessions WHERE ended_at < $1 AND status != 'Active' LIMIT $2",
            )
            .bind(before)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| (r.text("session_id"), r.int("recorded") != 0))
            .collect()
        }))
    }

    /// Deletes ended sessions by id; returns how many.
    pub async fn delete_sessions(&self, ids: &[String]) -> Result<u64> {
        let ids = serde_json::to_string(ids).unwrap_or_else(|_| "[]".into());
        Ok(with_pool!(self, write, |pool, d| {
            let sql = format!(
                "DELETE FROM sessions WHERE status != 'Active' AND session_id IN ({})",
                d.json_strings("$1")
            );
            // Only the dialect's fixed fragments are formatted in; values are bound.
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(&ids)
                .execute(pool)
                .await?
                .rows_affected()
        }))
    }

    /// One session.
    pub async fn get_session(&self, session_id: &str) -> Result<Option<Session>> {
        if !crate::storable(session_id) {
            return Ok(None);
        }
        with_pool!(self, read, |pool| {
            sqlx::query("SELECT * FROM sessions WHERE session_id = $1")
                .bind(session_id)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(|r| record(r).map(Session::from))
                .transpose()
        })
    }

    /// Sessions, newest first: only `Active` ones if `active`, only on `visible` nodes if given, at
    /// most `limit` (bounded by [`SESSIONS_PAGE_MAX`]), starting after the cursor `(started_at,
    /// session_id)` of the last one of the page before.
    pub async fn list_sessions(
        &self,
        active: bool,
        visible: Option<&HashSet<NodeId>>,
        after: Option<(i64, &str)>,
        limit: i64,
    ) -> Result<Vec<Session>> {
        let q = SessionQuery {
            state: if active {
                SessionState::Active
            } else {
                SessionState::Any
            },
            ..SessionQuery::default()
        };
        self.find_sessions(&q, visible, after, limit).await
    }

    /// Sessions matching `q`, newest first, paged as [`Store::list_sessions`]. Every condition is
    /// in the query, so a page is full whenever more match.
    pub async fn find_sessions(
        &self,
        q: &SessionQuery,
        visible: Option<&HashSet<NodeId>>,
        after: Option<(i64, &str)>,
        limit: i64,
    ) -> Result<Vec<Session>> {
        // No cursor is one past every session, so the condition is always the index's range seek.
        let (at, id) = after.unwrap_or((i64::MAX, ""));
        let statuses = (!q.statuses.is_empty()).then(|| {
            serde_json::to_string(&q.statuses.iter().map(|s| s.as_str()).collect::<Vec<_>>())
                .unwrap_or_else(|_| "[]".into())
        });
        let visible = visible_json(visible);
        with_pool!(self, read, |pool, d| {
            let sql = format!(
                "SELECT * FROM sessions WHERE ($1 IS NULL OR node_id IN ({}))
                   AND ($2 = 0 OR ($2 = 1 AND status = 'Active') OR ($2 = 2 AND status <> 'Active'))
                   AND (started_at, session_id) < ($3, $4)
                   AND ($6 IS NULL OR node_id = $6) AND ($7 IS NULL OR principal = $7)
                   AND ($8 IS NULL OR session_id = $8)
                   AND ($9 IS NULL OR started_at >= $9) AND ($10 IS NULL OR started_at <= $10)
                   AND ($11 IS NULL OR status IN ({}))
                 ORDER BY started_at DESC, session_id DESC LIMIT $5",
                d.json_strings("$1"),
                d.json_strings("$11")
            );
            // Only the dialect's fixed fragments are formatted in; values are bound.
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(&visible)
                .bind(q.state as i64)
                .bind(at)
                .bind(id)
                .bind(limit.clamp(1, SESSIONS_PAGE_MAX))
                .bind(q.node.as_ref().map(NodeId::as_str))
                .bind(q.principal.as_deref())
                .bind(q.session_id.as_deref())
                .bind(q.started_after)
                .bind(q.started_before)
                .bind(&statuses)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| record(r).map(Session::from))
                .collect()
        })
    }

    /// Where a session sorts in listings (its start and id), for a cursor.
    pub async fn session_cursor(&self, session_id: &str) -> Result<Option<(i64, String)>> {
        if !crate::storable(session_id) {
            return Ok(None);
        }
        let at: Option<i64> = with_pool!(self, read, |pool| {
            sqlx::query_scalar("SELECT started_at FROM sessions WHERE session_id = $1")
                .bind(session_id)
                .fetch_optional(pool)
                .await?
        });
        Ok(at.map(|at| (at, session_id.to_owned())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_session(id: &str, node: &NodeId, at: i64) -> NewSession {
        NewSession {
            session_id: id.into(),
            kind: "exec".into(),
            node_id: node.clone(),
            principal: "admin".into(),
            source: "127.0.0.1:1".into(),
            run_as: String::new(),
            command: "echo hi".into(),
            started_at: at,
            recording: RecordingStatus::None,
        }
    }

    #[tokio::test]
    async fn sessions_start_active_end_once_and_restart_ends_the_rest() {
        let (_dir, stores) = crate::testing::stores().await;
        for (_, store) in stores {
            sessions_start_active_end_once_and_restart_ends_the_rest_on(store).await;
        }
    }

    async fn sessions_start_active_end_once_and_restart_ends_the_rest_on(store: Store) {
        let a = NodeId::from_random(1);
        let b = NodeId::from_random(2);
        store
            .insert_session(&new_session("s1", &a, 1_000))
            .await
            .expect("insert");
        store
            .insert_session(&new_session("s2", &b, 2_000))
            .await
            .expect("insert");
        store
            .insert_session(&new_session("s3", &a, 3_000))
            .await
            .expect("insert");

        let s1 = store.get_session("s1").await.expect("get").expect("s1");
        assert_eq!(s1.status, SessionStatus::Active);
        assert_eq!(s1.ended_at, None);

        let end = SessionEnd {
            ended_at: 1_500,
            bytes_in: 3,
            bytes_out: 7,
            exit_code: Some(2),
            end_reason: "exited".into(),
            status: SessionStatus::Ended,
            recording: RecordingStatus::None,
            recording_bytes: 0,
        };
        assert!(store.end_session("s1", &end).await.expect("end"));
        // A second end (a racing terminate) changes nothing.
        let again = SessionEnd {
            status: SessionStatus::Terminated,
            end_reason: "terminated by x".into(),
            ..end.clone()
        };
        assert!(!store.end_session("s1", &again).await.expect("end"));
        let s1 = store.get_session("s1").await.expect("get").expect("s1");
        assert_eq!(s1.status, SessionStatus::Ended);
        assert_eq!((s1.bytes_in, s1.bytes_out, s1.exit_code), (3, 7, Some(2)));
        assert_eq!(s1.end_reason, "exited");
        assert!(s1.ended_at.is_some());

        let active = store
            .list_sessions(true, None, None, 10)
            .await
            .expect("list");
        let ids: Vec<_> = active.iter().map(|s| s.session_id.as_str()).collect();
        assert_eq!(ids, ["s3", "s2"]);
        let on_a = store
            .list_sessions(false, Some(&HashSet::from([a.clone()])), None, 10)
            .await
            .expect("list");
        let ids: Vec<_> = on_a.iter().map(|s| s.session_id.as_str()).collect();
        assert_eq!(ids, ["s3", "s1"]);
        let none = store
            .list_sessions(false, Some(&HashSet::new()), None, 10)
            .await
            .expect("list");
        assert!(none.is_empty());
        let cursor = store
            .session_cursor("s3")
            .await
            .expect("cursor")
            .expect("s3");
        assert!(
            store
                .session_cursor("nope")
                .await
                .expect("cursor")
                .is_none()
        );
        let page = store
            .list_sessions(false, None, Some((cursor.0, &cursor.1)), 1)
            .await
            .expect("list");
        let ids: Vec<_> = page.iter().map(|s| s.session_id.as_str()).collect();
        assert_eq!(ids, ["s2"]);

        assert_eq!(
            store
                .end_active_sessions(9_000, "server restarted")
                .await
                .expect("restart"),
            2
        );
        let s2 = store.get_session("s2").await.expect("get").expect("s2");
        assert_eq!(s2.status, SessionStatus::Terminated);
        assert_eq!(s2.end_reason, "server restarted");
        assert!(
            store
                .list_sessions(true, None, None, 10)
                .await
                .expect("list")
                .is_empty()
        );
        assert!(store.get_session("nope").await.expect("get").is_none());

        // Retention: only ended ones past the cut-off go, in batches.
        store
            .insert_session(&new_session("s4", &a, 9_500))
            .await
            .expect("insert");
        assert_eq!(store.purge_sessions(9_000, 10).await.expect("purge"), 1);
        assert_eq!(store.purge_sessions(10_000, 1).await.expect("purge"), 1);
        assert_eq!(store.purge_sessions(10_000, 10).await.expect("purge"), 1);
        let left = store
            .list_sessions(false, None, None, 10)
            .await
            .expect("list");
        let ids: Vec<_> = left.iter().map(|s| s.session_id.as_str()).collect();
        assert_eq!(ids, ["s4"]);
    }

    #[tokio::test]
    async fn recordings_are_recorded_ended_failed_at_restart_and_purged_by_id() {
        let (_dir, stores) = crate::testing::stores().await;
        for (_, store) in stores {
            recordings_are_recorded_ended_failed_at_restart_and_purged_by_id_on(store).await;
        }
    }

    async fn recordings_are_recorded_ended_failed_at_restart_and_purged_by_id_on(store: Store) {
        let a = NodeId::from_random(1);
        for (id, at) in [("r1", 1_000), ("r2", 2_000), ("plain", 3_000)] {
            let mut s = new_session(id, &a, at);
            if id != "plain" {
                s.recording = RecordingStatus::Recording;
            }
            store.insert_session(&s).await.expect("insert");
        }
        let r1 = store.get_session("r1").await.expect("get").expect("r1");
        assert_eq!(
            (r1.recording, r1.recording_bytes),
            (RecordingStatus::Recording, 0)
        );
        let end = SessionEnd {
            ended_at: 1_500,
            bytes_in: 0,
            bytes_out: 5,
            exit_code: Some(0),
            end_reason: "exited".into(),
            status: SessionStatus::Ended,
            recording: RecordingStatus::Complete,
            recording_bytes: 321,
        };
        assert!(store.end_session("r1", &end).await.expect("end"));
        let r1 = store.get_session("r1").await.expect("get").expect("r1");
        assert_eq!(
            (r1.recording, r1.recording_bytes),
            (RecordingStatus::Complete, 321)
        );
        // A restart: the one still recording never completed.
        assert_eq!(
            store
                .end_active_sessions(9_000, "server restarted")
                .await
                .expect("restart"),
            2
        );
        let r2 = store.get_session("r2").await.expect("get").expect("r2");
        assert_eq!(r2.recording, RecordingStatus::Failed);
        let plain = store
            .get_session("plain")
            .await
            .expect("get")
            .expect("plain");
        assert_eq!(plain.recording, RecordingStatus::None);

        let mut expired = store.expired_sessions(10_000, 10).await.expect("expired");
        expired.sort();
        assert_eq!(
            expired,
            [
                ("plain".into(), false),
                ("r1".into(), true),
                ("r2".into(), true)
            ]
        );
        assert_eq!(
            store
                .expired_sessions(10_000, 1)
                .await
                .expect("expired")
                .len(),
            1
        );
        assert!(
            store
                .expired_sessions(1_000, 10)
                .await
                .expect("expired")
                .is_empty()
        );
        assert_eq!(
            store
                .delete_sessions(&["r1".into(), "nope".into()])
                .await
                .expect("delete"),
            1
        );
        assert!(store.get_session("r1").await.expect("get").is_none());
        assert_eq!(store.delete_sessions(&[]).await.expect("delete"), 0);
    }

    /// A session that never started is stored ended, `Failed` with why: no end or restart
    /// touches it, and retention purges it as any ended one.
    #[tokio::test]
    async fn a_failed_session_is_stored_ended_and_left_alone() {
        let (_dir, stores) = crate::testing::stores().await;
        for (_, store) in stores {
            a_failed_session_is_stored_ended_and_left_alone_on(store).await;
        }
    }

    async fn a_failed_session_is_stored_ended_and_left_alone_on(store: Store) {
        let mut s = new_session("f1", &NodeId::from_random(1), 1_000);
        s.recording = RecordingStatus::Recording;
        store
            .insert_failed_session(&s, 1_200, "node x is not connected")
            .await
            .expect("insert");
        let f1 = store.get_session("f1").await.expect("get").expect("f1");
        assert_eq!(f1.status, SessionStatus::Failed);
        assert_eq!(f1.end_reason, "node x is not connected");
        assert_eq!(f1.recording, RecordingStatus::None);
        assert!(f1.ended_at.is_some());
        let end = SessionEnd {
            ended_at: 1_500,
            bytes_in: 0,
            bytes_out: 0,
            exit_code: None,
            end_reason: "exited".into(),
            status: SessionStatus::Ended,
            recording: RecordingStatus::None,
            recording_bytes: 0,
        };
        assert!(!store.end_session("f1", &end).await.expect("end"));
        // An id no session can have (PostgreSQL's text holds no NUL) is not found, not an error.
        assert!(store.get_session("f\u{0}1").await.expect("get").is_none());
        assert!(store.session_cursor("\0").await.expect("cursor").is_none());
        assert!(!store.end_session("\0", &end).await.expect("end"));
        assert_eq!(
            store
                .end_active_sessions(2_000, "restart")
                .await
                .expect("restart"),
            0
        );
        assert_eq!(
            store.expired_sessions(1_300, 10).await.expect("expired"),
            [("f1".to_owned(), false)]
        );
    }

    /// A session stored before recordings (schema 0010) reads as not recorded.
    #[tokio::test]
    async fn a_session_stored_before_recordings_reads_as_not_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sqlite");
        {
            let opts = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true);
            let pool = sqlx::SqlitePool::connect_with(opts).await.expect("pool");
            sqlx::migrate!("./migrations/sqlite")
                .run_to(10, &pool)
                .await
                .expect("migrate to 0010");
            sqlx::query(
                "INSERT INTO sessions (session_id, kind, node_id, principal, source, run_as, command,
                   started_at, ended_at, status) VALUES ('old', 'exec', ?, 'admin', '', '', 'true',
                   1000, 2000, 'Ended')",
            )
            .bind(NodeId::from_random(7).as_str())
            .execute(&pool)
            .await
            .expect("insert");
            pool.close().await;
        }
        let store = Store::open_sqlite(&path).await.expect("open");
        let old = store.get_session("old").await.expect("get").expect("old");
        assert_eq!(
            (old.recording, old.recording_bytes),
            (RecordingStatus::None, 0)
        );
    }
}
