-- Deregistered nodes keep their row (and their invocations' history) but are gone from listings,
-- targets and the agent channel.
ALTER TABLE nodes ADD COLUMN deregistered_at INTEGER;
