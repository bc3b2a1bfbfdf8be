"""All SQL about agents. Reads are single queries; batch writes are single statements.

Writes run in the transaction they are given (the use case's, see cache/log/outbox.py).
Agents come back as Agent messages: the proto is the domain model, so no second
field list has to be kept in step with it.
"""

from __future__ import annotations

import builtins
import datetime as dt
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from devops_hub.v1 import agents_pb2

from services.common.db import Database, UniqueViolation
from services.common.db.database import Executor, Row, as_datetime
from services.common.errors import AlreadyExists

Agent = agents_pb2.Agent

_COLUMNS = (
    "id, name, version, description, domain, type, status, capabilities, metadata, endpoint,"
    " revision, create_time, update_time"
)
_AGENT_COLUMN_TYPES = (
    ("id", "text"),
    ("name", "text"),
    ("version", "text"),
    ("description", "text"),
    ("domain", "text"),
    ("type", "text"),
    ("status", "text"),
    ("capabilities", "text"),
    ("metadata", "text"),
    ("endpoint", "text"),
    ("revision", "bigint"),
    ("create_time", "timestamptz"),
    ("update_time", "timestamptz"),
)
_CAPABILITY_COLUMN_TYPES = (("agent_id", "text"), ("capability", "text"))


@dataclass
class AgentFilter:
    """The AND of every filter that is set."""

    domain: str = ""
    status: int = 0
    type: int = 0
    capabilities: Sequence[str] = field(default_factory=tuple)

    def where(self, args: list) -> str:
        """A WHERE clause for these filters; appends its arguments to `args`."""
        clauses = []
        if self.domain:
            args.append(self.domain)
            clauses.append(f"domain = ${len(args)}")
        if self.status:
            args.append(Agent.Status.Name(self.status))
            clauses.append(f"status = ${len(args)}")
        if self.type:
            args.append(Agent.Type.Name(self.type))
            clauses.append(f"type = ${len(args)}")
        for capability in dict.fromkeys(self.capabilities):
            args.append(capability)
            clauses.append(f"id IN (SELECT agent_id FROM agent_capabilities WHERE capability = ${len(args)})")
        return " AND ".join(clauses) if clauses else "TRUE"


@dataclass
class Facets:
    total: int
    counts: dict[str, dict[str, int]]


def etag_of(revision: int) -> str:
    return str(revision)


class AgentRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, agent_id: str) -> Agent | None:
        row = await self.db.fetchrow(f"SELECT {_COLUMNS} FROM agents WHERE id = $1", agent_id)
        return None if row is None else _to_agent(row)

    async def list(self, filters: AgentFilter, after_id: str | None, limit: int) -> list[Agent]:
        """Agents in id order after `after_id` (keyset pagination: no OFFSET scans)."""
        args: list = []
        where = filters.where(args)
        if after_id is not None:
            args.append(after_id)
            where += f" AND id > ${len(args)}"
        args.append(limit)
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM agents WHERE {where} ORDER BY id LIMIT ${len(args)}", *args
        )
        return [_to_agent(row) for row in rows]

    async def facets(self, filters: AgentFilter) -> Facets:
        """Counts of the matching agents per domain, status, type and capability: one query."""
        args: list = []
        where = filters.where(args)
        rows = await self.db.fetch(
            f"""
            WITH matched AS (SELECT id, domain, status, type FROM agents WHERE {where})
            SELECT 'total' AS facet, '' AS value, COUNT(*) AS n FROM matched
            UNION ALL SELECT 'domain', domain, COUNT(*) FROM matched GROUP BY domain
            UNION ALL SELECT 'status', status, COUNT(*) FROM matched GROUP BY status
            UNION ALL SELECT 'type', type, COUNT(*) FROM matched GROUP BY type
            UNION ALL SELECT 'capability', c.capability, COUNT(*)
                FROM agent_capabilities c JOIN matched m ON m.id = c.agent_id GROUP BY c.capability
            """,
            *args,
        )
        counts: dict[str, dict[str, int]] = {"domain": {}, "status": {}, "type": {}, "capability": {}}
        total = 0
        for row in rows:
            if row["facet"] == "total":
                total = int(row["n"])
            else:
                counts[row["facet"]][row["value"]] = int(row["n"])
        return Facets(total=total, counts=counts)

    async def insert(self, tx: Executor, agents: Sequence[Agent], now: dt.datetime) -> builtins.list[Agent]:
        """Inserts every agent or none (in the caller's transaction): one statement per table."""
        rows = [_to_row(agent, now) for agent in agents]
        capability_rows = [(agent.id, capability) for agent in agents for capability in agent.capabilities]
        try:
            await _refuse_existing(tx, [agent.id for agent in agents])
            await self._bulk_insert(tx, "agents", _AGENT_COLUMN_TYPES, rows)
            await self._bulk_insert(tx, "agent_capabilities", _CAPABILITY_COLUMN_TYPES, capability_rows)
        except UniqueViolation:
            # Lost a race with a concurrent create of the same id.
            raise AlreadyExists("an agent with one of these ids was created concurrently", reason="AGENT_EXISTS") from None
        return [_to_agent(dict(zip((c for c, _ in _AGENT_COLUMN_TYPES), row))) for row in rows]

    async def update(
        self,
        tx: Executor,
        agent_id: str,
        changes: Agent,
        fields: Sequence[str],
        expected_revision: int | None,
        now: dt.datetime,
    ) -> Agent | None:
        """Writes `fields` of `changes` if the revision still matches.

        Returns the updated agent, or None when no row matched: the caller tells a
        missing agent from a stale etag.
        """
        args: list = [agent_id, now]
        sets = ["revision = revision + 1", "update_time = $2"]
        for name in fields:
            args.append(_WRITABLE_COLUMNS[name](changes))
            sets.append(f"{name} = ${len(args)}")
        where = "id = $1"
        if expected_revision is not None:
            args.append(expected_revision)
            where += f" AND revision = ${len(args)}"
        row = await tx.fetchrow(f"UPDATE agents SET {', '.join(sets)} WHERE {where} RETURNING {_COLUMNS}", *args)
        if row is None:
            return None
        if "capabilities" in fields:
            await tx.execute("DELETE FROM agent_capabilities WHERE agent_id = $1", agent_id)
            capability_rows = [(agent_id, capability) for capability in changes.capabilities]
            await self._bulk_insert(tx, "agent_capabilities", _CAPABILITY_COLUMN_TYPES, capability_rows)
        return _to_agent(row)

    async def delete(self, tx: Executor, agent_id: str, expected_revision: int | None) -> bool:
        # agent_capabilities rows go with the agent (ON DELETE CASCADE).
        if expected_revision is None:
            return await tx.execute("DELETE FROM agents WHERE id = $1", agent_id) > 0
        return await tx.execute("DELETE FROM agents WHERE id = $1 AND revision = $2", agent_id, expected_revision) > 0

    async def _bulk_insert(self, tx: Executor, table: str, columns, rows: Sequence[Sequence]) -> None:
        if rows:
            sql, args = self.db.bulk_insert(table, columns, rows)
            await tx.execute(sql, *args)

    async def exists(self, agent_id: str) -> bool:
        return bool(await self.db.fetchval("SELECT 1 FROM agents WHERE id = $1", agent_id))


async def _refuse_existing(tx: Executor, ids: list[str]) -> None:
    placeholders = ", ".join(f"${i}" for i in range(1, len(ids) + 1))
    rows = await tx.fetch(f"SELECT id FROM agents WHERE id IN ({placeholders})", *ids)
    if rows:
        taken = sorted(row["id"] for row in rows)
        shown = ", ".join(taken[:10]) + (f" and {len(taken) - 10} more" if len(taken) > 10 else "")
        raise AlreadyExists(
            f"agent id already exists: {shown}",
            reason="AGENT_EXISTS",
            metadata={"ids": ",".join(taken[:100])},
        )


# Each column an agent's fields fill, as stored: an update computes only those it sets.
_WRITABLE_COLUMNS: dict[str, Callable[[Agent], Any]] = {
    "name": lambda agent: agent.name,
    "version": lambda agent: agent.version,
    "description": lambda agent: agent.description,
    "domain": lambda agent: agent.domain,
    "type": lambda agent: Agent.Type.Name(agent.type),
    "status": lambda agent: Agent.Status.Name(agent.status),
    "capabilities": lambda agent: json.dumps(list(agent.capabilities)),
    "metadata": lambda agent: json.dumps(dict(agent.metadata), sort_keys=True),
    "endpoint": lambda agent: agent.endpoint,
}


def _to_row(agent: Agent, now: dt.datetime) -> tuple:
    """Values in _AGENT_COLUMN_TYPES' order: id, the writable columns, revision 1, create and update time."""
    return (agent.id, *(column(agent) for column in _WRITABLE_COLUMNS.values()), 1, now, now)


def _to_agent(row: Row) -> Agent:
    agent = Agent(
        id=row["id"],
        name=row["name"],
        version=row["version"],
        description=row["description"],
        domain=row["domain"],
        type=row["type"],
        status=row["status"],
        capabilities=json.loads(row["capabilities"]),
        metadata=json.loads(row["metadata"]),
        endpoint=row["endpoint"],
        etag=etag_of(row["revision"]),
    )
    agent.create_time.FromDatetime(as_datetime(row["create_time"]))
    agent.update_time.FromDatetime(as_datetime(row["update_time"]))
    return agent
