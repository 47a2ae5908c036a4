-- People and machines as principals: every API token and SigV4 access key belongs to a user, and a
-- user's permissions are its role's built-in Cedar policies plus its own (crates/server/src/authz.rs).

CREATE TABLE users (
    name       TEXT PRIMARY KEY,
    role       TEXT NOT NULL,            -- admin | operator | viewer | none
    policy     TEXT NOT NULL DEFAULT '', -- Cedar policies added to the role's ('' = none)
    created_at INTEGER NOT NULL
);

-- Tokens and keys made before principals existed were the admin's.
INSERT INTO users (name, role, created_at) VALUES ('admin', 'admin', 0);

ALTER TABLE api_tokens ADD COLUMN user_name TEXT NOT NULL DEFAULT 'admin' REFERENCES users(name);
ALTER TABLE api_tokens ADD COLUMN expires_at INTEGER;   -- epoch ms; NULL = never
CREATE INDEX api_tokens_user ON api_tokens(user_name);

ALTER TABLE access_keys ADD COLUMN user_name TEXT NOT NULL DEFAULT 'admin' REFERENCES users(name);
CREATE INDEX access_keys_user ON access_keys(user_name);
