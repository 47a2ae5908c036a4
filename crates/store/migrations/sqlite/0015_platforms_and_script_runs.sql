-- The platform a node runs on (`linux`, `macos`, ...): what a saved script's platform must match.
-- Every agent so far runs on Linux; the handshake does not carry it yet.
ALTER TABLE nodes ADD COLUMN platform TEXT NOT NULL DEFAULT 'linux';

-- Which saved script (and version) a command ran, written with the command.
CREATE TABLE script_runs (
    command_id TEXT PRIMARY KEY REFERENCES commands (command_id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    version    INTEGER NOT NULL
);
