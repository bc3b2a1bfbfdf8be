"""The caches that follow the sidecar's Watch stream: the near-cache in every service
process and, through FedCache, the gateway's edge cache (edge/store.py); docs/cache.md,
"The near-cache, the edge cache and Watch".

A cache is live only while its stream is provably complete: a message whose log span
(after, through] starts past the cache's position means one was missed, and a stream
that ends or is silent past `liveness` (the sidecar heartbeats every 0.25 s; a frozen
one sends nothing) may have missed any. Going dark or live again clears the cache.

Near-cache entries live at most max_ttl whatever their TTL in the sidecar, a bound on
any staleness nobody anticipated. Values are kept as bytes and decoded per hit, so
callers never share a mutable object through the cache.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, Protocol, TypeVar, cast

import grpc
from devops_hub.v1 import cache_pb2

from services.cache.client.history import InvalidationHistory
from services.cache.client.keys import GlobPattern, parse_pattern
from services.cache.client.transport import SidecarTransport
from services.common.foundation.background import spawn

log = logging.getLogger(__name__)

DEFAULT_WATCH_LIVENESS = 1.0
WATCH_RETRY_INITIAL = 0.05
WATCH_RETRY_MAX = 2.0
CLOSE_TIMEOUT = 2.0


class Expiring(Protocol):
    @property
    def expires_at(self) -> float: ...


K = TypeVar("K", bound=Hashable)
E = TypeVar("E", bound=Expiring)


class FedCache(abc.ABC, Generic[K, E]):
    def __init__(
        self,
        *,
        max_entries: int = 1024,
        max_bytes: int = 32 * 1024 * 1024,
        max_ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or max_bytes < 1 or max_ttl <= 0:
            raise ValueError("max_entries, max_bytes and max_ttl must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_ttl = max_ttl
        self._clock = clock
        self._entries: collections.OrderedDict[K, E] = collections.OrderedDict()
        self._bytes = 0
        self.live = False
        self.position = 0
        self.history = InvalidationHistory()
        # Told of every invalidation from the log this cache applies (consistency.py).
        self.observer: Callable[[str, int], None] | None = None
        # Log entries applied at this process's own commits, until the stream brings them back.
        self._own: set[int] = set()

    def go_live(self, position: int) -> None:
        """The stream is at `position`: nothing read before it may land (it may have
        missed an invalidation while dark)."""
        self.clear(position)
        self.position = position
        self.live = True

    def go_dark(self) -> None:
        """Invalidations may be missed from now on."""
        self.clear(self.history.known)
        self.live = False

    def invalidate(self, pattern: str, at: int | None) -> None:
        """Drops what the pattern names; `at` is its log position, recorded so that a
        fill read before it is refused (None: from outside the log, not recorded)."""
        if pattern == "*":
            self.clear(self.history.known if at is None else at)
            return
        if at is not None:
            self.history.record(pattern, at)
            if self.observer is not None:
                self.observer(pattern, at)
        self._drop(parse_pattern(pattern))

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> E | None:
        entry = self._entries.get(key) if self.live else None
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def applied_own(self, position: int, patterns: Sequence[str]) -> None:
        """A write of this process committed at log entry `position`: its patterns apply
        here now, and its stream's copy of them is skipped (took_own()); nothing is
        applied when the stream has brought them already."""
        if self.live and position <= self.position:
            return
        for pattern in patterns:
            self.invalidate(pattern, position)
        if self.live:
            self._own.add(position)

    def took_own(self, after: int, through: int) -> bool:
        """Whether the stream's span (after, through] holds only entries applied_own()
        already applied (the relay sends writes that commit together in one span);
        entries the stream has passed are forgotten either way."""
        own = self._own
        mine = through > after and all(position in own for position in range(after + 1, through + 1))
        if own:
            self._own = {position for position in own if position > through}
        return mine

    def clear(self, at: int) -> None:
        self.history.forget(at)
        self._entries.clear()
        self._bytes = 0
        self._own.clear()

    def _fits(self, size: int) -> bool:
        return self.live and size <= self.max_bytes // 16

    def _store(self, key: K, entry: E) -> None:
        if key in self._entries:
            self._remove(key)
        self._entries[key] = entry
        self._bytes += self._weight(entry)
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._remove(next(iter(self._entries)))

    def _remove(self, key: K) -> E:
        entry = self._entries.pop(key)
        self._bytes -= self._weight(entry)
        return entry

    @abc.abstractmethod
    def _weight(self, entry: E) -> int:
        """The bytes an entry counts against max_bytes."""

    @abc.abstractmethod
    def _drop(self, pattern: GlobPattern) -> None:
        """Removes the entries the pattern names."""

    @abc.abstractmethod
    def holds_older(self, key: str, at: int) -> bool:
        """Whether it holds a value of `key` read before log position `at` (consistency.py)."""


@dataclasses.dataclass(slots=True)
class NearEntry:
    content_type: str
    value: bytes
    negative: bool
    expires_at: float
    version: int  # the log position it was read at


class NearCache(FedCache[str, NearEntry]):
    def put(self, key: str, content_type: str, value: bytes, negative: bool, ttl: float, version: int) -> bool:
        if not self._fits(len(value)) or self.history.raced(key, version):
            return False
        ttl = min(ttl, self.max_ttl) if ttl > 0 else self.max_ttl
        self._store(key, NearEntry(content_type, value, negative, self._clock() + ttl, version))
        return True

    def holds_older(self, key: str, at: int) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.version < at

    def _drop(self, pattern: GlobPattern) -> None:
        if pattern.kind == "exact":
            if pattern.text in self._entries:
                self._remove(pattern.text)
            return
        # Bounded by max_entries: the near-cache is small by design.
        for key in [key for key in self._entries if pattern.matches(key)]:
            self._remove(key)

    def _weight(self, entry: NearEntry) -> int:
        return len(entry.value)


class NearCacheFeed:
    def __init__(
        self,
        transport: SidecarTransport,
        near: FedCache[Any, Any],
        *,
        prefixes: Sequence[str] = (),
        liveness: float = DEFAULT_WATCH_LIVENESS,
    ) -> None:
        self._transport = transport
        self._near = near
        self._prefixes = list(prefixes)
        self._liveness = liveness
        self._task: asyncio.Task[None] | None = None
        self._call: grpc.aio.UnaryStreamCall[cache_pb2.CacheWatchRequest, cache_pb2.CacheInvalidation] | None = None

    def start(self) -> None:
        if self._task is None and not self._transport.closed:
            self._task = spawn(self._run(), name="cache-watch")

    async def close(self) -> None:
        task, self._task = self._task, None
        # The call first: a read() of an intercepted stream call (the services' key)
        # that is cancelled from outside may never finish cancelling, while a
        # cancelled call ends its pending read at once.
        if self._call is not None:
            self._call.cancel()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task}, timeout=CLOSE_TIMEOUT)
        self._near.go_dark()

    async def _run(self) -> None:
        delay = WATCH_RETRY_INITIAL
        while not self._transport.closed:
            call = self._call = self._transport.watch(self._prefixes)
            try:
                await self._follow(call)
            except (grpc.aio.AioRpcError, TimeoutError) as exc:  # ended, or silent past liveness
                log.debug("cache watch stream ended (%r); cache cleared", exc)
            finally:
                went_live = self._near.live
                self._near.go_dark()
                call.cancel()
            delay = WATCH_RETRY_INITIAL if went_live else min(delay * 2, WATCH_RETRY_MAX)
            await asyncio.sleep(delay)

    async def _follow(self, call: grpc.aio.UnaryStreamCall[cache_pb2.CacheWatchRequest, cache_pb2.CacheInvalidation]) -> None:
        near = self._near
        while True:
            async with asyncio.timeout(self._liveness):  # not wait_for: see background.wait_set
                read = await call.read()
            if read is grpc.aio.EOF:
                return
            message = cast(cache_pb2.CacheInvalidation, read)
            if not near.live:
                near.go_live(message.through)  # the stream opens with a heartbeat
                continue
            if message.after > near.position:
                log.warning("cache watch stream: a gap after %d, the cache is at %d; cleared", message.after, near.position)
                return
            # A span from the log is recorded at its end; patterns from outside it only drop.
            at = message.through if message.through > message.after else None
            # This process's own write came back: its commit applied it already.
            if at is None or not near.took_own(message.after, message.through) or "*" in message.patterns:
                for pattern in message.patterns:
                    near.invalidate(pattern, at)
            near.position = max(near.position, message.through)
            near.history.learn(message.through)
