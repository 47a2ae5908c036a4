-- Documents (SSM Command documents) and their versions; commands remember the version they ran and
-- the parameters they were given.

CREATE TABLE documents (
    name            TEXT PRIMARY KEY,
    document_type   TEXT NOT NULL,          -- 'Command'
    document_format TEXT NOT NULL,          -- 'JSON'
    owner           TEXT NOT NULL,
    default_version INTEGER NOT NULL,
    latest_version  INTEGER NOT NULL,
    created_at      INTEGER NOT NULL
);

CREATE TABLE document_versions (
    name           TEXT NOT NULL REFERENCES documents (name) ON DELETE CASCADE,
    version        INTEGER NOT NULL,        -- 1, 2, ...
    version_name   TEXT,
    content        TEXT NOT NULL,           -- as given
    hash           TEXT NOT NULL,           -- hex SHA-256 of content
    schema_version TEXT NOT NULL,
    description    TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE INDEX document_versions_hash ON document_versions (name, hash);

ALTER TABLE commands ADD COLUMN document_version TEXT NOT NULL DEFAULT '';
-- JSON object of the parameters as given; '' for commands stored before this migration (their
-- parameters are derived from commands, working_dir and execution_timeout).
ALTER TABLE commands ADD COLUMN parameters TEXT NOT NULL DEFAULT '';
