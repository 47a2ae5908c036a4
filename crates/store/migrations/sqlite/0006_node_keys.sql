-- Protocol version 2: nodes authenticate with an Ed25519 key pair over a per-connection challenge
-- instead of a shared secret. The server keeps only public keys (hex). During a rotation the key the
-- agent authenticated with stays accepted as `previous_public_key` until the agent proves the new
-- one. Nodes registered with a secret have no key and must register again.
ALTER TABLE nodes ADD COLUMN public_key TEXT;
ALTER TABLE nodes ADD COLUMN previous_public_key TEXT;
ALTER TABLE nodes ADD COLUMN key_rotated_at INTEGER;
ALTER TABLE nodes DROP COLUMN secret_hash;
