"""Live events for StreamEvents and WatchExecution, read from the shared events table.

Events are written by every replica of the agents and workflows services, so one poller per process reads
new rows by id and fans them out to the subscribers' bounded queues, only while someone
listens. Each subscription starts at the newest event stored when it opened.

PostgreSQL hands out ids before commit, so a transaction can commit a lower id after
a higher one was read. The poller keeps such holes open for a few seconds and reads
them again, so a late commit is still delivered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

import grpc
from devops_hub.v1 import events_pb2

from services.common.contract.errors import ServiceError
from services.common.data.db import Database
from services.common.data.event_repository import EventRepository
from services.common.foundation.background import cancel_and_wait

log = logging.getLogger(__name__)

HOLE_TTL = 5.0
# A wider jump is a sequence skip (rolled-back batch), not commits in flight.
MAX_HOLES = 1000
BATCH = 1000


class SubscriberTooSlow(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "STREAM_OVERFLOW"


@dataclass(eq=False)
class Subscription:
    accepts: Callable[[events_pb2.Event], bool]
    # The newest event id stored when it opened: it receives only later ones.
    start: int = 0
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=10_000))
    overflowed: bool = False


class EventFeed:
    def __init__(self, db: Database, *, poll_interval: float = 0.2) -> None:
        self._events = EventRepository(db)
        self._poll_interval = poll_interval
        self._subscribers: set[Subscription] = set()
        self._task: asyncio.Task | None = None
        self._last_id = 0  # open() sets it before it starts the poller
        self._holes: dict[int, float] = {}  # missing id -> when to give up on it

    async def open(self, accepts: Callable[[events_pb2.Event], bool]) -> Subscription:
        """Starts collecting the events stored from now on that `accepts` keeps."""
        newest = await self._events.newest_id()
        subscription = Subscription(accepts, start=newest)
        # No await from here on: the poller cannot stop between the check and the add.
        if self._task is None or self._task.done():
            self._last_id = newest
            self._holes = {}
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="event-feed")
        self._subscribers.add(subscription)
        return subscription

    async def events(self, subscription: Subscription) -> AsyncGenerator[events_pb2.Event, None]:
        """The subscription's events, in order, until the caller stops reading."""
        try:
            while True:
                event = await subscription.queue.get()
                if event is None:
                    raise SubscriberTooSlow(
                        "the stream fell too far behind and was closed; reconnect after the last event received to resume"
                    )
                yield event
        finally:
            self.release(subscription)

    def release(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)

    async def _poll(self) -> None:
        while self._subscribers:
            try:
                await self._poll_once()
            except Exception:  # noqa: BLE001 - the database may be away for a moment
                log.exception("reading new events failed")
            await asyncio.sleep(self._poll_interval)

    async def _poll_once(self) -> None:
        now = time.monotonic()
        self._holes = {i: until for i, until in self._holes.items() if until > now}
        low = min([self._last_id, *self._holes]) if self._holes else self._last_id
        for event in await self._events.after(low, BATCH):
            event_id = int(event.id)
            if event_id <= self._last_id and event_id not in self._holes:
                continue  # delivered already
            self._holes.pop(event_id, None)
            if event_id - self._last_id <= MAX_HOLES:
                for missing in range(self._last_id + 1, event_id):
                    self._holes[missing] = now + HOLE_TTL
            self._last_id = max(self._last_id, event_id)
            self._deliver(event_id, event)

    def _deliver(self, event_id: int, event: events_pb2.Event) -> None:
        for subscription in list(self._subscribers):
            if subscription.overflowed or event_id <= subscription.start or not subscription.accepts(event):
                continue
            try:
                subscription.queue.put_nowait(event)
            except asyncio.QueueFull:
                # Drop the subscriber, not events: it is told, and can resume from ListEvents.
                subscription.overflowed = True
                subscription.queue.get_nowait()
                subscription.queue.put_nowait(None)
