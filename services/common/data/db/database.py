"""One interface over PostgreSQL (asyncpg pool) and SQLite (aiosqlite, WAL).

Repositories write their SQL once, in PostgreSQL's `$1` placeholder style; the
SQLite engine rewrites `$n` to SQLite's own `?n`, which binds the same way. Rows
come back as mappings (asyncpg.Record or sqlite3.Row) read by column name.
What truly differs between the engines (bulk inserts) is asked of `dialect`.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace

from services.common.data.outages import Outages
from services.common.telemetry.metrics import PoolMetrics, PoolStats

# An sqlite3.Row or an asyncpg.Record: both read by column name and by position.
Row = Any
# A statement to run later: its SQL and its arguments.
Statement = tuple[str, Sequence[Any]]


def as_datetime(value: dt.datetime | str) -> dt.datetime:
    """A timestamp column's value: asyncpg returns datetimes, SQLite keeps ISO-8601 text."""
    return value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value)


class UniqueViolation(Exception):
    """A unique constraint refused a write; repositories turn it into ALREADY_EXISTS."""


class Executor(abc.ABC):
    """What a repository can do, on the pool or inside one transaction."""

    @abc.abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    @abc.abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Runs a statement and returns the number of rows it changed."""

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return None if row is None else row[0]

    async def finish(self, statements: Sequence[Statement]) -> list[list[Row]]:
        """A transaction's last statements, in order; each one's rows. Nothing may follow
        them: an engine may commit with them (SQLite does, in one trip to its thread)."""
        return [await self.fetch(sql, *args) for sql, args in statements]


class Database(Executor):
    dialect: str
    #: Statements sent so far; tests read it to prove a read is one query, not N+1.
    query_count: int
    #: Whether this database is up, as its statements have found (outages.py).
    outages: Outages
    tracer: trace.Tracer | None

    def __init__(self, pools: PoolMetrics | None, outages: Outages, tracer: trace.Tracer | None) -> None:
        self.outages = outages
        self.tracer = tracer
        self.query_count = 0
        self._pools = pools
        if pools is not None:
            pools.track(self)

    def _untrack(self) -> None:
        if self._pools is not None:
            self._pools.untrack(self)

    @abc.abstractmethod
    def pool_stats(self) -> PoolStats: ...

    @abc.abstractmethod
    def transaction(self) -> Any:
        """An async context manager yielding an Executor bound to one transaction."""

    @abc.abstractmethod
    def bulk_insert(self, table: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]) -> tuple[str, list[Any]]:
        """One INSERT for many rows, whatever their number; `columns` are (name, postgres type)."""

    @abc.abstractmethod
    async def close(self) -> None: ...


async def connect(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int = 20,
    pools: PoolMetrics | None = None,
    outages: Outages | None = None,
    tracer: trace.Tracer | None = None,
) -> Database:
    """A short-lived connection (migrations, `make key`) joins no `pools` and has no `tracer`."""
    outages = Outages() if outages is None else outages
    if url.startswith(("postgresql://", "postgres://")):
        from services.common.data.db.postgres import PostgresDatabase

        return await PostgresDatabase.open(
            url, min_size=pool_size, max_size=pool_size + max_overflow, pools=pools, outages=outages, tracer=tracer
        )
    if url.startswith("sqlite://"):
        from services.common.data.db.sqlite import SqliteDatabase

        return await SqliteDatabase.open(url, readers=max(1, min(pool_size, 8)), pools=pools, outages=outages, tracer=tracer)
    raise ValueError(f"DATABASE_URL must start with postgresql:// or sqlite://, got {url.split('://')[0]!r}")
