"""Events written in batches, off the request path.

The workflow engine emits events on its hot path (every execution and step
transition); EventWriter only appends them to a buffer, and one background task
writes each buffer as a single INSERT. Nothing is dropped: a full buffer is flushed
at once, and close() flushes what is left. (Writes that change data record their
events in their own transaction instead: services/cache/log/outbox.py.)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from devops_hub.v1 import events_pb2
from google.protobuf import json_format

from services.common.contract.errors import Unavailable
from services.common.data.db import Database
from services.common.data.event_repository import EventRepository, NewEvent
from services.common.foundation.background import cancel_and_wait, spawn, wait_set
from services.common.foundation.clock import utc_now
from services.common.runtime import idempotency

log = logging.getLogger(__name__)


class EventWriter:
    def __init__(self, db: Database, source: str, *, flush_interval: float = 0.1, max_batch: int = 500) -> None:
        self._db = db
        self._repository = EventRepository(db)
        self._source = source
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._buffer: list[NewEvent] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()

    def emit(self, type: str, subject: str = "", data: dict[str, Any] | None = None, correlation_id: str = "") -> None:
        """Queues one event; returns at once."""
        event = NewEvent(type, self._source, subject, data, correlation_id, utc_now())
        self._buffer.append(event)
        if len(self._buffer) >= self._max_batch:
            self._wake.set()
        self._ensure_running()

    async def write_now(self, event: events_pb2.Event) -> events_pb2.Event:
        """Writes one event at once (PublishEvent), after what was queued before it, in a
        transaction of its own: one that fails is not written later behind the caller's
        back, and the answer to its request_id commits with it (idempotency.py)."""
        await self.flush()
        data = json_format.MessageToDict(event.data) if event.HasField("data") else {}
        now = utc_now()
        new = NewEvent(event.type, event.source or self._source, event.subject, data, event.correlation_id, now)
        stored = events_pb2.Event()
        stored.CopyFrom(event)
        stored.time.FromDatetime(now)
        async with self._db.transaction() as tx:
            await idempotency.claim(tx)
            stored.id = str((await self._repository.insert(tx, [new]))[0])
            await idempotency.answer(tx, stored)
        return stored

    async def flush(self) -> list[int]:
        async with self._flush_lock:
            if not self._buffer:
                return []
            batch, self._buffer = self._buffer, []
            try:
                async with self._db.transaction() as tx:
                    return await self._repository.insert(tx, batch)
            except Exception:
                # Keep the events for the next flush rather than lose them.
                self._buffer[:0] = batch
                raise

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = spawn(self._run(), name="event-writer")

    async def _run(self) -> None:
        while self._buffer:
            await wait_set(self._wake, self._flush_interval)
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 - kept for the next round, not lost
                # A database that is away was logged once, by services.common.data.outages.
                if not isinstance(exc, Unavailable):
                    log.exception("writing %d events failed; will retry", len(self._buffer))
                await asyncio.sleep(min(5.0, self._flush_interval * 10))

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        await self.flush()

