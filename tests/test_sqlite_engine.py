"""The SQLite engine: a transaction commits whole or not at all, even when its last
statements and COMMIT share one trip, and keeps its write lock sane when callers are
cancelled."""

from __future__ import annotations

import asyncio

import pytest

from services.common.data.db import UniqueViolation, connect
from services.common.data.db.migrate import migrate


async def test_a_cancelled_transaction_leaves_no_lock_behind(sqlite_url):
    db = await connect(sqlite_url, pool_size=1, max_overflow=0)
    other = await connect(sqlite_url, pool_size=1, max_overflow=0)
    try:
        await migrate(db)

        async def write_slowly() -> None:
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO events (type, source, time) VALUES ('a', 't', '2026-01-01')")
                await asyncio.sleep(10)

        for delay in (0, 0.001, 0.01, 0.05):
            task = asyncio.create_task(write_slowly())
            await asyncio.sleep(delay)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        # Another connection (as another process would) can write at once, and the
        # cancelled inserts were rolled back.
        async with other.transaction() as tx:
            await tx.execute("INSERT INTO events (type, source, time) VALUES ('b', 't', '2026-01-01')")
        assert await db.fetchval("SELECT COUNT(*) FROM events WHERE type = 'a'") == 0
        assert await db.fetchval("SELECT COUNT(*) FROM events WHERE type = 'b'") == 1
    finally:
        await db.close()
        await other.close()


async def test_a_transaction_that_fails_in_its_last_statements_leaves_nothing(sqlite_url):
    """finish() runs the last statements and the COMMIT in one trip; one that fails
    there rolls back the whole transaction, and the writer goes on."""
    db = await connect(sqlite_url, pool_size=1, max_overflow=0)
    try:
        await migrate(db)
        insert = "INSERT INTO cache_invalidations (seq, patterns, time) VALUES ($1, '[]', '2026-01-01')"
        await db.execute(insert, 1)
        with pytest.raises(UniqueViolation):
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO events (type, source, time) VALUES ('a', 't', '2026-01-01')")
                await tx.finish([(insert, [2]), (insert, [1])])
        assert await db.fetchval("SELECT COUNT(*) FROM events") == 0
        assert await db.fetchval("SELECT COUNT(*) FROM cache_invalidations") == 1
        async with db.transaction() as tx:
            rows = await tx.finish([(insert + " RETURNING seq", [3])])
        assert rows[0][0]["seq"] == 3
        assert await db.fetchval("SELECT COUNT(*) FROM cache_invalidations") == 2
    finally:
        await db.close()


async def test_a_caller_cancelled_during_the_commit_finds_it_whole_or_absent(sqlite_url):
    db = await connect(sqlite_url, pool_size=1, max_overflow=0)
    try:
        await migrate(db)

        async def write(n: int) -> None:
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO events (type, source, time) VALUES ($1, 't', '2026-01-01')", f"first {n}")
                await tx.finish([("INSERT INTO events (type, source, time) VALUES ($1, 't', '2026-01-01')", [f"last {n}"])])

        for n, delay in enumerate((0, 0.0005, 0.001, 0.002, 0.005)):
            task = asyncio.create_task(write(n))
            await asyncio.sleep(delay)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            firsts = await db.fetchval("SELECT COUNT(*) FROM events WHERE type = $1", f"first {n}")
            lasts = await db.fetchval("SELECT COUNT(*) FROM events WHERE type = $1", f"last {n}")
            assert firsts == lasts
        # The write lock was let go every time.
        await write(99)
        assert await db.fetchval("SELECT COUNT(*) FROM events WHERE type = 'last 99'") == 1
    finally:
        await db.close()
