"""Fan-out of invalidations to Watch streams (the near-caches and edge caches).

Each message carries the log span it covers, (after, through], so a follower finds a
gap whichever sidecar or path dropped a message; heartbeats carry the hub's position,
the furthest `through` streamed. publish() never waits: a watcher that cannot keep up
is ended rather than buffered without limit or allowed to stall the writer. While the
hub cannot vouch for completeness (shutting down, or not subscribed to the other
sidecars) it ends every stream and takes none: a near-cache fed by an incomplete
stream would serve stale data, and a client without one reads through the sidecar.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from devops_hub.v1 import cache_pb2

from services.cache.client.keys import parse_pattern

log = logging.getLogger(__name__)

WATCH_QUEUE = 1024


class Watcher:
    """One Watch stream's queue and filter; None in the queue only wakes it to look at `ended`."""

    def __init__(self, prefixes: Sequence[str], queue_size: int) -> None:
        self.prefixes = tuple(prefixes)
        self.queue: asyncio.Queue[cache_pb2.CacheInvalidation | None] = asyncio.Queue(queue_size)
        # Why the stream must end ("overflow", "suspended" or "shutdown"); None while healthy.
        self.ended: str | None = None

    def wants(self, patterns: Sequence[str]) -> bool:
        """Could a pattern remove a key under one of our prefixes? Over-approximates: an
        extra invalidation costs a near-cache a miss, a missing one serves stale data."""
        if not self.prefixes or "*" in patterns:
            return True
        for pattern in patterns:
            parsed = parse_pattern(pattern)
            literal = parsed.literal_prefix
            for prefix in self.prefixes:
                if literal.startswith(prefix) or (parsed.kind != "exact" and prefix.startswith(literal)):
                    return True
        return False

    def end(self, reason: str) -> None:
        self.ended = reason
        # Wake the stream if it is waiting on an empty queue; a full queue means the
        # stream is blocked sending and will see `ended` when the send returns.
        if not self.queue.full():
            self.queue.put_nowait(None)


class InvalidationHub:
    def __init__(self) -> None:
        self.position = 0
        self._watchers: set[Watcher] = set()
        self._suspended = False
        self._closed = False

    def publish(self, after: int, through: int, patterns: Sequence[str]) -> None:
        """Streams the patterns of the log span (after, through] as one message (a burst
        of keys costs a watcher one queue slot). Patterns from outside the log come
        with after == through."""
        self.position = max(self.position, through)
        if not self._watchers:
            return
        message = cache_pb2.CacheInvalidation(after=after, through=through, patterns=patterns)
        for watcher in list(self._watchers):
            # A message that moves the position goes to every watcher, even with
            # patterns it does not want: its followers must learn the new position.
            if after == through and not watcher.wants(patterns):
                continue
            try:
                watcher.queue.put_nowait(message)
            except asyncio.QueueFull:
                log.warning("cache watcher fell %d invalidations behind; ending its stream", WATCH_QUEUE)
                self._watchers.discard(watcher)
                watcher.end("overflow")

    def subscribe(self, prefixes: Sequence[str]) -> Watcher | None:
        if self._suspended or self._closed:
            return None
        watcher = Watcher(prefixes, WATCH_QUEUE)
        self._watchers.add(watcher)
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def suspend(self) -> None:
        self._suspended = True
        self._end_all("suspended")

    def resume(self) -> None:
        self._suspended = False

    def close(self) -> None:
        """Ends every stream for good, so clients clear and reconnect elsewhere rather than hold up the shutdown."""
        self._closed = True
        self._end_all("shutdown")

    def _end_all(self, reason: str) -> None:
        for watcher in self._watchers:
            watcher.end(reason)
        self._watchers.clear()
