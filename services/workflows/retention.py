"""Keeps the events table bounded (EVENTS_RETENTION rows) and drops the idempotency
keys older than IDEMPOTENCY_RETENTION, in the background.

Pruning runs on a timer, never on the insert path (see EventRepository.prune). A
key past its retention is ignored by look-ups anyway: pruning only bounds the table.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from services.common.contract.errors import Unavailable
from services.common.data.event_repository import EventRepository
from services.common.data.idempotency_repository import IdempotencyRepository
from services.common.foundation.background import cancel_and_wait, spawn
from services.common.foundation.clock import utc_now

log = logging.getLogger(__name__)


class Pruner:
    def __init__(self, events: EventRepository, keep: int, interval: float, keys: IdempotencyRepository, key_retention: float) -> None:
        self._events = events
        self._keep = keep
        self._keys = keys
        self._key_retention = dt.timedelta(seconds=key_retention)
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
                expired = await self._keys.prune(utc_now() - self._key_retention)
                if expired:
                    log.info("pruned %d idempotency keys older than %s", expired, self._key_retention)
            except Exception as exc:  # noqa: BLE001 - try again next round
                # A database that is away was logged once, by services.common.data.outages.
                if not isinstance(exc, Unavailable):
                    log.exception("pruning events or idempotency keys failed")
            await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
