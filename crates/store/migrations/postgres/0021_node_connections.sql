-- Which replica holds a node's connection ('' for none); sqlite/0021_node_connections.sql says why.
ALTER TABLE nodes ADD COLUMN connected_to TEXT COLLATE "C" NOT NULL DEFAULT '';
