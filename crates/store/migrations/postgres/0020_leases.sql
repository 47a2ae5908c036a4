-- Server replicas on one database: who is alive, and which replica dispatches each command
-- (sqlite/0020_leases.sql says why). Times are epoch ms by the database's clock.
CREATE TABLE replicas (
    replica_id   TEXT COLLATE "C" PRIMARY KEY,
    address      TEXT COLLATE "C" NOT NULL,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);

ALTER TABLE commands ADD COLUMN owner TEXT COLLATE "C" NOT NULL DEFAULT '';
ALTER TABLE commands ADD COLUMN owner_epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE commands ADD COLUMN lease_until BIGINT NOT NULL DEFAULT 0;

CREATE INDEX commands_lease ON commands (lease_until)
    WHERE status IN ('Pending', 'InProgress', 'Cancelling');
