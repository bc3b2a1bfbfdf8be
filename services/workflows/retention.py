"""Keeps the events table bounded: EVENTS_RETENTION rows, pruned in the background.

Pruning runs on a timer, never on the insert path, and deletes in small batches so
it never holds a long lock; ids only grow, so "older than the newest N" is a range.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.common.background import spawn
from services.common.errors import Unavailable
from services.common.db import Database

log = logging.getLogger(__name__)
BATCH = 5000


async def prune_once(db: Database, keep: int) -> int:
    """Deletes the events older than the newest `keep`; returns how many it deleted."""
    newest = await db.fetchval("SELECT COALESCE(MAX(id), 0) FROM events")
    cutoff = int(newest) - keep
    deleted = 0
    while cutoff > 0:
        n = await db.execute(
            f"DELETE FROM events WHERE id IN (SELECT id FROM events WHERE id <= $1 ORDER BY id LIMIT {BATCH})", cutoff
        )
        deleted += n
        if n < BATCH:
            break
        await asyncio.sleep(0)  # let requests run between batches
    return deleted


class Pruner:
    def __init__(self, db: Database, keep: int, interval: float) -> None:
        self._db = db
        self._keep = keep
        self._interval = interval
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = spawn(self._run(), name="events-retention", essential=True)

    async def _run(self) -> None:
        while True:
            try:
                deleted = await prune_once(self._db, self._keep)
                if deleted:
                    log.info("pruned %d old events (keeping %d)", deleted, self._keep)
            except Exception as exc:  # noqa: BLE001 - try again next round
                # A database that is away was logged once, by services.common.outages.
                if not isinstance(exc, Unavailable):
                    log.exception("pruning events failed")
            await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
