-- Objects kept for users (`fleetrun objects`, script inputs and results): what the object store
-- holds under `files/KEY`, with the size and SHA-256 measured as it was written. A row exists only
-- for a complete object: it is written after the upload completed.
CREATE TABLE objects (
    key TEXT PRIMARY KEY NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    created_by TEXT NOT NULL
);
