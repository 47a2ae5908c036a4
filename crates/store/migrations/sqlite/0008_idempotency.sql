-- Idempotency keys of sends (native `Idempotency-Key` header; SSM `amz-sdk-invocation-id`): a retry
-- with the same key answers the command it made instead of making another. Scoped per principal
-- (the user); `idempotency_key` is prefixed with the API (`native:` / `ssm:`), and
-- `idempotency_hash` is the SHA-256 of the request, to refuse a reuse with another body. Keys live
-- as long as their command's row: retention purges both.
ALTER TABLE commands ADD COLUMN idempotency_principal TEXT;
ALTER TABLE commands ADD COLUMN idempotency_key TEXT;
ALTER TABLE commands ADD COLUMN idempotency_hash TEXT;
CREATE UNIQUE INDEX commands_idempotency ON commands (idempotency_principal, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
