-- Double entry: every movement of money is a set of rows that sum to zero
-- (see src/book.rs); credit_accounts caches what the entries add up to.
CREATE TABLE entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    movement TEXT NOT NULL,
    book TEXT NOT NULL,
    amount_nanos BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX entries_by_book ON entries(book);

-- Opening entries for balances recorded before the entries existed.
INSERT INTO entries (movement, book, amount_nanos, created_at)
    SELECT 'opening:' || account_id, 'grants', -granted_nanos, 0 FROM credit_accounts WHERE granted_nanos <> 0;
INSERT INTO entries (movement, book, amount_nanos, created_at)
    SELECT 'opening:' || account_id, 'customer:' || account_id, granted_nanos - used_nanos - held_nanos, 0
    FROM credit_accounts WHERE granted_nanos - used_nanos - held_nanos <> 0;
INSERT INTO entries (movement, book, amount_nanos, created_at)
    SELECT 'opening:' || account_id, 'holds:' || account_id, held_nanos, 0 FROM credit_accounts WHERE held_nanos <> 0;
INSERT INTO entries (movement, book, amount_nanos, created_at)
    SELECT 'opening:' || account_id, 'revenue', used_nanos, 0 FROM credit_accounts WHERE used_nanos <> 0;
