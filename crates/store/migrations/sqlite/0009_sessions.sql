-- Session records (issue 11): one row per interactive stream (an exec today), inserted when the
-- agent has started it and completed when it ends. A row still 'Active' at start-up belonged to a
-- server that stopped; start-up marks it ended ("server restarted").
CREATE TABLE sessions (
    session_id TEXT PRIMARY KEY,      -- UUID
    kind       TEXT NOT NULL,         -- 'exec'
    node_id    TEXT NOT NULL,
    principal  TEXT NOT NULL,
    source     TEXT NOT NULL,         -- the client's address
    run_as     TEXT NOT NULL,         -- '' for the agent's user
    command    TEXT NOT NULL,
    started_at INTEGER NOT NULL,      -- epoch ms
    ended_at   INTEGER,               -- epoch ms; NULL while active
    bytes_in   INTEGER NOT NULL DEFAULT 0,
    bytes_out  INTEGER NOT NULL DEFAULT 0,
    exit_code  INTEGER,               -- NULL unless it exited
    end_reason TEXT NOT NULL DEFAULT '',
    status     TEXT NOT NULL          -- 'Active', 'Ended', 'Terminated'
);
CREATE INDEX sessions_active ON sessions (status) WHERE status = 'Active';
CREATE INDEX sessions_started ON sessions (started_at, session_id);
