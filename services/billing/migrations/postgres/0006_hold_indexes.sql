-- A settlement changes a hold's state; indexes that include the state are
-- rewritten with it. Open holds are found at start-up through a partial
-- index (small: only open holds), a key's holds by key alone.
DROP INDEX holds_by_expiry;
DROP INDEX holds_by_key;
CREATE INDEX holds_by_key ON holds(key_id);
CREATE INDEX holds_open ON holds(request_id) WHERE state = 'held';
