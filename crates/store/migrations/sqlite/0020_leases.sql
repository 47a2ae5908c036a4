-- Server replicas on one database (PostgreSQL): who is alive, and which replica dispatches each
-- command. Times are epoch ms by the database's clock (`Store::db_now_ms`), never a replica's,
-- so replicas whose clocks disagree still agree on whose lease has expired.
CREATE TABLE replicas (
    replica_id   TEXT PRIMARY KEY,
    address      TEXT NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL
);

-- A command's owner dispatches it while its lease runs; a takeover bumps owner_epoch, which
-- fences the old owner's writes. '' / 0: owned by nobody (claimable at once).
ALTER TABLE commands ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE commands ADD COLUMN owner_epoch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE commands ADD COLUMN lease_until INTEGER NOT NULL DEFAULT 0;

-- Active commands by lease end: the takeover scan ("lease expired") and the renewal walk read
-- only the commands still running, however many ended ones are kept.
CREATE INDEX commands_lease ON commands (lease_until)
    WHERE status IN ('Pending', 'InProgress', 'Cancelling');
