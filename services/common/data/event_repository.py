"""All SQL about the events table: appends, pages, the live feed's reads, pruning.

The agents and workflows services write events (agents and workflow definitions in their writes' own
transactions, the workflow engine in batches), and the workflows service reads them;
they all go through this one repository.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from devops_hub.v1 import events_pb2
from google.protobuf import json_format

from services.common.data.db import Database
from services.common.data.db.database import Executor, Row, Statement, as_datetime
from services.common.foundation.clock import utc_now

Event = events_pb2.Event

_COLUMNS = (
    ("type", "text"),
    ("source", "text"),
    ("subject", "text"),
    ("data", "text"),
    ("correlation_id", "text"),
    ("time", "timestamptz"),
)
_SELECT = "SELECT id, type, source, subject, data, correlation_id, time FROM events"
# Pruning deletes this many rows a statement, so it never holds a long lock.
_PRUNE_BATCH = 5000


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append; the table gives it its id."""

    type: str
    source: str
    subject: str = ""
    data: dict[str, Any] | None = None
    correlation_id: str = ""
    time: dt.datetime | None = None

    def row(self) -> tuple[Any, ...]:
        return (
            self.type,
            self.source,
            self.subject,
            json.dumps(self.data or {}),
            self.correlation_id,
            self.time or utc_now(),
        )


@dataclass(frozen=True, slots=True)
class EventFilter:
    """ListEvents' filters; the AND of those that are set."""

    type: str = ""
    source: str = ""
    correlation_id: str = ""
    since: dt.datetime | None = None


class EventRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert(self, executor: Executor, events: Sequence[NewEvent]) -> list[int]:
        """One statement on `executor` (a transaction, or the pool); the ids in order."""
        if not events:
            return []
        sql, args = self._db.bulk_insert("events", _COLUMNS, [event.row() for event in events])
        rows = await executor.fetch(sql + " RETURNING id", *args)
        return sorted(int(row["id"]) for row in rows)

    def appending(self, events: Sequence[NewEvent]) -> list[Statement]:
        """The statements that append `events` for a caller that needs no ids (a write's
        own events, run with the rest of its transaction's end: Executor.finish)."""
        return [self._db.bulk_insert("events", _COLUMNS, [event.row() for event in events])] if events else []

    async def page(self, filters: EventFilter, before_id: int | None, limit: int) -> list[Event]:
        """Newest first, ids below `before_id` (the previous page's last)."""
        clauses, args = [], []
        for name in ("type", "source", "correlation_id"):
            if getattr(filters, name):
                args.append(getattr(filters, name))
                clauses.append(f"{name} = ${len(args)}")
        if filters.since is not None:
            args.append(filters.since)
            clauses.append(f"time >= ${len(args)}")
        if before_id is not None:
            args.append(before_id)
            clauses.append(f"id < ${len(args)}")
        args.append(limit)
        where = " AND ".join(clauses) or "TRUE"
        rows = await self._db.fetch(f"{_SELECT} WHERE {where} ORDER BY id DESC LIMIT ${len(args)}", *args)
        return [_to_event(row) for row in rows]

    async def between(self, after_id: int, through_id: int, matching: Mapping[str, str], limit: int) -> list[Event]:
        """The events with ids in (after_id, through_id] whose fields equal `matching`
        (exact matches on columns of the events table), oldest first."""
        clauses = [f"{name} = ${i}" for i, name in enumerate(matching, start=3)]
        where = " AND ".join(["id > $1", "id <= $2", *clauses])
        rows = await self._db.fetch(
            f"{_SELECT} WHERE {where} ORDER BY id LIMIT {int(limit)}", after_id, through_id, *matching.values()
        )
        return [_to_event(row) for row in rows]

    async def after(self, after_id: int, limit: int) -> list[Event]:
        rows = await self._db.fetch(f"{_SELECT} WHERE id > $1 ORDER BY id LIMIT {int(limit)}", after_id)
        return [_to_event(row) for row in rows]

    async def newest_id(self) -> int:
        return int(await self._db.fetchval("SELECT COALESCE(MAX(id), 0) FROM events"))

    async def prune(self, keep: int) -> int:
        """Ids only grow, so "older than the newest `keep`" is a range, deleted in batches
        with requests let through in between."""
        cutoff = await self.newest_id() - keep
        deleted = 0
        while cutoff > 0:
            n = await self._db.execute(
                f"DELETE FROM events WHERE id IN (SELECT id FROM events WHERE id <= $1 ORDER BY id LIMIT {_PRUNE_BATCH})",
                cutoff,
            )
            deleted += n
            if n < _PRUNE_BATCH:
                break
            await asyncio.sleep(0)
        return deleted


def _to_event(row: Row) -> Event:
    event = Event(
        id=str(row["id"]),
        type=row["type"],
        source=row["source"],
        subject=row["subject"],
        correlation_id=row["correlation_id"],
    )
    json_format.ParseDict(json.loads(row["data"]), event.data)
    event.time.FromDatetime(as_datetime(row["time"]))
    return event
