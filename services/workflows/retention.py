"""Keeps the events table bounded: EVENTS_RETENTION rows, pruned in the background.

Pruning runs on a timer, never on the insert path (see EventRepository.prune).
"""

from __future__ import annotations

import asyncio
import logging

from services.common.background import cancel_and_wait, spawn
from services.common.errors import Unavailable
from services.common.event_repository import EventRepository

log = logging.getLogger(__name__)


class Pruner:
    def __init__(self, events: EventRepository, keep: int, interval: float) -> None:
        self._events = events
        self._keep = keep
        self._interval = interval
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = spawn(self._run(), name="events-retention", essential=True)

    async def _run(self) -> None:
        while True:
            try:
                deleted = await self._events.prune(self._keep)
                if deleted:
                    log.info("pruned %d old events (keeping %d)", deleted, self._keep)
            except Exception as exc:  # noqa: BLE001 - try again next round
                # A database that is away was logged once, by services.common.outages.
                if not isinstance(exc, Unavailable):
                    log.exception("pruning events failed")
            await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
