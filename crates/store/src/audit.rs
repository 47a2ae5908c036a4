//! The audit trail: appending hash-chained records (through the group-commit writer), querying them,
//! and verifying the chain.
//!
//! Each record stores `hash = hex(SHA-256(prev_hash || canonical(record)))`, where `prev_hash` is the
//! previous record's hash (64 zeros for the first) and `canonical` is a JSON array of the stored
//! columns in a fixed order. Editing a record breaks its hash; removing one breaks the sequence and
//! the next record's `prev_hash`. Removing the newest records is not detectable from the table alone.
//!
//! The chain is one chain however many servers append to it: on PostgreSQL each append holds
//! `Lock::Audit` from reading the head until its transaction ends (SQLite's one writer connection
//! serializes them already).

use super::{Columns, Conn, Lock, Result, Store, serialize, with_conn, with_pool};
use fleetrun_proto::api::{AuditAnchor, AuditQuery, AuditRecord, AuditVerify};
use sha2::{Digest, Sha256};

/// `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Rows read per page while verifying.
const VERIFY_PAGE: i64 = 1000;

/// An audit record to append (the store numbers and chains it).
#[derive(Clone, Debug, Default)]
pub struct AuditEntry {
    /// Epoch ms.
    pub at: i64,
    /// Who: token name, access key id, node id, or `anonymous`.
    pub principal: String,
    /// Client address.
    pub source: String,
    /// What, e.g. `commands.send`.
    pub action: String,
    /// The command acted on ('' when none).
    pub command_id: String,
    /// The nodes acted on.
    pub node_ids: Vec<String>,
    /// The document acted on ('' when none).
    pub document: String,
    /// Parameters, secrets already redacted.
    pub params: serde_json::Value,
    /// Outcome, e.g. `201` or `400 InvalidParameters`.
    pub result: String,
}

/// One stored record, decoded (`edge` presents it as an API `AuditRecord`).
#[derive(Clone, Debug)]
pub(crate) struct AuditLogRow {
    pub(crate) seq: i64,
    /// Epoch ms.
    pub(crate) at: i64,
    pub(crate) principal: String,
    pub(crate) source: String,
    pub(crate) action: String,
    pub(crate) command_id: String,
    pub(crate) node_ids: Vec<String>,
    pub(crate) document: String,
    pub(crate) params: serde_json::Value,
    pub(crate) result: String,
    pub(crate) hash: String,
}

/// The stored columns of one record, as hashed.
struct Stored<'a> {
    seq: i64,
    at: i64,
    principal: &'a str,
    source: &'a str,
    action: &'a str,
    command_id: &'a str,
    node_ids: &'a str,
    document: &'a str,
    params: &'a str,
    result: &'a str,
}

/// The canonical serialization of a record: a JSON array of its stored columns, in order.
fn canonical(r: &Stored<'_>) -> String {
    serde_json::json!([
        r.seq,
        r.at,
        r.principal,
        r.source,
        r.action,
        r.command_id,
        r.node_ids,
        r.document,
        r.params,
        r.result
    ])
    .to_string()
}

/// The hash of a record chained after `prev_hash`.
fn chain_hash(prev_hash: &str, r: &Stored<'_>) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(canonical(r).as_bytes());
    hex::encode(h.finalize())
}

/// Audit rows stored per `INSERT` (12 bound values each; SQLite allows 32,766, PostgreSQL 65,535).
const INSERT_ROWS_MAX: usize = 500;

/// Appends records inside the writer's transaction on `conn`, in order, after the current head of
/// the chain: one query for the head, the chain computed here, one `INSERT` per [`INSERT_ROWS_MAX`]
/// records.
pub(super) async fn append(conn: Conn<'_>, entries: &[&AuditEntry]) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    with_conn!(conn, |c, d| {
        // Another server's append must not read the same head: it waits here until this commits.
        serialize!(c, d, Lock::Audit);
        let head: Option<(i64, String)> =
            sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&mut *c)
                .await?;
        let rows = chained(head, entries)?;
        for (entries, rows) in entries
            .chunks(INSERT_ROWS_MAX)
            .zip(rows.chunks(INSERT_ROWS_MAX))
        {
            let sql = format!(
                "INSERT INTO audit_log (seq, at, principal, source, action, command_id, node_ids,
                   document, params, result, prev_hash, hash) VALUES {}",
                super::value_rows(rows.len(), 12)
            );
            // Only placeholders are formatted in; values are bound.
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (e, r) in entries.iter().zip(rows) {
                q = q
                    .bind(r.seq)
                    .bind(e.at)
                    .bind(&e.principal)
                    .bind(&e.source)
                    .bind(&e.action)
                    .bind(&e.command_id)
                    .bind(&r.node_ids)
                    .bind(&e.document)
                    .bind(&r.params)
                    .bind(&e.result)
                    .bind(&r.prev_hash)
                    .bind(&r.hash);
            }
            q.execute(&mut *c).await?;
        }
    });
    Ok(())
}

/// The stored columns of an entry that the store computes.
struct Chained {
    seq: i64,
    node_ids: String,
    params: String,
    prev_hash: String,
    hash: String,
}

/// `entries` numbered and chained after `head` (the newest record's seq and hash, if any).
fn chained(head: Option<(i64, String)>, entries: &[&AuditEntry]) -> Result<Vec<Chained>> {
    let (mut seq, mut prev_hash) = head.unwrap_or((0, GENESIS.to_owned()));
    let mut rows = Vec::with_capacity(entries.len());
    for e in entries {
        seq += 1;
        let node_ids = serde_json::to_string(&e.node_ids)?;
        let params = e.params.to_string();
        let hash = chain_hash(
            &prev_hash,
            &Stored {
                seq,
                at: e.at,
                principal: &e.principal,
                source: &e.source,
                action: &e.action,
                command_id: &e.command_id,
                node_ids: &node_ids,
                document: &e.document,
                params: &params,
                result: &e.result,
            },
        );
        let prev_hash = std::mem::replace(&mut prev_hash, hash.clone());
        rows.push(Chained {
            seq,
            node_ids,
            params,
            prev_hash,
            hash,
        });
    }
    Ok(rows)
}

macro_rules! audit_columns {
    () => {
        "seq, at, principal, source, action, command_id, node_ids, document, params, result, prev_hash, hash"
    };
}

/// An anchor's seq as the column stores it; one past `i64::MAX` (refused by the API) is past any
/// record, so it is reported gone rather than wrapped to a negative seq.
fn anchor_seq(a: &AuditAnchor) -> i64 {
    i64::try_from(a.seq).unwrap_or(i64::MAX)
}

impl Store {
    /// Appends an audit record; returns once it is committed (group-committed with other writes).
    pub async fn append_audit(&self, entry: AuditEntry) -> Result<()> {
        self.writer
            .write(|reply| super::writer::WriteOp::Audit { entry, reply })
            .await
    }

    /// Queues an audit record without waiting for its commit (see `writer.rs`: it cannot delay the
    /// hot writes); a record that cannot be written is logged as lost.
    pub async fn queue_audit(&self, entry: AuditEntry) -> Result<()> {
        self.writer.queue(entry).await
    }

    /// Returns once every audit record queued before the call is committed (so a listing or a
    /// verification sees the calls made before it).
    pub async fn flush_audit(&self) -> Result<()> {
        self.writer.flush_audit().await
    }

    /// Audit records matching a query, newest first. `since`/`until` are epoch ms.
    pub async fn audit_records(
        &self,
        q: &AuditQuery,
        since: Option<i64>,
        until: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>> {
        // Only the conditions asked for are in the query, so each can use its index.
        let mut args: Vec<Arg> = Vec::new();
        with_pool!(self, read, |pool, d| {
            let mut sql = String::from(concat!(
                "SELECT ",
                audit_columns!(),
                " FROM audit_log WHERE 1 = 1"
            ));
            // The placeholder of the next value bound.
            let mut bind = |a: Arg| {
                args.push(a);
                format!("${}", args.len())
            };
            if let Some(p) = q.principal.as_deref().filter(|s| !s.is_empty()) {
                sql += &format!(" AND principal = {}", bind(Arg::Text(p.to_owned())));
            }
            if let Some(a) = q.action.as_deref().filter(|s| !s.is_empty()) {
                sql += &match a.strip_suffix('*') {
                    Some(prefix) => {
                        let p = bind(Arg::Text(prefix.to_owned()));
                        format!(" AND substr(action, 1, length({p})) = {p}")
                    }
                    None => format!(" AND action = {}", bind(Arg::Text(a.to_owned()))),
                };
            }
            if let Some(n) = q.node.as_deref().filter(|s| !s.is_empty()) {
                let p = bind(Arg::Text(n.to_owned()));
                sql += &format!(" AND {p} IN ({})", d.json_strings("audit_log.node_ids"));
            }
            if let Some(s) = since {
                sql += &format!(" AND at >= {}", bind(Arg::Int(s)));
            }
            if let Some(u) = until {
                sql += &format!(" AND at <= {}", bind(Arg::Int(u)));
            }
            sql += &format!(
                " ORDER BY seq DESC LIMIT {}",
                bind(Arg::Int(i64::from(limit)))
            );
            // Only placeholders and the dialect's fixed fragments are formatted in; values are bound.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for a in &args {
                query = match a {
                    Arg::Text(t) => query.bind(t),
                    Arg::Int(i) => query.bind(*i),
                };
            }
            query
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| Ok(LogRow::from_row(r).into_listed().into()))
                .collect()
        })
    }

    /// Walks the whole chain from the first record; names the first record that does not fit.
    /// With an anchor (a head returned earlier), the chain must still hold that record unchanged.
    pub async fn verify_audit(&self, anchor: Option<&AuditAnchor>) -> Result<AuditVerify> {
        let mut checker = Checker::default();
        loop {
            let rows: Vec<LogRow> = with_pool!(self, read, |pool| {
                sqlx::query(concat!(
                    "SELECT ",
                    audit_columns!(),
                    " FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
                ))
                .bind(checker.last_seq)
                .bind(VERIFY_PAGE)
                .fetch_all(pool)
                .await?
                .iter()
                .map(LogRow::from_row)
                .collect()
            });
            let n = rows.len() as i64;
            for r in &rows {
                let stored = r.stored();
                if let Err(v) = checker.check(&stored, &r.prev_hash, &r.hash) {
                    return Ok(v);
                }
                if let Some(a) = anchor.filter(|a| anchor_seq(a) == checker.last_seq)
                    && a.hash != checker.last_hash
                {
                    return Ok(checker.verdict(
                        stored.seq,
                        format!(
                            "record {} is not the anchor's record: it was replaced",
                            a.seq
                        ),
                    ));
                }
            }
            if n < VERIFY_PAGE {
                if let Some(a) = anchor.filter(|a| anchor_seq(a) > checker.last_seq) {
                    return Ok(checker.verdict(
                        checker.last_seq + 1,
                        format!(
                            "the anchor's record {} is gone: the chain ends at record {}, so the newest records were removed",
                            a.seq, checker.last_seq
                        ),
                    ));
                }
                return Ok(AuditVerify {
                    ok: true,
                    records: checker.records,
                    first_bad_seq: None,
                    reason: None,
                    head: (checker.last_seq > 0).then(|| AuditAnchor {
                        seq: checker.last_seq as u64,
                        hash: checker.last_hash.clone(),
                    }),
                });
            }
        }
    }
}

/// A value bound to an audit listing's query.
enum Arg {
    Text(String),
    Int(i64),
}

/// A record as read, every column as stored.
struct LogRow {
    seq: i64,
    at: i64,
    principal: String,
    source: String,
    action: String,
    command_id: String,
    node_ids: String,
    document: String,
    params: String,
    result: String,
    prev_hash: String,
    hash: String,
}

impl LogRow {
    fn from_row(r: &impl Columns) -> Self {
        LogRow {
            seq: r.int("seq"),
            at: r.int("at"),
            principal: r.text("principal"),
            source: r.text("source"),
            action: r.text("action"),
            command_id: r.text("command_id"),
            node_ids: r.text("node_ids"),
            document: r.text("document"),
            params: r.text("params"),
            result: r.text("result"),
            prev_hash: r.text("prev_hash"),
            hash: r.text("hash"),
        }
    }

    /// The columns the hash covers.
    fn stored(&self) -> Stored<'_> {
        Stored {
            seq: self.seq,
            at: self.at,
            principal: &self.principal,
            source: &self.source,
            action: &self.action,
            command_id: &self.command_id,
            node_ids: &self.node_ids,
            document: &self.document,
            params: &self.params,
            result: &self.result,
        }
    }

    /// The record decoded for a listing (JSON columns that do not decode read as empty).
    fn into_listed(self) -> AuditLogRow {
        AuditLogRow {
            seq: self.seq,
            at: self.at,
            node_ids: serde_json::from_str(&self.node_ids).unwrap_or_default(),
            params: serde_json::from_str(&self.params).unwrap_or(serde_json::Value::Null),
            principal: self.principal,
            source: self.source,
            action: self.action,
            command_id: self.command_id,
            document: self.document,
            result: self.result,
            hash: self.hash,
        }
    }
}

/// The state of a walk along the chain.
struct Checker {
    last_seq: i64,
    last_hash: String,
    records: u64,
}

impl Default for Checker {
    fn default() -> Self {
        Checker {
            last_seq: 0,
            last_hash: GENESIS.to_owned(),
            records: 0,
        }
    }
}

impl Checker {
    /// A broken chain's verdict.
    fn verdict(&self, seq: i64, reason: String) -> AuditVerify {
        AuditVerify {
            ok: false,
            records: self.records,
            first_bad_seq: Some(seq.max(0) as u64),
            reason: Some(reason),
            head: None,
        }
    }

    /// Checks the next record; on a break, the verdict naming it.
    fn check(&mut self, r: &Stored<'_>, prev_hash: &str, hash: &str) -> Result<(), AuditVerify> {
        let bad = |seq: i64, reason: String| self.verdict(seq, reason);
        if r.seq != self.last_seq + 1 {
            return Err(bad(
                r.seq,
                format!(
                    "record {} follows record {}: records {}..{} were removed",
                    r.seq,
                    self.last_seq,
                    self.last_seq + 1,
                    r.seq - 1
                ),
            ));
        }
        if prev_hash != self.last_hash {
            return Err(bad(
                r.seq,
                format!(
                    "record {} does not link to record {}: its prev_hash differs from that record's hash",
                    r.seq, self.last_seq
                ),
            ));
        }
        if chain_hash(prev_hash, r) != hash {
            return Err(bad(
                r.seq,
                format!(
                    "record {} was altered: its contents do not match its hash",
                    r.seq
                ),
            ));
        }
        self.last_seq = r.seq;
        self.last_hash = hash.to_owned();
        self.records += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at: i64, principal: &str, action: &str, nodes: &[&str]) -> AuditEntry {
        AuditEntry {
            at,
            principal: principal.into(),
            source: "127.0.0.1:1".into(),
            action: action.into(),
            node_ids: nodes.iter().map(|n| n.to_string()).collect(),
            params: serde_json::json!({ "at": at }),
            result: "200".into(),
            ..AuditEntry::default()
        }
    }

    /// Records appended (awaited and queued) list newest first under each filter, and the chain
    /// verifies, holds its anchor, and names a removed or edited record, on both databases.
    #[tokio::test]
    async fn records_list_by_filter_and_the_chain_verifies() {
        let (_dir, stores) = crate::testing::stores().await;
        for (kind, store) in stores {
            listed_and_verified(kind, &store).await;
        }
    }

    async fn listed_and_verified(kind: &str, store: &Store) {
        let (n1, n2, n3) = ("mi-1", "mi-2", "mi-3");
        let e = entry(100, "alice", "commands.send", &[n1, n2]);
        store.append_audit(e).await.unwrap();
        let e = entry(200, "bob", "commands.cancel", &[n2]);
        store.append_audit(e).await.unwrap();
        let e = entry(300, "alice", "documents.create", &[]);
        store.queue_audit(e).await.unwrap();
        let e = entry(400, "alice", "commands.send", &[n3]);
        store.queue_audit(e).await.unwrap();
        store.flush_audit().await.unwrap();

        let seqs = |q: AuditQuery, since, until, limit| async move {
            let recs = store.audit_records(&q, since, until, limit).await.unwrap();
            recs.iter().map(|r| r.seq).collect::<Vec<_>>()
        };
        let by = |principal: Option<&str>, action: Option<&str>, node: Option<&str>| AuditQuery {
            principal: principal.map(Into::into),
            action: action.map(Into::into),
            node: node.map(Into::into),
            ..AuditQuery::default()
        };
        assert_eq!(
            seqs(by(None, None, None), None, None, 10).await,
            [4, 3, 2, 1],
            "{kind}"
        );
        assert_eq!(
            seqs(by(Some("alice"), None, None), None, None, 10).await,
            [4, 3, 1],
            "{kind}"
        );
        assert_eq!(
            seqs(by(None, Some("commands.*"), None), None, None, 10).await,
            [4, 2, 1],
            "{kind}"
        );
        assert_eq!(
            seqs(by(None, Some("commands.send"), None), None, None, 10).await,
            [4, 1],
            "{kind}"
        );
        assert_eq!(
            seqs(by(None, Some("command"), None), None, None, 10).await,
            [0u64; 0],
            "{kind}"
        );
        assert_eq!(
            seqs(by(None, None, Some(n2)), None, None, 10).await,
            [2, 1],
            "{kind}"
        );
        assert_eq!(
            seqs(by(None, None, None), Some(200), Some(300), 10).await,
            [3, 2],
            "{kind}"
        );
        assert_eq!(
            seqs(by(None, None, None), None, None, 2).await,
            [4, 3],
            "{kind}"
        );
        let all_filters = by(Some("alice"), Some("commands.*"), Some(n1));
        assert_eq!(
            seqs(all_filters, Some(100), Some(100), 10).await,
            [1],
            "{kind}"
        );
        let first = store
            .audit_records(&by(None, None, Some(n1)), None, None, 1)
            .await
            .unwrap();
        assert_eq!(first[0].node_ids, [n1, n2], "{kind}");
        assert_eq!(first[0].params, serde_json::json!({ "at": 100 }), "{kind}");

        let v = store.verify_audit(None).await.unwrap();
        assert!(v.ok && v.records == 4, "{kind}: {v:?}");
        let head = v.head.expect("a head");
        let newest = store
            .audit_records(&AuditQuery::default(), None, None, 1)
            .await
            .unwrap();
        assert_eq!((head.seq, &head.hash), (4, &newest[0].hash), "{kind}");
        assert!(store.verify_audit(Some(&head)).await.unwrap().ok, "{kind}");

        let edit = |sql: &'static str| async move {
            crate::with_pool!(store, write, |pool| {
                sqlx::query(sql).execute(pool).await.unwrap();
            });
        };
        edit("DELETE FROM audit_log WHERE seq = 4").await;
        let v = store.verify_audit(Some(&head)).await.unwrap();
        assert_eq!(v.first_bad_seq, Some(4), "{kind}: {v:?}");
        assert!(v.reason.unwrap_or_default().contains("gone"), "{kind}");
        edit("UPDATE audit_log SET result = '500' WHERE seq = 2").await;
        let v = store.verify_audit(None).await.unwrap();
        assert_eq!(
            (v.ok, v.records, v.first_bad_seq),
            (false, 1, Some(2)),
            "{kind}"
        );
        assert!(v.reason.unwrap_or_default().contains("altered"), "{kind}");
    }

    /// Two servers' stores on one PostgreSQL database append at once, each through its own
    /// writer (so batches of both race for the head): every append succeeds, and the table holds
    /// one chain with all of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_from_two_stores_keep_one_chain_on_postgres() {
        const ROUNDS: usize = 40;
        const PER_ROUND: usize = 8;
        const EACH: usize = ROUNDS * PER_ROUND;
        let url = fleetrun_testkit::shared_postgres().create_database();
        let first = Store::open_postgres(&url).await.expect("first store");
        let second = Store::open_postgres(&url).await.expect("second store");
        // Each server appends in rounds (a round's records are batched together), so the two
        // writers' batches overlap many times.
        let server = |name: &'static str, store: Store| async move {
            let mut failed = Vec::new();
            for round in 0..ROUNDS {
                let mut appends = tokio::task::JoinSet::new();
                for i in 0..PER_ROUND {
                    let store = store.clone();
                    let e = entry((round * PER_ROUND + i) as i64, name, "test.append", &[]);
                    // Some awaited, some only queued: both kinds of batch race.
                    appends.spawn(async move {
                        if i % 3 == 0 {
                            store.queue_audit(e).await
                        } else {
                            store.append_audit(e).await
                        }
                    });
                }
                while let Some(r) = appends.join_next().await {
                    if let Err(e) = r.expect("task") {
                        failed.push(e.to_string());
                    }
                }
            }
            failed
        };
        let (a, b) = tokio::join!(
            tokio::spawn(server("first", first.clone())),
            tokio::spawn(server("second", second.clone()))
        );
        let failed = [a.expect("first"), b.expect("second")].concat();
        assert!(
            failed.is_empty(),
            "{} appends failed: {:?}",
            failed.len(),
            failed.first()
        );
        first.flush_audit().await.unwrap();
        second.flush_audit().await.unwrap();

        let v = first.verify_audit(None).await.unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!(v.records, 2 * EACH as u64);
        for name in ["first", "second"] {
            let q = AuditQuery {
                principal: Some(name.into()),
                ..AuditQuery::default()
            };
            let mine = second.audit_records(&q, None, None, 10_000).await.unwrap();
            assert_eq!(mine.len(), EACH, "{name}");
        }
    }

    fn rec(seq: i64, params: &str) -> Stored<'_> {
        Stored {
            seq,
            at: 1_700_000_000_000,
            principal: "admin",
            source: "127.0.0.1:1",
            action: "commands.send",
            command_id: "",
            node_ids: "[\"mi-0123456789abcdef0\"]",
            document: "AWS-RunShellScript",
            params,
            result: "201",
        }
    }

    /// Builds a valid chain of (record, prev_hash, hash).
    fn chain<'a>(params: &[&'a str]) -> Vec<(Stored<'a>, String, String)> {
        let mut prev = GENESIS.to_owned();
        let mut out = Vec::new();
        for (i, p) in params.iter().enumerate() {
            let r = rec(i as i64 + 1, p);
            let h = chain_hash(&prev, &r);
            out.push((r, prev.clone(), h.clone()));
            prev = h;
        }
        out
    }

    fn verify(c: &[(Stored<'_>, String, String)]) -> std::result::Result<u64, AuditVerify> {
        let mut k = Checker::default();
        for (r, prev, h) in c {
            k.check(r, prev, h)?;
        }
        Ok(k.records)
    }

    #[test]
    fn hash_is_deterministic_and_covers_every_column() {
        let a = chain_hash(GENESIS, &rec(1, "{}"));
        assert_eq!(a, chain_hash(GENESIS, &rec(1, "{}")));
        assert_eq!(a.len(), 64);
        assert_ne!(a, chain_hash(GENESIS, &rec(2, "{}")), "seq");
        assert_ne!(a, chain_hash(GENESIS, &rec(1, "{\"x\":1}")), "params");
        let mut r = rec(1, "{}");
        r.result = "400";
        assert_ne!(a, chain_hash(GENESIS, &r), "result");
        assert_ne!(a, chain_hash(&"1".repeat(64), &rec(1, "{}")), "prev hash");
        // Column boundaries are unambiguous: moving a character between columns changes the hash.
        let (mut x, mut y) = (rec(1, "{}"), rec(1, "{}"));
        (x.principal, x.source) = ("ab", "c");
        (y.principal, y.source) = ("a", "bc");
        assert_ne!(chain_hash(GENESIS, &x), chain_hash(GENESIS, &y));
    }

    #[test]
    fn an_intact_chain_verifies() {
        assert_eq!(verify(&chain(&["{}", "{\"a\":1}", "{\"b\":2}"])), Ok(3));
        assert_eq!(verify(&[]), Ok(0));
    }

    #[test]
    fn an_edited_record_is_named() {
        let mut c = chain(&["{}", "{\"script\":\"ls\"}", "{}"]);
        c[1].0.params = "{\"script\":\"rm -rf /\"}";
        let v = verify(&c).unwrap_err();
        assert!(!v.ok);
        assert_eq!(v.first_bad_seq, Some(2));
        assert_eq!(v.records, 1);
        assert!(v.reason.unwrap().contains("altered"));
    }

    #[test]
    fn an_edited_record_with_a_recomputed_hash_breaks_the_next_link() {
        let mut c = chain(&["{}", "{}", "{}"]);
        c[1].0.result = "500";
        c[1].2 = chain_hash(&c[1].1, &c[1].0);
        let v = verify(&c).unwrap_err();
        assert_eq!(v.first_bad_seq, Some(3));
        assert!(v.reason.unwrap().contains("does not link"));
    }

    #[test]
    fn a_removed_record_is_named() {
        let mut c = chain(&["{}", "{}", "{}"]);
        c.remove(1);
        let v = verify(&c).unwrap_err();
        assert_eq!(v.first_bad_seq, Some(3));
        assert!(v.reason.unwrap().contains("removed"));
        let mut c = chain(&["{}", "{}"]);
        c.remove(0);
        assert_eq!(verify(&c).unwrap_err().first_bad_seq, Some(2));
    }
}
