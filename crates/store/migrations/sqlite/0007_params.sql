-- The parameter store: values scripts reference as {{param:NAME}}. A plain parameter keeps its value
-- in `value`; a secure one keeps '' there and its value sealed (XChaCha20-Poly1305, the server's
-- secrets key) in `sealed` with its `nonce`.
CREATE TABLE params (
    name       TEXT PRIMARY KEY,
    secure     INTEGER NOT NULL,      -- 0 or 1
    value      TEXT NOT NULL,         -- '' when secure
    nonce      BLOB,                  -- secure only
    sealed     BLOB,                  -- secure only
    version    INTEGER NOT NULL,      -- 1, 2, ... one more per put
    updated_at INTEGER NOT NULL,      -- epoch ms
    updated_by TEXT NOT NULL          -- principal
);
