CREATE INDEX usage_records_by_key ON usage_records(key_id);
CREATE INDEX holds_by_key ON holds(key_id, state);
