-- The retention purge finds ended sessions by their end time: an index, so it never scans the table.
CREATE INDEX sessions_ended ON sessions (ended_at) WHERE ended_at IS NOT NULL;
