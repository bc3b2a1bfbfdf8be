"""PostgreSQL through an asyncpg pool: DATABASE_POOL_SIZE connections, growing to
DATABASE_POOL_SIZE + DATABASE_MAX_OVERFLOW under load."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from opentelemetry import trace

from services.common.contract.errors import CommitOutcomeUnknown
from services.common.data.db.database import Database, Executor, Row, UniqueViolation
from services.common.data.outages import Outages, is_database_outage
from services.common.foundation.dependencies import postgres_unavailable
from services.common.telemetry import tracing
from services.common.telemetry.metrics import PoolMetrics, PoolStats


class _PoolRefillNoise(logging.Filter):
    """asyncpg logs a traceback each time it fails to refill the pool, several a
    second while the server is away; the outage has its one line (services.common.data.outages)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to restore the pool connection floor")


logging.getLogger("asyncpg.pool").addFilter(_PoolRefillNoise())


class _PgExecutor(Executor):
    def __init__(self, conn: asyncpg.Connection, owner: PostgresDatabase) -> None:
        self._conn = conn
        self._owner = owner

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return await self._run(self._conn.fetch, sql, args)  # type: ignore[no-any-return]

    async def execute(self, sql: str, *args: Any) -> int:
        return _rows_changed(await self._run(self._conn.execute, sql, args))

    async def _run(self, call: Callable[..., Awaitable[Any]], sql: str, args: Sequence[Any]) -> Any:
        self._owner.query_count += 1
        try:
            with tracing.db_span(self._owner.tracer, "postgresql", sql):
                return await call(sql, *args)
        except asyncpg.UniqueViolationError as exc:
            raise UniqueViolation(str(exc)) from exc


class PostgresDatabase(Database):
    dialect = "postgresql"

    def __init__(
        self,
        pool: asyncpg.Pool,
        pools: PoolMetrics | None,
        outages: Outages,
        tracer: trace.Tracer | None,
    ) -> None:
        super().__init__(pools, outages, tracer)
        self._pool = pool
        # Callers inside acquire(): asyncpg does not count the ones waiting for a connection.
        self._acquiring = 0

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        min_size: int,
        max_size: int,
        pools: PoolMetrics | None,
        outages: Outages,
        tracer: trace.Tracer | None,
    ) -> PostgresDatabase:
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                command_timeout=30,
                # Statements are prepared once per connection and reused.
                statement_cache_size=256,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise postgres_unavailable(url, exc) from exc
        return cls(pool, pools, outages, tracer)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with _Connection(self) as conn:
            return await _PgExecutor(conn, self).fetch(sql, *args)

    async def execute(self, sql: str, *args: Any) -> int:
        async with _Connection(self) as conn:
            return await _PgExecutor(conn, self).execute(sql, *args)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        async with _Connection(self) as conn:
            committing = False
            try:
                async with conn.transaction():
                    yield _PgExecutor(conn, self)
                    committing = True
            except Exception as exc:
                # The server may have committed before the connection went: nobody knows.
                if committing and _connection_lost(conn, exc):
                    raise CommitOutcomeUnknown(
                        "the database connection was lost during COMMIT, so the write may or may not have been"
                        " applied: read before retrying, or retry with a request_id (Idempotency-Key), which is safe"
                    ) from exc
                raise

    def bulk_insert(self, table: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]) -> tuple[str, list[Any]]:
        # One array argument per column and unnest(): a single statement with a
        # fixed number of parameters, however many rows.
        names = ", ".join(name for name, _ in columns)
        arrays = ", ".join(f"${i}::{kind}[]" for i, (_, kind) in enumerate(columns, start=1))
        args = [[row[i] for row in rows] for i in range(len(columns))]
        return f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays})", args

    def pool_stats(self) -> PoolStats:
        size = self._pool.get_size()
        return PoolStats(
            size=size,
            max=self._pool.get_max_size(),
            in_use=size - self._pool.get_idle_size(),
            # Only a caller that found no free connection is still inside acquire()
            # when anything else gets to run and look.
            waiters=self._acquiring,
        )

    async def close(self) -> None:
        self._untrack()
        await self._pool.close()


class _Connection:
    """pool.acquire() as a context manager that counts the callers inside it."""

    __slots__ = ("_db", "_conn")

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db
        self._conn: Any = None  # the pool's proxy for the connection, while it is held

    async def __aenter__(self) -> Any:
        db = self._db
        db._acquiring += 1
        try:
            self._conn = await db._pool.acquire()
        except Exception as exc:
            # No connection to be had, whatever the reason the server gives: refused,
            # shutting down, not accepting connections, too many clients.
            raise db.outages.database.failed(exc) from exc
        finally:
            db._acquiring -= 1
        return self._conn

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        # Whatever the statements inside raised passes here: a lost server becomes
        # UNAVAILABLE (and one log line per outage), a success ends an outage; a commit
        # whose outcome is unknown stays that (and counts as the outage it is).
        lost = isinstance(exc, Exception) and _connection_lost(self._conn, exc)
        try:
            await self._db._pool.release(self._conn)
        except Exception as release_failure:  # resetting a connection the server ended
            exc, lost = exc or release_failure, True
        if exc is None:
            self._db.outages.database.succeeded()
        elif lost:
            unavailable = self._db.outages.database.failed(exc)
            if not isinstance(exc, CommitOutcomeUnknown):
                raise unavailable from exc


def _connection_lost(conn: Any, exc: BaseException) -> bool:
    """A connection the server ended fails in odd ways too (InternalClientError:
    "another operation is in progress"): what matters is that it is gone."""
    return (
        is_database_outage(exc, raised_by_database=True)
        or isinstance(exc, (asyncpg.exceptions.InternalClientError, CommitOutcomeUnknown))
        or conn.is_closed()
    )


def _rows_changed(status: str) -> int:
    # asyncpg returns the command tag, e.g. "UPDATE 3" or "INSERT 0 5".
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0

