"""PostgreSQL through an asyncpg pool.

The pool holds DATABASE_POOL_SIZE connections open and grows to
DATABASE_POOL_SIZE + DATABASE_MAX_OVERFLOW under load.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from services.common.db.database import Database, Executor, Row, UniqueViolation


class _PgExecutor(Executor):
    def __init__(self, conn: asyncpg.Connection, owner: "PostgresDatabase") -> None:
        self._conn = conn
        self._owner = owner

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        self._owner.query_count += 1
        try:
            return await self._conn.fetch(sql, *args)
        except asyncpg.UniqueViolationError as exc:
            raise UniqueViolation(str(exc)) from exc

    async def execute(self, sql: str, *args: Any) -> int:
        self._owner.query_count += 1
        try:
            status = await self._conn.execute(sql, *args)
        except asyncpg.UniqueViolationError as exc:
            raise UniqueViolation(str(exc)) from exc
        return _rows_changed(status)


class PostgresDatabase(Database):
    dialect = "postgresql"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.query_count = 0

    @classmethod
    async def open(cls, url: str, *, min_size: int, max_size: int) -> "PostgresDatabase":
        pool = await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            command_timeout=30,
            # Statements are prepared once per connection and reused.
            statement_cache_size=256,
        )
        return cls(pool)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._pool.acquire() as conn:
            return await _PgExecutor(conn, self).fetch(sql, *args)

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._pool.acquire() as conn:
            return await _PgExecutor(conn, self).execute(sql, *args)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield _PgExecutor(conn, self)

    def bulk_insert(self, table: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]) -> tuple[str, list[Any]]:
        # One array argument per column and unnest(): a single statement with a
        # fixed number of parameters, however many rows.
        names = ", ".join(name for name, _ in columns)
        arrays = ", ".join(f"${i}::{kind}[]" for i, (_, kind) in enumerate(columns, start=1))
        args = [[row[i] for row in rows] for i in range(len(columns))]
        return f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays})", args

    def pool_stats(self) -> dict[str, int]:
        return {
            "size": self._pool.get_size(),
            "idle": self._pool.get_idle_size(),
            "max": self._pool.get_max_size(),
        }

    async def close(self) -> None:
        await self._pool.close()


def _rows_changed(status: str) -> int:
    # asyncpg returns the command tag, e.g. "UPDATE 3" or "INSERT 0 5".
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0

