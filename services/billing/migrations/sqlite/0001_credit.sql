CREATE TABLE credit_accounts (
    account_id TEXT PRIMARY KEY,
    granted_nanos BIGINT NOT NULL DEFAULT 0,
    used_nanos BIGINT NOT NULL DEFAULT 0,
    held_nanos BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE grants (
    idempotency_key TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    amount_nanos BIGINT NOT NULL,
    reason TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- One per request: the most it may cost, held until settled or released.
CREATE TABLE holds (
    request_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    amount_nanos BIGINT NOT NULL,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

CREATE INDEX holds_by_expiry ON holds(state, expires_at);

CREATE TABLE usage_records (
    request_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cost_nanos BIGINT NOT NULL,
    latency_ms BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Events written in the same transaction as the fact they announce, then
-- published to NATS and deleted: nothing is announced that did not happen,
-- nothing that happened goes unannounced.
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL,
    dedupe_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at BIGINT NOT NULL
);
