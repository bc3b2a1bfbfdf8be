"""All SQL about the invalidation log (table cache_invalidations).

Readers must never skip an entry that commits later with a lower seq, so entries
commit in seq order: on PostgreSQL the append takes a transaction-scoped advisory
lock before it takes its seq, as the last statement of its transaction, so the lock
is held only for the commit; SQLite runs one write transaction at a time anyway.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.data.db import Database
from services.common.data.db.database import Statement

# Any constant works; it only has to be the same in every process (and differ from
# the migrations' lock).
_APPEND_LOCK_ID = 0x6468696E76616C


@dataclass(frozen=True, slots=True)
class LogEntry:
    seq: int
    patterns: tuple[str, ...]


class InvalidationLog:
    def __init__(self, db: Database) -> None:
        self._db = db

    def appending(self, patterns: Sequence[str], now: dt.datetime) -> list[Statement]:
        """The statements that append one entry, the last of its transaction (run by
        Executor.finish); the last one's row is the entry's seq."""
        lock = [("SELECT pg_advisory_xact_lock($1)", [_APPEND_LOCK_ID])] if self._db.dialect == "postgresql" else []
        insert = "INSERT INTO cache_invalidations (patterns, time) VALUES ($1, $2) RETURNING seq"
        return [*lock, (insert, [json.dumps(list(patterns)), now])]

    async def head(self) -> int:
        return int(await self._db.fetchval("SELECT COALESCE(MAX(seq), 0) FROM cache_invalidations"))

    async def oldest(self) -> int:
        return int(await self._db.fetchval("SELECT COALESCE(MIN(seq), 0) FROM cache_invalidations"))

    async def entries_after(self, seq: int, limit: int) -> list[LogEntry]:
        rows = await self._db.fetch(
            "SELECT seq, patterns FROM cache_invalidations WHERE seq > $1 ORDER BY seq LIMIT $2", seq, limit
        )
        return [LogEntry(int(row["seq"]), tuple(json.loads(row["patterns"]))) for row in rows]

    async def prune(self, older_than: dt.datetime) -> int:
        """Deletes the entries written before `older_than`, except the newest, which
        stays so the head survives pruning; returns how many it deleted."""
        return await self._db.execute(
            "DELETE FROM cache_invalidations WHERE time < $1"
            " AND seq < (SELECT MAX(seq) FROM cache_invalidations)",
            older_than,
        )
