-- Every job the queue accepted, until its result expires. `status` is
-- infermesh.v1.JobStatus; `announce` marks a completion or dead letter
-- whose event NATS has not acknowledged yet (the outbox).
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    body BYTEA NOT NULL,
    status INTEGER NOT NULL,
    result BYTEA NOT NULL,
    error BYTEA NOT NULL,
    retries INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    max_concurrent INTEGER NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    run_after BIGINT NOT NULL,
    announce INTEGER NOT NULL
);
CREATE INDEX jobs_by_status ON jobs (status, updated_at);
CREATE INDEX jobs_to_announce ON jobs (announce) WHERE announce = 1;
