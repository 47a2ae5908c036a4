-- The audit trail: one row per API call and agent-channel action, hash-chained so that an edited or
-- removed row is detected (`POST /v1/audit/verify`). hash = hex SHA-256(prev_hash || canonical row),
-- the canonical row being the JSON array written by store/audit.rs `canonical()`; the first row's
-- prev_hash is 64 zeros. Rows are only ever appended.

CREATE TABLE audit_log (
    seq        INTEGER PRIMARY KEY,     -- 1, 2, 3, ... without gaps
    at         INTEGER NOT NULL,        -- epoch ms
    principal  TEXT NOT NULL,           -- token name, access key id, node id, or "anonymous"
    source     TEXT NOT NULL,           -- client address (ip:port)
    action     TEXT NOT NULL,           -- e.g. commands.send, ssm.SendCommand, agent.hello
    command_id TEXT NOT NULL,           -- '' when none
    node_ids   TEXT NOT NULL,           -- JSON array of strings
    document   TEXT NOT NULL,           -- '' when none
    params     TEXT NOT NULL,           -- JSON, secrets redacted
    result     TEXT NOT NULL,           -- HTTP status and error code, or the channel outcome
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_principal ON audit_log (principal, seq);
CREATE INDEX audit_log_action ON audit_log (action, seq);
