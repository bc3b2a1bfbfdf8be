-- The answers of calls that carried a request_id (AIP-155), so that a retry gets the
-- first answer back instead of writing again. A row is inserted as the first
-- statement of the write's own transaction (a second request with the key waits on
-- it, then finds it) and holds the answer when that transaction commits.
-- Scoped per caller (the hash of the key presented) and per method; kept for
-- IDEMPOTENCY_RETENTION, then pruned.
CREATE TABLE idempotency_keys (
    caller      TEXT NOT NULL,
    method      TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    response    BYTEA,
    create_time TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (caller, method, request_id)
);
CREATE INDEX idempotency_keys_time ON idempotency_keys (create_time);
-- ExecuteWorkflow's idempotency_key is answered from idempotency_keys now (per caller,
-- for IDEMPOTENCY_RETENTION); the column stays, to show on the execution.
DROP INDEX workflow_executions_idempotency;
