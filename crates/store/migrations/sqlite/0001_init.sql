-- fleetrun schema v1. Portable SQL: times are epoch milliseconds (INTEGER), ids TEXT, tags and
-- lists JSON TEXT, output bytes BLOB, so a PostgreSQL version is the same tables with BYTEA/BIGINT.

CREATE TABLE api_tokens (
    token_hash   TEXT PRIMARY KEY,          -- hex SHA-256 of the bearer token
    name         TEXT NOT NULL,
    created_at   INTEGER NOT NULL
);

CREATE TABLE activations (
    activation_id TEXT PRIMARY KEY,
    code_hash     TEXT NOT NULL UNIQUE,     -- hex SHA-256 of the code
    tags          TEXT NOT NULL,            -- JSON object
    reg_limit     INTEGER NOT NULL,
    registrations INTEGER NOT NULL DEFAULT 0,
    description   TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL
);
CREATE INDEX activations_created ON activations (created_at);

CREATE TABLE nodes (
    node_id       TEXT PRIMARY KEY,
    secret_hash   TEXT NOT NULL,
    name          TEXT NOT NULL,
    hostname      TEXT NOT NULL,
    os            TEXT NOT NULL,
    arch          TEXT NOT NULL,
    ips           TEXT NOT NULL,            -- JSON array
    agent_version TEXT NOT NULL,
    tags          TEXT NOT NULL,            -- JSON object (copy of node_tags, for listings)
    activation_id TEXT NOT NULL,
    registered_at INTEGER NOT NULL,
    last_seen_at  INTEGER NOT NULL
);

-- Tags again, one row each, so target expressions resolve through an index.
CREATE TABLE node_tags (
    node_id TEXT NOT NULL,
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (node_id, key)
);
CREATE INDEX node_tags_key_value ON node_tags (key, value);

CREATE TABLE commands (
    command_id         TEXT PRIMARY KEY,
    document_name      TEXT NOT NULL,
    commands           TEXT NOT NULL,       -- JSON array of script lines
    working_dir        TEXT NOT NULL,
    execution_timeout  INTEGER NOT NULL,
    delivery_timeout   INTEGER NOT NULL,
    comment            TEXT NOT NULL,
    node_ids           TEXT NOT NULL,       -- JSON array, as asked
    targets            TEXT NOT NULL,       -- target expression, as asked
    max_concurrency    TEXT NOT NULL,
    max_errors         TEXT NOT NULL,
    run_as             TEXT NOT NULL DEFAULT '',
    memory_limit_mb    INTEGER,
    cpu_limit_percent  INTEGER,
    status             TEXT NOT NULL,
    status_details     TEXT NOT NULL,
    requested_at       INTEGER NOT NULL,
    target_count       INTEGER NOT NULL,
    completed_count    INTEGER NOT NULL DEFAULT 0,
    error_count        INTEGER NOT NULL DEFAULT 0,
    delivery_timed_out_count INTEGER NOT NULL DEFAULT 0,
    cancel_requested   INTEGER NOT NULL DEFAULT 0,
    ssm_extra          TEXT NOT NULL DEFAULT '{}'  -- JSON: members only the SSM API shows
);
CREATE INDEX commands_requested ON commands (requested_at, command_id);
CREATE INDEX commands_status ON commands (status);

CREATE TABLE invocations (
    command_id     TEXT NOT NULL,
    node_id        TEXT NOT NULL,
    seq            INTEGER NOT NULL,        -- order of dispatch within the command
    node_name      TEXT NOT NULL,
    status         TEXT NOT NULL,
    status_details TEXT NOT NULL,
    delivered_at   INTEGER,                 -- when the Run frame was sent (NULL: not delivered)
    started_at     INTEGER,
    finished_at    INTEGER,
    exit_code      INTEGER NOT NULL DEFAULT -1,
    signal         INTEGER,
    cpu_user_ms    INTEGER,
    cpu_system_ms  INTEGER,
    max_rss_kb     INTEGER,
    stdout_inline  BLOB NOT NULL DEFAULT X'',
    stderr_inline  BLOB NOT NULL DEFAULT X'',
    stdout_bytes   INTEGER NOT NULL DEFAULT 0,
    stderr_bytes   INTEGER NOT NULL DEFAULT 0,
    message        TEXT NOT NULL DEFAULT '',
    limits_applied TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (command_id, node_id)
);
CREATE INDEX invocations_command_seq ON invocations (command_id, seq);
CREATE INDEX invocations_node_status ON invocations (node_id, status);

-- SigV4 access keys for the SSM-compatible API. The secret is needed to verify signatures, so it is
-- kept encrypted (XChaCha20-Poly1305 with the data dir's key), not hashed.
CREATE TABLE access_keys (
    access_key_id TEXT PRIMARY KEY,
    secret_nonce  BLOB NOT NULL,
    secret_enc    BLOB NOT NULL,
    name          TEXT NOT NULL,
    created_at    INTEGER NOT NULL
);
