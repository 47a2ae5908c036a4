-- A saved script's input and output, recorded with the run (a later version or a deletion of the
-- script does not change what a running command does).
ALTER TABLE script_runs ADD COLUMN input_uri TEXT;
ALTER TABLE script_runs ADD COLUMN output_path TEXT;

-- Per node of a script run with files: the private temp dir made on the node and how far the
-- node got, so the dir is removed whatever the outcome, after a server restart too.
-- phase: 'made' (the dir exists on the node), 'removed' (cleaned up).
CREATE TABLE script_run_nodes (
    command_id TEXT NOT NULL REFERENCES commands (command_id) ON DELETE CASCADE,
    node_id    TEXT NOT NULL,
    dir        TEXT NOT NULL,
    phase      TEXT NOT NULL,
    PRIMARY KEY (command_id, node_id)
);
CREATE INDEX script_run_nodes_phase ON script_run_nodes (phase);
