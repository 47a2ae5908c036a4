-- fleetrun's schema on PostgreSQL as of SQLite migration 0019 (see ../README.md for the types).

CREATE TABLE users (
    name       TEXT COLLATE "C" PRIMARY KEY,
    role       TEXT COLLATE "C" NOT NULL,
    policy     TEXT COLLATE "C" NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL
);
INSERT INTO users (name, role, policy, created_at) VALUES ('admin', 'admin', '', 0);

CREATE TABLE api_tokens (
    token_hash TEXT COLLATE "C" PRIMARY KEY,
    name       TEXT COLLATE "C" NOT NULL,
    created_at BIGINT NOT NULL,
    user_name  TEXT COLLATE "C" NOT NULL DEFAULT 'admin' REFERENCES users (name),
    expires_at BIGINT
);
CREATE INDEX api_tokens_user ON api_tokens (user_name);

CREATE TABLE access_keys (
    access_key_id TEXT COLLATE "C" PRIMARY KEY,
    secret_nonce  BYTEA NOT NULL,
    secret_enc    BYTEA NOT NULL,
    name          TEXT COLLATE "C" NOT NULL,
    created_at    BIGINT NOT NULL,
    user_name     TEXT COLLATE "C" NOT NULL DEFAULT 'admin' REFERENCES users (name)
);
CREATE INDEX access_keys_user ON access_keys (user_name);

CREATE TABLE activations (
    activation_id         TEXT COLLATE "C" PRIMARY KEY,
    code_hash             TEXT COLLATE "C" NOT NULL UNIQUE,
    tags                  TEXT COLLATE "C" NOT NULL,
    reg_limit             BIGINT NOT NULL,
    registrations         BIGINT NOT NULL DEFAULT 0,
    description           TEXT COLLATE "C" NOT NULL,
    created_at            BIGINT NOT NULL,
    expires_at            BIGINT NOT NULL,
    default_instance_name TEXT COLLATE "C" NOT NULL DEFAULT '',
    iam_role              TEXT COLLATE "C" NOT NULL DEFAULT ''
);
CREATE INDEX activations_created ON activations (created_at);

CREATE TABLE nodes (
    node_id             TEXT COLLATE "C" PRIMARY KEY,
    name                TEXT COLLATE "C" NOT NULL,
    hostname            TEXT COLLATE "C" NOT NULL,
    os                  TEXT COLLATE "C" NOT NULL,
    arch                TEXT COLLATE "C" NOT NULL,
    ips                 TEXT COLLATE "C" NOT NULL,
    agent_version       TEXT COLLATE "C" NOT NULL,
    tags                TEXT COLLATE "C" NOT NULL,
    activation_id       TEXT COLLATE "C" NOT NULL,
    registered_at       BIGINT NOT NULL,
    last_seen_at        BIGINT NOT NULL,
    deregistered_at     BIGINT,
    public_key          TEXT COLLATE "C",
    previous_public_key TEXT COLLATE "C",
    key_rotated_at      BIGINT,
    platform            TEXT COLLATE "C" NOT NULL DEFAULT 'linux'
);

CREATE TABLE node_tags (
    node_id TEXT COLLATE "C" NOT NULL,
    key     TEXT COLLATE "C" NOT NULL,
    value   TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (node_id, key)
);
CREATE INDEX node_tags_key_value ON node_tags (key, value);

CREATE TABLE commands (
    command_id               TEXT COLLATE "C" PRIMARY KEY,
    document_name            TEXT COLLATE "C" NOT NULL,
    commands                 TEXT COLLATE "C" NOT NULL,
    working_dir              TEXT COLLATE "C" NOT NULL,
    execution_timeout        BIGINT NOT NULL,
    delivery_timeout         BIGINT NOT NULL,
    comment                  TEXT COLLATE "C" NOT NULL,
    node_ids                 TEXT COLLATE "C" NOT NULL,
    targets                  TEXT COLLATE "C" NOT NULL,
    max_concurrency          TEXT COLLATE "C" NOT NULL,
    max_errors               TEXT COLLATE "C" NOT NULL,
    run_as                   TEXT COLLATE "C" NOT NULL DEFAULT '',
    memory_limit_mb          BIGINT,
    cpu_limit_percent        BIGINT,
    status                   TEXT COLLATE "C" NOT NULL,
    status_details           TEXT COLLATE "C" NOT NULL,
    requested_at             BIGINT NOT NULL,
    target_count             BIGINT NOT NULL,
    completed_count          BIGINT NOT NULL DEFAULT 0,
    error_count              BIGINT NOT NULL DEFAULT 0,
    delivery_timed_out_count BIGINT NOT NULL DEFAULT 0,
    cancel_requested         BIGINT NOT NULL DEFAULT 0,
    ssm_extra                TEXT COLLATE "C" NOT NULL DEFAULT '{}',
    document_version         TEXT COLLATE "C" NOT NULL DEFAULT '',
    parameters               TEXT COLLATE "C" NOT NULL DEFAULT '',
    idempotency_principal    TEXT COLLATE "C",
    idempotency_key          TEXT COLLATE "C",
    idempotency_hash         TEXT COLLATE "C",
    output_s3_bucket         TEXT COLLATE "C" NOT NULL DEFAULT '',
    output_s3_prefix         TEXT COLLATE "C" NOT NULL DEFAULT '',
    output_s3_region         TEXT COLLATE "C" NOT NULL DEFAULT '',
    output_s3_plugin_dir     TEXT COLLATE "C" NOT NULL DEFAULT ''
);
CREATE INDEX commands_requested ON commands (requested_at, command_id);
CREATE INDEX commands_status ON commands (status);
CREATE UNIQUE INDEX commands_idempotency ON commands (idempotency_principal, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE invocations (
    command_id     TEXT COLLATE "C" NOT NULL,
    node_id        TEXT COLLATE "C" NOT NULL,
    seq            BIGINT NOT NULL,
    node_name      TEXT COLLATE "C" NOT NULL,
    status         TEXT COLLATE "C" NOT NULL,
    status_details TEXT COLLATE "C" NOT NULL,
    delivered_at   BIGINT,
    started_at     BIGINT,
    finished_at    BIGINT,
    exit_code      BIGINT NOT NULL DEFAULT -1,
    signal         BIGINT,
    cpu_user_ms    BIGINT,
    cpu_system_ms  BIGINT,
    max_rss_kb     BIGINT,
    stdout_inline  BYTEA NOT NULL DEFAULT '\x',
    stderr_inline  BYTEA NOT NULL DEFAULT '\x',
    stdout_bytes   BIGINT NOT NULL DEFAULT 0,
    stderr_bytes   BIGINT NOT NULL DEFAULT 0,
    message        TEXT COLLATE "C" NOT NULL DEFAULT '',
    limits_applied TEXT COLLATE "C" NOT NULL DEFAULT '',
    PRIMARY KEY (command_id, node_id)
);
CREATE INDEX invocations_command_seq ON invocations (command_id, seq);
CREATE INDEX invocations_node_status ON invocations (node_id, status);

CREATE TABLE documents (
    name            TEXT COLLATE "C" PRIMARY KEY,
    document_type   TEXT COLLATE "C" NOT NULL,
    document_format TEXT COLLATE "C" NOT NULL,
    owner           TEXT COLLATE "C" NOT NULL,
    default_version BIGINT NOT NULL,
    latest_version  BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    tags            TEXT COLLATE "C" NOT NULL DEFAULT '{}'
);

CREATE TABLE document_versions (
    name           TEXT COLLATE "C" NOT NULL REFERENCES documents (name) ON DELETE CASCADE,
    version        BIGINT NOT NULL,
    version_name   TEXT COLLATE "C",
    content        TEXT COLLATE "C" NOT NULL,
    hash           TEXT COLLATE "C" NOT NULL,
    schema_version TEXT COLLATE "C" NOT NULL,
    description    TEXT COLLATE "C" NOT NULL,
    created_at     BIGINT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE INDEX document_versions_hash ON document_versions (name, hash);

CREATE TABLE audit_log (
    seq        BIGINT PRIMARY KEY,
    at         BIGINT NOT NULL,
    principal  TEXT COLLATE "C" NOT NULL,
    source     TEXT COLLATE "C" NOT NULL,
    action     TEXT COLLATE "C" NOT NULL,
    command_id TEXT COLLATE "C" NOT NULL,
    node_ids   TEXT COLLATE "C" NOT NULL,
    document   TEXT COLLATE "C" NOT NULL,
    params     TEXT COLLATE "C" NOT NULL,
    result     TEXT COLLATE "C" NOT NULL,
    prev_hash  TEXT COLLATE "C" NOT NULL,
    hash       TEXT COLLATE "C" NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_principal ON audit_log (principal, seq);
CREATE INDEX audit_log_action ON audit_log (action, seq);

CREATE TABLE params (
    name            TEXT COLLATE "C" PRIMARY KEY,
    secure          BIGINT NOT NULL,
    value           TEXT COLLATE "C" NOT NULL,
    nonce           BYTEA,
    sealed          BYTEA,
    version         BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    updated_by      TEXT COLLATE "C" NOT NULL,
    list            BIGINT NOT NULL DEFAULT 0,
    description     TEXT COLLATE "C" NOT NULL DEFAULT '',
    allowed_pattern TEXT COLLATE "C" NOT NULL DEFAULT '',
    tags            TEXT COLLATE "C" NOT NULL DEFAULT '{}'
);

CREATE TABLE param_versions (
    name            TEXT COLLATE "C" NOT NULL REFERENCES params (name) ON DELETE CASCADE,
    version         BIGINT NOT NULL,
    secure          BIGINT NOT NULL,
    list            BIGINT NOT NULL,
    value           TEXT COLLATE "C" NOT NULL,
    nonce           BYTEA,
    sealed          BYTEA,
    description     TEXT COLLATE "C" NOT NULL,
    allowed_pattern TEXT COLLATE "C" NOT NULL,
    updated_at      BIGINT NOT NULL,
    updated_by      TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE TABLE sessions (
    session_id      TEXT COLLATE "C" PRIMARY KEY,
    kind            TEXT COLLATE "C" NOT NULL,
    node_id         TEXT COLLATE "C" NOT NULL,
    principal       TEXT COLLATE "C" NOT NULL,
    source          TEXT COLLATE "C" NOT NULL,
    run_as          TEXT COLLATE "C" NOT NULL,
    command         TEXT COLLATE "C" NOT NULL,
    started_at      BIGINT NOT NULL,
    ended_at        BIGINT,
    bytes_in        BIGINT NOT NULL DEFAULT 0,
    bytes_out       BIGINT NOT NULL DEFAULT 0,
    exit_code       BIGINT,
    end_reason      TEXT COLLATE "C" NOT NULL DEFAULT '',
    status          TEXT COLLATE "C" NOT NULL,
    recording       TEXT COLLATE "C" NOT NULL DEFAULT 'none',
    recording_bytes BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX sessions_active ON sessions (status) WHERE status = 'Active';
CREATE INDEX sessions_started ON sessions (started_at, session_id);
CREATE INDEX sessions_ended ON sessions (ended_at) WHERE ended_at IS NOT NULL;

CREATE TABLE objects (
    key        TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    size       BIGINT NOT NULL,
    sha256     TEXT COLLATE "C" NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT COLLATE "C" NOT NULL
);

CREATE TABLE scripts (
    name           TEXT COLLATE "C" PRIMARY KEY,
    latest_version BIGINT NOT NULL,
    created_at     BIGINT NOT NULL,
    created_by     TEXT COLLATE "C" NOT NULL
);

CREATE TABLE script_versions (
    name        TEXT COLLATE "C" NOT NULL REFERENCES scripts (name) ON DELETE CASCADE,
    version     BIGINT NOT NULL,
    description TEXT COLLATE "C" NOT NULL,
    platform    TEXT COLLATE "C" NOT NULL,
    input_uri   TEXT COLLATE "C",
    output_path TEXT COLLATE "C",
    body        TEXT COLLATE "C" NOT NULL,
    hash        TEXT COLLATE "C" NOT NULL,
    created_at  BIGINT NOT NULL,
    created_by  TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE TABLE s3_exports (
    command_id      TEXT COLLATE "C" NOT NULL,
    node_id         TEXT COLLATE "C" NOT NULL,
    queued_at       BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error      TEXT COLLATE "C" NOT NULL DEFAULT '',
    PRIMARY KEY (command_id, node_id)
);
CREATE INDEX s3_exports_due ON s3_exports (next_attempt_at);

CREATE TABLE script_runs (
    command_id  TEXT COLLATE "C" PRIMARY KEY REFERENCES commands (command_id) ON DELETE CASCADE,
    name        TEXT COLLATE "C" NOT NULL,
    version     BIGINT NOT NULL,
    input_uri   TEXT COLLATE "C",
    output_path TEXT COLLATE "C"
);

CREATE TABLE script_run_nodes (
    command_id TEXT COLLATE "C" NOT NULL REFERENCES commands (command_id) ON DELETE CASCADE,
    node_id    TEXT COLLATE "C" NOT NULL,
    dir        TEXT COLLATE "C" NOT NULL,
    phase      TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (command_id, node_id)
);
CREATE INDEX script_run_nodes_phase ON script_run_nodes (phase);
