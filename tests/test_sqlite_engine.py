"""The SQLite engine keeps its write lock sane when callers are cancelled."""

from __future__ import annotations

import asyncio

from services.common.db import connect
from services.common.db.migrate import migrate


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
