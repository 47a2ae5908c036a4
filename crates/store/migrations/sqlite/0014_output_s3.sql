-- SSM's output to S3 (issue 12): a command may ask for each invocation's stdout and stderr to be
-- written to a bucket (OutputS3BucketName, OutputS3KeyPrefix, OutputS3Region), under
-- PREFIX/COMMAND/NODE/PLUGIN_DIR/stdout, PLUGIN_DIR being SSM's `awsrunShellScript/0.awsrunShellScript`
-- (schema 1.2) or `awsrunShellScript/STEP` (schema 2.2).
ALTER TABLE commands ADD COLUMN output_s3_bucket TEXT NOT NULL DEFAULT '';
ALTER TABLE commands ADD COLUMN output_s3_prefix TEXT NOT NULL DEFAULT '';
ALTER TABLE commands ADD COLUMN output_s3_region TEXT NOT NULL DEFAULT '';
ALTER TABLE commands ADD COLUMN output_s3_plugin_dir TEXT NOT NULL DEFAULT '';

-- The durable export queue: a row per ended invocation of such a command, written in the same
-- transaction as its end, deleted only once both pipes are in the bucket.
CREATE TABLE s3_exports (
    command_id      TEXT NOT NULL,
    node_id         TEXT NOT NULL,
    queued_at       INTEGER NOT NULL,          -- epoch ms
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,          -- epoch ms
    last_error      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (command_id, node_id)
);
CREATE INDEX s3_exports_due ON s3_exports (next_attempt_at);
