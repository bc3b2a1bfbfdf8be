"""Event use cases: list the log, publish into it, and follow it live."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator

from devops_hub.v1 import events_pb2

from services.common.contract import field_behavior, pagination
from services.common.contract.errors import invalid_fields
from services.common.contract.etags import revision_of
from services.common.data.db import Database
from services.common.data.event_repository import EventFilter, EventRepository
from services.common.usecases.events import EventWriter
from services.workflows.event_feed import EventFeed

Event = events_pb2.Event
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
MAX_DATA_BYTES = 64 * 1024
# Stored events read per query while a stream catches up from a resume position.
REPLAY_BATCH = 1000
# The filters StreamEvents may set, each an exact match on the event's field.
FILTERS = ("type", "source", "subject", "correlation_id")


class Events:
    def __init__(self, db: Database, writer: EventWriter, feed: EventFeed) -> None:
        self._repository = EventRepository(db)
        self._writer = writer
        self._feed = feed

    async def list(self, request: events_pb2.ListEventsRequest) -> events_pb2.ListEventsResponse:
        filters = EventFilter(
            request.type,
            request.source,
            request.correlation_id,
            request.since.ToDatetime(dt.UTC) if request.HasField("since") else None,
        )

        async def load(after: str | None, limit: int) -> list[Event]:
            if after is not None and revision_of(after) is None:
                raise invalid_fields([("page_token", "is not a token this service issued")])
            return await self._repository.page(filters, None if after is None else int(after), limit)

        events, token = await pagination.page(request, load, lambda event: event.id)
        return events_pb2.ListEventsResponse(events=events, next_page_token=token)

    async def publish(self, event: Event) -> Event:
        violations = field_behavior.violations(field_behavior.missing(event), "event")
        for name in ("type", "source"):
            value = getattr(event, name)
            if value and not NAME.match(value):
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

    def stream(self, request: events_pb2.StreamEventsRequest) -> AsyncIterator[Event]:
        """Matching events from now on, or from just after `request.after`."""
        wanted = {name: getattr(request, name) for name in FILTERS if getattr(request, name)}
        return self.follow(wanted, resume_position(request.after))

    async def follow(self, wanted: dict[str, str], after: int | None) -> AsyncIterator[Event]:
        """The stored events after `after` that match `wanted` (none when it is None),
        then the live ones. Subscribing first and replaying up to where the
        subscription starts leaves no gap and no repeat between the two."""
        subscription = await self._feed.open(lambda e: all(getattr(e, name) == value for name, value in wanted.items()))
        if after is not None and after > subscription.start:
            subscription.start = after  # a position ahead of the log: nothing before it is new
        live = self._feed.events(subscription)
        try:
            if after is not None:
                while after < subscription.start:
                    events = await self._repository.between(after, subscription.start, wanted, REPLAY_BATCH)
                    for event in events:
                        yield event
                    if len(events) < REPLAY_BATCH:
                        break
                    after = int(events[-1].id)
            async for event in live:
                yield event
        finally:
            await live.aclose()
            self._feed.release(subscription)


def resume_position(after: str) -> int | None:
    if not after:
        return None
    position = revision_of(after)
    if position is None:
        raise invalid_fields([("after", "must be an event id, as received in Event.id")])
    return position
