-- API keys. Only the SHA-256 of a key is stored; the key itself is shown once.
CREATE TABLE api_keys (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    key_hash       TEXT NOT NULL,
    prefix         TEXT NOT NULL,
    scopes         TEXT NOT NULL,
    create_time    TEXT NOT NULL,
    expire_time    TEXT,
    revoke_time    TEXT,
    last_used_time TEXT
);
CREATE UNIQUE INDEX api_keys_key_hash ON api_keys (key_hash);
