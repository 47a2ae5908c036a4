-- Which replica holds a node's connection ('' for none): with several replicas on one database,
-- a node is Online when the replica named here is alive (its heartbeat within its lease), so
-- every replica shows the same ping status. Set at connect, cleared at disconnect by the same
-- replica; a replica that dies leaves it set, and its lapsed heartbeat makes the node offline.
ALTER TABLE nodes ADD COLUMN connected_to TEXT NOT NULL DEFAULT '';
