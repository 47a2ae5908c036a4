-- What the SSM Parameter Store keeps beside a value: its type (a StringList is a plain value of
-- comma-separated items), a description, the pattern every new value must match, and each version.
ALTER TABLE params ADD COLUMN list INTEGER NOT NULL DEFAULT 0;            -- 1: StringList
ALTER TABLE params ADD COLUMN description TEXT NOT NULL DEFAULT '';
ALTER TABLE params ADD COLUMN allowed_pattern TEXT NOT NULL DEFAULT '';   -- '' = any value

-- Every version of a parameter (the current one included), as `params` holds it; the oldest go past
-- 100 (SSM's count), and all of them with the parameter.
CREATE TABLE param_versions (
    name            TEXT NOT NULL REFERENCES params (name) ON DELETE CASCADE,
    version         INTEGER NOT NULL,
    secure          INTEGER NOT NULL,
    list            INTEGER NOT NULL,
    value           TEXT NOT NULL,
    nonce           BLOB,
    sealed          BLOB,
    description     TEXT NOT NULL,
    allowed_pattern TEXT NOT NULL,
    updated_at      INTEGER NOT NULL,
    updated_by      TEXT NOT NULL,
    PRIMARY KEY (name, version)
);

INSERT INTO param_versions (name, version, secure, list, value, nonce, sealed, description,
                            allowed_pattern, updated_at, updated_by)
SELECT name, version, secure, list, value, nonce, sealed, description, allowed_pattern, updated_at,
       updated_by
FROM params;
