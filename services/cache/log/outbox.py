"""A write's unit of work: its data, its events and its invalidations commit together
(docs/cache.md, "The invalidation log and the relay").

After the commit, before the write is acknowledged, this process stops serving what
it made stale, the answer names it for the gateway's edge cache, and the relay takes
the entry to the cache (a second at most), so a read that follows the acknowledgement
in another process finds the sidecar current.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from services.cache.client.client import CacheClient
from services.cache.edge import surrogate_keys
from services.cache.log.relay import InvalidationRelay
from services.cache.log.repository import InvalidationLog
from services.common.data.db import Database
from services.common.data.db.database import Executor
from services.common.data.event_repository import EventRepository, NewEvent
from services.common.foundation.clock import utc_now


@dataclass
class Write:
    tx: Executor
    source: str
    time: dt.datetime
    # In the order recorded, without repeats.
    patterns: dict[str, None] = field(default_factory=dict)
    events: list[NewEvent] = field(default_factory=list)

    def made_stale(self, *patterns: str) -> None:
        """Cache patterns this write makes stale (glob patterns, as CacheClient.invalidate)."""
        self.patterns.update(dict.fromkeys(patterns))

    def emit(self, type: str, subject: str, data: dict[str, Any]) -> None:
        self.events.append(NewEvent(type, self.source, subject, data, time=self.time))


class Outbox:
    def __init__(self, db: Database, cache: CacheClient, relay: InvalidationRelay, source: str) -> None:
        self._db = db
        self._cache = cache
        self._relay = relay
        self._source = source
        self._events = EventRepository(db)
        self._log = InvalidationLog(db)

    @asynccontextmanager
    async def write(self, delivering: Callable[[], None] = lambda: None) -> AsyncIterator[Write]:
        """A block that records nothing (no row matched, say) commits without a log entry.
        `delivering` is called once a write that recorded something has committed,
        before it waits for the relay (Resource.update ends its turn there)."""
        async with self._db.transaction() as tx:
            write = Write(tx, self._source, utc_now())
            yield write
            patterns = list(write.patterns)
            entry = self._log.appending(patterns, write.time) if patterns else []
            # One trip with the COMMIT where the engine allows it (SQLite).
            results = await tx.finish(self._events.appending(write.events) + entry)
            sequence = int(results[-1][0][0]) if patterns else 0
        if patterns:
            self._cache.committed(sequence, patterns)
            surrogate_keys.note_write(sequence, patterns)
            delivering()
            await self._relay.deliver(sequence, patterns)
