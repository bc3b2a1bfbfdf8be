-- Agents and their capabilities.
-- capabilities and metadata are kept as JSON on the agent row so that reading agents
-- is one single-table query; agent_capabilities is the index that filters by
-- capability. The repository writes both in one transaction.
CREATE TABLE agents (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    version     TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    domain      TEXT NOT NULL,
    type        TEXT NOT NULL,
    status      TEXT NOT NULL,
    capabilities TEXT NOT NULL DEFAULT '[]',
    metadata    TEXT NOT NULL DEFAULT '{}',
    endpoint    TEXT NOT NULL DEFAULT '',
    revision    INTEGER NOT NULL DEFAULT 1,
    create_time TEXT NOT NULL,
    update_time TEXT NOT NULL
);
CREATE INDEX agents_domain ON agents (domain);
CREATE INDEX agents_status ON agents (status);
CREATE TABLE agent_capabilities (
    agent_id   TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    capability TEXT NOT NULL,
    PRIMARY KEY (agent_id, capability)
);
CREATE INDEX agent_capabilities_capability ON agent_capabilities (capability, agent_id);
