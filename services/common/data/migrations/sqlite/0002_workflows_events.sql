-- Workflows, their executions, and the event log.
-- A workflow's definition (steps, timeout) is its proto in JSON; an execution keeps
-- the definition it started with, so editing a workflow never changes a running one.
CREATE TABLE workflows (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    definition  TEXT NOT NULL,
    revision    INTEGER NOT NULL DEFAULT 1,
    create_time TEXT NOT NULL,
    update_time TEXT NOT NULL
);
-- owner and lease_expires_at: the process running an execution renews its lease;
-- an execution whose lease ran out was left by a process that died, and is failed.
CREATE TABLE workflow_executions (
    id               TEXT PRIMARY KEY,
    workflow_id      TEXT NOT NULL,
    status           TEXT NOT NULL,
    input            TEXT NOT NULL DEFAULT '{}',
    output           TEXT NOT NULL DEFAULT '{}',
    error            TEXT NOT NULL DEFAULT '',
    steps            TEXT NOT NULL DEFAULT '[]',
    definition       TEXT NOT NULL,
    idempotency_key  TEXT,
    owner            TEXT NOT NULL DEFAULT '',
    lease_expires_at TEXT,
    create_time      TEXT NOT NULL,
    start_time       TEXT,
    end_time         TEXT
);
CREATE INDEX workflow_executions_workflow ON workflow_executions (workflow_id, create_time DESC);
CREATE INDEX workflow_executions_status ON workflow_executions (status);
CREATE UNIQUE INDEX workflow_executions_idempotency ON workflow_executions (workflow_id, idempotency_key);
CREATE TABLE events (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    type           TEXT NOT NULL,
    source         TEXT NOT NULL,
    subject        TEXT NOT NULL DEFAULT '',
    data           TEXT NOT NULL DEFAULT '{}',
    correlation_id TEXT NOT NULL DEFAULT '',
    time           TEXT NOT NULL
);
CREATE INDEX events_time ON events (time DESC);
CREATE INDEX events_type ON events (type);
CREATE INDEX events_correlation ON events (correlation_id, id);
