"""The event writer: batched on the hot path, nothing lost."""

from __future__ import annotations

import asyncio

from services.common.data.db import connect
from services.common.data.db.migrate import migrate
from services.common.usecases.events import EventWriter


async def test_many_events_are_one_insert(database_url):
    db = await connect(database_url, pool_size=1, max_overflow=0)
    try:
        await migrate(db)
        writer = EventWriter(db, "test", flush_interval=10)
        before = db.query_count
        for i in range(300):
            writer.emit("tick", str(i), {"i": i}, correlation_id="batch")
        assert db.query_count == before, "emit only buffers"
        ids = await writer.flush()
        assert len(ids) == 300 and ids == sorted(ids)
        assert db.query_count == before + 1
        rows = await db.fetch("SELECT subject FROM events WHERE correlation_id = 'batch' ORDER BY id")
        assert [row["subject"] for row in rows] == [str(i) for i in range(300)]
        await writer.close()
    finally:
        await db.close()


async def test_close_flushes_what_is_buffered(sqlite_url):
    db = await connect(sqlite_url, pool_size=1, max_overflow=0)
    try:
        await migrate(db)
        writer = EventWriter(db, "test", flush_interval=60)
        writer.emit("last", "words")
        await asyncio.sleep(0)
        await writer.close()
        assert await db.fetchval("SELECT COUNT(*) FROM events WHERE type = 'last'") == 1
    finally:
        await db.close()
