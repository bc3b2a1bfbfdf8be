"""All SQL about agents. Reads are single queries; batch writes are single statements.

Writes run in the transaction they are given (the use case's, see cache/log/outbox.py).
Agents come back as Agent messages, and the agents table's columns are the Agent's
fields (its etag is the revision): both are read from the proto's descriptor below, so
no second field list has to be kept in step with it.
"""

from __future__ import annotations

import builtins
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from devops_hub.v1 import agents_pb2

from services.common.data.db import Database
from services.common.data.db.database import Executor, Row, as_datetime

if TYPE_CHECKING:
    from services.common.contract.field_behavior import Field

Agent = agents_pb2.Agent

_FIELDS = Agent.DESCRIPTOR.fields
_TIMES = tuple(f.name for f in _FIELDS if f.message_type is not None and not f.is_repeated)
_NOT_PLAIN = ("etag", *_TIMES)
# The table's columns, each the field of its name (etag: revision), with their types
# for the bulk insert: enums as their names, lists and maps as JSON text.
_COLUMN_TYPES = tuple(
    ("revision", "bigint") if f.name == "etag" else (f.name, "timestamptz" if f.name in _TIMES else "text") for f in _FIELDS
)
_COLUMNS = ", ".join(name for name, _ in _COLUMN_TYPES)
_CAPABILITY_COLUMN_TYPES = (("agent_id", "text"), ("capability", "text"))
# A replace writes every column but the id and create_time (positions in _COLUMN_TYPES).
_REPLACED = tuple(i for i, (name, _) in enumerate(_COLUMN_TYPES) if name not in ("id", "create_time"))
_REPLACE = "UPDATE agents SET {} WHERE id = $1 AND revision = $2".format(
    ", ".join(f"{_COLUMN_TYPES[i][0]} = ${n}" for n, i in enumerate(_REPLACED, start=3))
)


@dataclass
class AgentFilter:
    """The AND of every filter that is set."""

    domain: str = ""
    status: int = 0
    type: int = 0
    capabilities: Sequence[str] = field(default_factory=tuple)

    def where(self, args: list) -> str:
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
        rows = await self.db.fetch(f"SELECT {_COLUMNS} FROM agents WHERE {where} ORDER BY id LIMIT ${len(args)}", *args)
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

    async def existing(self, ids: Sequence[str]) -> builtins.list[str]:
        placeholders = ", ".join(f"${i}" for i in range(1, len(ids) + 1))
        return [row["id"] for row in await self.db.fetch(f"SELECT id FROM agents WHERE id IN ({placeholders})", *ids)]

    async def insert(self, tx: Executor, agents: Sequence[Agent], now: dt.datetime) -> builtins.list[Agent]:
        """Inserts every agent or none (in the caller's transaction): one statement per
        table; UniqueViolation when an id is taken."""
        rows = [_to_row(agent, 1, now, now) for agent in agents]
        await self._bulk_insert(tx, "agents", _COLUMN_TYPES, rows)
        await self._insert_capabilities(tx, agents)
        return [_to_agent(dict(zip((c for c, _ in _COLUMN_TYPES), row))) for row in rows]

    async def replace(self, tx: Executor, agent: Agent, stored: Agent, now: dt.datetime) -> Agent | None:
        """Capability rows are rewritten only when the capabilities changed; the answer is
        the agent as written, not read back."""
        revision = int(stored.etag)
        values = _to_row(agent, revision + 1, None, now)
        if not await tx.execute(_REPLACE, agent.id, revision, *(values[i] for i in _REPLACED)):
            return None
        if agent.capabilities != stored.capabilities:
            await tx.execute("DELETE FROM agent_capabilities WHERE agent_id = $1", agent.id)
            await self._insert_capabilities(tx, [agent])
        agent.etag = str(revision + 1)
        agent.update_time.FromDatetime(now)
        return agent

    async def delete(self, tx: Executor, agent_id: str, expected_revision: int | None) -> bool:
        # agent_capabilities rows go with the agent (ON DELETE CASCADE).
        if expected_revision is None:
            return await tx.execute("DELETE FROM agents WHERE id = $1", agent_id) > 0
        return await tx.execute("DELETE FROM agents WHERE id = $1 AND revision = $2", agent_id, expected_revision) > 0

    async def _insert_capabilities(self, tx: Executor, agents: Sequence[Agent]) -> None:
        await self._bulk_insert(tx, "agent_capabilities", _CAPABILITY_COLUMN_TYPES, [(a.id, c) for a in agents for c in a.capabilities])

    async def _bulk_insert(self, tx: Executor, table: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            sql, args = self.db.bulk_insert(table, columns, rows)
            await tx.execute(sql, *args)


def _to_row(agent: Agent, revision: int, create_time: dt.datetime | None, update_time: dt.datetime) -> tuple[Any, ...]:
    """The agent's columns, in _COLUMN_TYPES' order."""
    given = {"etag": revision, "create_time": create_time, "update_time": update_time}
    return tuple(given[f.name] if f.name in given else _column(f, getattr(agent, f.name)) for f in _FIELDS)


def _column(f: Field, value: Any) -> Any:
    if f.enum_type is not None:
        return f.enum_type.values_by_number[value].name
    if f.is_repeated:
        return json.dumps(dict(value), sort_keys=True) if f.message_type is not None else json.dumps(list(value))
    return value


def _to_agent(row: Row) -> Agent:
    # Enums by name, lists and maps as their JSON: the constructor takes them as stored.
    agent = Agent(
        etag=str(row["revision"]),
        **{f.name: json.loads(row[f.name]) if f.is_repeated else row[f.name] for f in _FIELDS if f.name not in _NOT_PLAIN},
    )
    for name in _TIMES:
        getattr(agent, name).FromDatetime(as_datetime(row[name]))
    return agent
