CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    is_free_tier BOOLEAN NOT NULL DEFAULT TRUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    -- sha256 of the full key, hex; the key itself is never stored.
    key_hash TEXT NOT NULL UNIQUE,
    limit_nanos BIGINT,
    disabled BOOLEAN NOT NULL DEFAULT FALSE,
    revoked_at BIGINT,
    expires_at BIGINT,
    requests_per_minute INTEGER,
    tokens_per_minute INTEGER,
    created_at BIGINT NOT NULL
);

CREATE INDEX api_keys_by_account ON api_keys(account_id);
