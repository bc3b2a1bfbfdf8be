"""SQLite through aiosqlite, the embedded default.

WAL mode lets readers run beside the one writer, so reads go to a small set of
reader connections (round robin) and every write or transaction goes through the
single writer connection, serialised by a lock: SQLite allows one writer anyway,
and queueing in-process is cheaper than SQLITE_BUSY retries.

As a pool, for the metrics: the writer and the readers are its connections; a
writer queued on the lock, or a read beyond one per reader, is a waiter.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import itertools
import json
import pathlib
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import aiosqlite
from opentelemetry import trace

from services.common.data.db.database import Database, Executor, Row, UniqueViolation
from services.common.data.outages import Outages, is_database_outage
from services.common.telemetry import tracing
from services.common.telemetry.metrics import PoolMetrics, PoolStats

T = TypeVar("T")
_PLACEHOLDER = re.compile(r"\$(\d+)")
_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=5000",
)


@functools.lru_cache(maxsize=1024)
def _translate(sql: str) -> str:
    # `$1` (PostgreSQL) and `?1` (SQLite) are both numbered parameters.
    return _PLACEHOLDER.sub(r"?\1", sql)


def _adapt(args: Sequence[Any]) -> list[Any]:
    # Timestamps are stored as ISO-8601 text, which sorts like time.
    return [a.isoformat(timespec="microseconds") if isinstance(a, dt.datetime) else a for a in args]


class _SqliteExecutor(Executor):
    """Statements on one connection. Each is one trip to the connection's thread
    (aiosqlite's execute, fetch and close would be three): a write's cost is mostly
    those trips, each a thread switch and a wake-up of the event loop."""

    def __init__(self, conn: aiosqlite.Connection, owner: SqliteDatabase) -> None:
        self._conn = conn
        self._owner = owner

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return (await self._run([(sql, args)]))[0][0]

    async def execute(self, sql: str, *args: Any) -> int:
        return (await self._run([(sql, args)]))[0][1]

    async def _run(self, statements: Sequence[tuple[str, Sequence[Any]]], *, commit: bool = False) -> list[_Result]:
        owner = self._owner
        owner.query_count += len(statements)
        work = [(_translate(sql), _adapt(args)) for sql, args in statements]
        with _errors_translated(owner.outages), tracing.db_span(owner.tracer, "sqlite", ";\n".join(sql for sql, _ in statements)):
            return await _on_thread(self._conn, _steps, self._begin(), work, commit)

    def _begin(self) -> bool:
        """Whether the next trip must begin the transaction first: never outside one."""
        return False


class _SqliteTransaction(_SqliteExecutor):
    """One transaction on the writer. BEGIN goes with its first statement and COMMIT
    with its last ones (finish): one trip to the thread for each, not three."""

    def __init__(self, conn: aiosqlite.Connection, owner: SqliteDatabase) -> None:
        super().__init__(conn, owner)
        self.begun = False
        self.finished = False

    def _begin(self) -> bool:
        if self.finished:
            raise RuntimeError("the transaction was finished: no statement may follow")
        # Set before the trip: a caller cancelled during it must still roll it back.
        begin, self.begun = not self.begun, True
        return begin

    async def finish(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Row]]:
        if not self.begun and not statements:
            self.finished = True
            return []
        results = await _to_the_end(self._run(statements, commit=True))
        self.finished = True
        return [rows for rows, _ in results]


# A statement's rows and the number of rows it changed.
_Result = tuple[list[Row], int]


def _steps(conn: sqlite3.Connection, begin: bool, statements: list[tuple[str, list[Any]]], commit: bool) -> list[_Result]:
    if begin:
        conn.execute("BEGIN IMMEDIATE")
    results = []
    for sql, args in statements:
        cursor = conn.execute(sql, args)
        try:
            results.append((cursor.fetchall(), cursor.rowcount))
        finally:
            cursor.close()
    if commit:
        conn.execute("COMMIT")
    return results


def _rollback(conn: sqlite3.Connection) -> None:
    # Nothing to undo when BEGIN failed, or the COMMIT went through.
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _commit(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("COMMIT")
    except BaseException:
        # A COMMIT that failed leaves the transaction open, and the write lock held.
        _rollback(conn)
        raise


async def _on_thread(conn: aiosqlite.Connection, work: Callable[..., T], *args: Any) -> T:
    """One trip: aiosqlite's public calls each make one of a single sqlite3 call; its
    `_execute` (the queue they all use) takes any function."""
    result: T = await conn._execute(work, conn._conn, *args)  # type: ignore[no-untyped-call]
    return result


@contextmanager
def _errors_translated(outages: Outages) -> Iterator[None]:
    """UNIQUE violations for the repositories; a file that cannot be used now is an
    outage (UNAVAILABLE, logged once); a statement that works ends one."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        if "UNIQUE" in str(exc):
            raise UniqueViolation(str(exc)) from exc
        raise
    except sqlite3.OperationalError as exc:
        if is_database_outage(exc, raised_by_database=True):
            raise outages.database.failed(exc) from exc
        raise
    outages.database.succeeded()


class SqliteDatabase(Database):
    dialect = "sqlite"

    def __init__(
        self,
        writer: aiosqlite.Connection,
        readers: list[aiosqlite.Connection],
        pools: PoolMetrics | None,
        outages: Outages,
        tracer: trace.Tracer | None,
    ) -> None:
        super().__init__(pools, outages, tracer)
        self._writer = writer
        self._readers = readers
        self._next_reader = itertools.cycle(readers)
        self._write_lock = asyncio.Lock()
        # For pool_stats(): reads running, and writers queued for the lock.
        self._reads = 0
        self._writers_waiting = 0

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        readers: int,
        pools: PoolMetrics | None,
        outages: Outages,
        tracer: trace.Tracer | None,
    ) -> SqliteDatabase:
        path = url.removeprefix("sqlite://")
        # sqlite:///var/x.db is the relative path var/x.db; sqlite:////abs/x.db is absolute.
        path = path[1:] if path.startswith("/") else path
        if path != ":memory:":
            pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        opened: list[aiosqlite.Connection] = []
        try:
            for _ in range(readers + 1):
                opened.append(await cls._open_connection(path))
        except BaseException:
            for conn in opened:
                await conn.close()
            raise
        return cls(opened[0], opened[1:], pools, outages, tracer)

    @staticmethod
    async def _open_connection(path: str) -> aiosqlite.Connection:
        # isolation_level=None: transactions are begun explicitly, never implicitly.
        conn = await aiosqlite.connect(path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            for pragma in _PRAGMAS:
                await conn.execute(pragma)
        except BaseException:
            # Its thread would otherwise keep a process that cannot start from exiting.
            await conn.close()
            raise
        return conn

    @asynccontextmanager
    async def _writer_turn(self) -> AsyncIterator[None]:
        self._writers_waiting += 1
        try:
            await self._write_lock.acquire()
        finally:
            self._writers_waiting -= 1
        try:
            yield
        finally:
            self._write_lock.release()

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        self._reads += 1
        try:
            return await _SqliteExecutor(next(self._next_reader), self).fetch(sql, *args)
        finally:
            self._reads -= 1

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._writer_turn():
            return await _SqliteExecutor(self._writer, self).execute(sql, *args)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        async with self._writer_turn():
            # BEGIN IMMEDIATE (with the first statement) takes the write lock up front,
            # so a transaction never fails half-way on a lock it could not upgrade.
            tx = _SqliteTransaction(self._writer, self)
            try:
                yield tx
            except BaseException:
                if tx.begun:
                    # Queued behind any statement still running in the thread for a
                    # cancelled caller, or the connection would keep the write lock.
                    await _to_the_end(_on_thread(self._writer, _rollback))
                raise
            if tx.begun and not tx.finished:
                await _to_the_end(_on_thread(self._writer, _commit))

    def bulk_insert(self, table: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]) -> tuple[str, list[Any]]:
        # One JSON argument read by json_each(): a single statement, however many rows,
        # clear of SQLite's limit on bound parameters.
        names = ", ".join(name for name, _ in columns)
        picks = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(columns)))
        payload = json.dumps([_adapt(row) for row in rows])
        return f"INSERT INTO {table} ({names}) SELECT {picks} FROM json_each($1)", [payload]

    def pool_stats(self) -> PoolStats:
        readers = len(self._readers)
        writing = 1 if self._write_lock.locked() else 0
        return PoolStats(
            size=1 + readers,
            max=1 + readers,
            in_use=writing + min(self._reads, readers),
            waiters=self._writers_waiting + max(0, self._reads - readers),
        )

    async def close(self) -> None:
        self._untrack()
        for conn in [self._writer, *self._readers]:
            await conn.close()


async def _to_the_end(operation: Awaitable[T]) -> T:
    """A statement runs in aiosqlite's thread whatever happens to the awaiting task, so
    the task waits for its outcome and only then lets its cancellation through."""
    task = asyncio.ensure_future(operation)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise

