-- Saved scripts (issue 12) and their versions, kept as documents' are: each update adds a version,
-- earlier ones stay until the script is deleted.

CREATE TABLE scripts (
    name           TEXT PRIMARY KEY,
    latest_version INTEGER NOT NULL,
    created_at     INTEGER NOT NULL,
    created_by     TEXT NOT NULL
);

CREATE TABLE script_versions (
    name        TEXT NOT NULL REFERENCES scripts (name) ON DELETE CASCADE,
    version     INTEGER NOT NULL,          -- 1, 2, ...
    description TEXT NOT NULL,
    platform    TEXT NOT NULL,             -- 'linux'
    input_uri   TEXT,                      -- s3://bucket/key, an object key, or https://...
    output_path TEXT,                      -- relative to the run's temp dir
    body        TEXT NOT NULL,
    hash        TEXT NOT NULL,             -- hex SHA-256 of body
    created_at  INTEGER NOT NULL,
    created_by  TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
