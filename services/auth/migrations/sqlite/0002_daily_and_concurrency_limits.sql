-- Per-key overrides of the tier's daily token budget and in-flight requests.
ALTER TABLE api_keys ADD COLUMN tokens_per_day BIGINT;
ALTER TABLE api_keys ADD COLUMN max_concurrent BIGINT;
