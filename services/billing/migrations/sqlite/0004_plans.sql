-- Tokens of a request that its plan's monthly allowance covers.
ALTER TABLE holds ADD COLUMN covered_tokens BIGINT NOT NULL DEFAULT 0;

-- An account's plan (empty: the default plan) and how many of the tokens it
-- includes were used in `month` (year * 100 + month, UTC).
CREATE TABLE account_plans (
    account_id TEXT PRIMARY KEY,
    plan_id TEXT NOT NULL,
    month BIGINT NOT NULL,
    tokens_used BIGINT NOT NULL
);
