//! The audit trail: appending hash-chained records (through the group-commit writer), querying them,
//! and verifying the chain.
//!
//! Each record stores `hash = hex(SHA-256(prev_hash || canonical(record)))`, where `prev_hash` is the
//! previous record's hash (64 zeros for the first) and `canonical` is a JSON array of the stored
//! columns in a fixed order. Editing a record breaks its hash; removing one breaks the sequence and
//! the next record's `prev_hash`. Removing the newest records is not detectable from the table alone.

use super::{Result, Store};
use fleetrun_proto::api::{AuditAnchor, AuditQuery, AuditRecord, AuditVerify};
use sha2::{Digest, Sha256};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

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

/// Audit rows stored per `INSERT` (12 bound values each; SQLite allows 32,766).
const INSERT_ROWS_MAX: usize = 500;

/// Appends records on the writer connection (inside the writer's transaction), in order, after the
/// current head of the chain: one query for the head, the chain computed here, one `INSERT` per
/// [`INSERT_ROWS_MAX`] records.
pub(super) async fn append(conn: &mut SqliteConnection, entries: &[&AuditEntry]) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let head: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    let (mut seq, mut prev_hash) = head.unwrap_or((0, GENESIS.to_owned()));
    // (seq, node_ids, params, prev_hash, hash) of each entry.
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
        let prev = std::mem::replace(&mut prev_hash, hash.clone());
        rows.push((seq, node_ids, params, prev, hash));
    }
    for (entries, rows) in entries
        .chunks(INSERT_ROWS_MAX)
        .zip(rows.chunks(INSERT_ROWS_MAX))
    {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO audit_log (seq, at, principal, source, action, command_id, node_ids, document,
                                    params, result, prev_hash, hash) ",
        );
        qb.push_values(entries.iter().zip(rows), |mut b, (e, r)| {
            b.push_bind(r.0)
                .push_bind(e.at)
                .push_bind(&e.principal)
                .push_bind(&e.source)
                .push_bind(&e.action)
                .push_bind(&e.command_id)
                .push_bind(&r.1)
                .push_bind(&e.document)
                .push_bind(&r.2)
                .push_bind(&e.result)
                .push_bind(&r.3)
                .push_bind(&r.4);
        });
        qb.build().execute(&mut *conn).await?;
    }
    Ok(())
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
        self.writer()?
            .write(|reply| super::writer::WriteOp::Audit { entry, reply })
            .await
    }

    /// Queues an audit record without waiting for its commit (see `writer.rs`: it cannot delay the
    /// hot writes); a record that cannot be written is logged as lost.
    pub async fn queue_audit(&self, entry: AuditEntry) -> Result<()> {
        self.writer()?.queue(entry).await
    }

    /// Returns once every audit record queued before the call is committed (so a listing or a
    /// verification sees the calls made before it).
    pub async fn flush_audit(&self) -> Result<()> {
        self.writer()?.flush_audit().await
    }

    /// Audit records matching a query, newest first. `since`/`until` are epoch ms.
    pub async fn audit_records(
        &self,
        q: &AuditQuery,
        since: Option<i64>,
        until: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>> {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new("SELECT ");
        qb.push(audit_columns!())
            .push(" FROM audit_log WHERE 1 = 1");
        if let Some(p) = q.principal.as_deref().filter(|s| !s.is_empty()) {
            qb.push(" AND principal = ").push_bind(p.to_owned());
        }
        if let Some(a) = q.action.as_deref().filter(|s| !s.is_empty()) {
            match a.strip_suffix('*') {
                Some(prefix) => qb
                    .push(" AND substr(action, 1, length(")
                    .push_bind(prefix.to_owned())
                    .push(")) = ")
                    .push_bind(prefix.to_owned()),
                None => qb.push(" AND action = ").push_bind(a.to_owned()),
            };
        }
        if let Some(n) = q.node.as_deref().filter(|s| !s.is_empty()) {
            qb.push(" AND EXISTS (SELECT 1 FROM json_each(audit_log.node_ids) WHERE value = ")
                .push_bind(n.to_owned())
                .push(")");
        }
        if let Some(s) = since {
            qb.push(" AND at >= ").push_bind(s);
        }
        if let Some(u) = until {
            qb.push(" AND at <= ").push_bind(u);
        }
        qb.push(" ORDER BY seq DESC LIMIT ").push_bind(limit as i64);
        let rows = qb.build().fetch_all(&self.sqlite()?.read).await?;
        rows.iter()
            .map(|r| {
                Ok(AuditLogRow {
                    seq: r.get("seq"),
                    at: r.get("at"),
                    principal: r.get("principal"),
                    source: r.get("source"),
                    action: r.get("action"),
                    command_id: r.get("command_id"),
                    node_ids: serde_json::from_str(r.get("node_ids")).unwrap_or_default(),
                    document: r.get("document"),
                    params: serde_json::from_str(r.get("params"))
                        .unwrap_or(serde_json::Value::Null),
                    result: r.get("result"),
                    hash: r.get("hash"),
                }
                .into())
            })
            .collect()
    }

    /// Walks the whole chain from the first record; names the first record that does not fit.
    /// With an anchor (a head returned earlier), the chain must still hold that record unchanged.
    pub async fn verify_audit(&self, anchor: Option<&AuditAnchor>) -> Result<AuditVerify> {
        let mut checker = Checker::default();
        loop {
            let rows = sqlx::query(concat!(
                "SELECT ",
                audit_columns!(),
                " FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?"
            ))
            .bind(checker.last_seq)
            .bind(VERIFY_PAGE)
            .fetch_all(&self.sqlite()?.read)
            .await?;
            let n = rows.len() as i64;
            for r in &rows {
                let stored = Stored {
                    seq: r.get("seq"),
                    at: r.get("at"),
                    principal: r.get("principal"),
                    source: r.get("source"),
                    action: r.get("action"),
                    command_id: r.get("command_id"),
                    node_ids: r.get("node_ids"),
                    document: r.get("document"),
                    params: r.get("params"),
                    result: r.get("result"),
                };
                if let Err(v) = checker.check(&stored, r.get("prev_hash"), r.get("hash")) {
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
