"""Event use cases: list the log, publish into it, and follow it live."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator, Callable

from devops_hub.v1 import events_pb2

from services.common import pagination
from services.common.db import Database
from services.common.errors import invalid_fields
from services.common.event_repository import EventFilter, EventRepository
from services.common.events import EventWriter
from services.workflows.event_feed import EventFeed

Event = events_pb2.Event
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
MAX_DATA_BYTES = 64 * 1024
MAX_REPLAY = 10_000


class EventLog:
    def __init__(self, db: Database, writer: EventWriter, feed: EventFeed) -> None:
        self._events = EventRepository(db)
        self._writer = writer
        self._feed = feed

    async def list(self, request: events_pb2.ListEventsRequest) -> events_pb2.ListEventsResponse:
        size = pagination.page_size(request.page_size)
        after = pagination.decode_token(request)
        if after is not None and not after.isdigit():
            raise invalid_fields([("page_token", "is not a token this service issued")])
        filters = EventFilter(
            request.type,
            request.source,
            request.correlation_id,
            request.since.ToDatetime(dt.timezone.utc) if request.HasField("since") else None,
        )
        events = await self._events.page(filters, None if after is None else int(after), size + 1)
        response = events_pb2.ListEventsResponse(events=events[:size])
        if len(events) > size:
            response.next_page_token = pagination.encode_token(events[size - 1].id, request)
        return response

    async def publish(self, event: Event) -> Event:
        violations = []
        for name in ("type", "source"):
            value = getattr(event, name)
            if not value:
                violations.append((f"event.{name}", "is required"))
            elif not NAME.match(value):
                violations.append((f"event.{name}", "must be 1-128 lower-case letters, digits, '.', '_' or '-'"))
        if len(event.subject) > 256:
            violations.append(("event.subject", "must be at most 256 characters"))
        if len(event.correlation_id) > 128:
            violations.append(("event.correlation_id", "must be at most 128 characters"))
        if event.data.ByteSize() > MAX_DATA_BYTES:
            violations.append(("event.data", f"must be at most {MAX_DATA_BYTES} bytes"))
        if violations:
            raise invalid_fields(violations)
        return await self._writer.write_now(event)

    async def stream(self, request: events_pb2.StreamEventsRequest) -> AsyncIterator[Event]:
        subscription = await self._feed.open(_matcher(request))
        async for event in self._feed.events(subscription):
            yield event

    async def follow(self, correlation_id: str) -> AsyncIterator[Event]:
        """Every event of one correlation id: those stored already, then live ones, each once."""
        # Subscribe first, then read history: nothing stored in between is missed.
        subscription = await self._feed.open(lambda e: e.correlation_id == correlation_id)
        live = self._feed.events(subscription)
        try:
            last = 0
            for event in await self._events.of_correlation(correlation_id, MAX_REPLAY):
                last = int(event.id)
                yield event
            async for event in live:
                if int(event.id) > last:
                    yield event
        finally:
            await live.aclose()
            self._feed.release(subscription)


def _matcher(request: events_pb2.StreamEventsRequest) -> Callable[[Event], bool]:
    wanted = {name: getattr(request, name) for name in ("type", "source", "subject", "correlation_id") if getattr(request, name)}
    return lambda event: all(getattr(event, name) == value for name, value in wanted.items())
