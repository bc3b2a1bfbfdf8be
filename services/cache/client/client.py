"""The client every service uses to read through the cache sidecar (docs/cache.md).

The cache is an optimisation, never a dependency: any sidecar failure degrades to
calling the loader. A value whose key this process saw invalidated after its version
(its own writes, from committed(), and what its stream brings) is never kept, shared or
served here, from whichever layer: read-your-writes before the sidecar has heard of the write.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, TypeVar, cast

import grpc
from devops_hub.v1 import cache_pb2
from google.protobuf import empty_pb2
from google.protobuf.message import Message
from opentelemetry import trace

from services.cache.client.codecs import Codec, CodecError, protobuf_codec
from services.cache.client.freshness import fresh_reads_requested
from services.cache.client.history import InvalidationHistory
from services.cache.client.keys import escape_key
from services.cache.client.near_cache import DEFAULT_WATCH_LIVENESS, NearCache, NearCacheFeed, NearEntry
from services.cache.client.transport import CACHE_SERVICE, SidecarTransport
from services.cache.consistency import ConsistencyChecker, ConsistencyMetrics
from services.cache.edge.surrogate_keys import note_read
from services.common.foundation.settings import Settings
from services.common.transport.channels import service_address

M = TypeVar("M", bound=Message)
T = TypeVar("T")

# A load that took longer than this is not filled: the stores' records of what was
# invalidated (Redis tombstones) outlive it by far.
FILL_WINDOW = 10.0


# A shared load, and the log position this process knew committed when it began.
_Flight = tuple[asyncio.Task[Any], int]


class CacheClient:
    """One instance per process and sidecar address; it owns its channel."""

    def __init__(
        self,
        address: str,
        timeout: float,
        *,
        retry_after: float = 1.0,
        near_cache: NearCache | None = None,
        watch_prefixes: Sequence[str] = (),
        watch_liveness: float = DEFAULT_WATCH_LIVENESS,
        api_key: str = "",
        consistency: ConsistencyMetrics | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.transport = SidecarTransport(address, timeout, retry_after=retry_after, api_key=api_key, tracer=tracer)
        self.near = near_cache
        self.hits = 0
        self.misses = 0
        self.history = near_cache.history if near_cache is not None else InvalidationHistory()
        self._flights: dict[Hashable, _Flight] = {}
        self._feed: NearCacheFeed | None = None
        self._checker: ConsistencyChecker | None = None
        if near_cache is not None:
            self._feed = NearCacheFeed(self.transport, near_cache, prefixes=watch_prefixes, liveness=watch_liveness)
            if consistency is not None:
                self._checker = ConsistencyChecker(near_cache, "near", self.transport, consistency)

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> CacheClient:
        """At the address the proto gives CacheService (CACHE_ADDR)."""
        if settings.cache_near_size > 0 and "near_cache" not in options:
            options["near_cache"] = NearCache(max_entries=settings.cache_near_size, max_ttl=settings.cache_near_ttl)
        options.setdefault("api_key", settings.service_api_key)
        return cls(service_address(CACHE_SERVICE, settings), timeout=settings.cache_timeout, **options)

    async def connect(self) -> None:
        """Starts feeding the near-cache now instead of on first use (it never fails:
        grpc connects in the background and reconnects by itself)."""
        self._start()

    async def close(self) -> None:
        self.transport.closed = True
        if self._checker is not None:
            await self._checker.stop()
        if self._feed is not None:
            await self._feed.close()
        await self.transport.close()

    async def __aenter__(self) -> CacheClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- reads -----------------------------------------------------------------------

    async def get_or_load(self, key: str, ttl: float, message_type: type[M], loader: Callable[[], Awaitable[M]]) -> M:
        """The cached message of key, or loader()'s (then cached for ttl seconds; 0 = the
        sidecar's default). Exceptions from loader reach every waiter; sidecar failures never do."""
        return cast(M, await self.load(key, ttl, protobuf_codec(message_type), loader))

    async def load(
        self, key: str, ttl: float, codec: Codec[T], loader: Callable[[], Awaitable[T | None]], *, cache_none: bool = False
    ) -> T | None:
        """get_or_load for any codec; with cache_none, a None from loader is cached as a
        negative entry."""
        entry = self._near_entry(key, ttl, cache_none)
        if entry is not None:
            # Bound, then unpacked: unpacking the call makes mypy infer T | None for the
            # codec's T (python/mypy#20219); likewise below.
            hit = self._take(key, codec, entry)
            found, value = hit
            if found:
                self.hits += 1
                return value
        return await self._load_far(key, ttl, codec, loader, cache_none)

    async def load_encoded(
        self, key: str, ttl: float, codec: Codec[T], loader: Callable[[], Awaitable[T | None]], *, cache_none: bool = False
    ) -> bytes | None:
        """load(), answering the codec's bytes (None for None): a near-cache hit hands over
        the bytes it holds undecoded, for a reply that goes out as they are (grpc_calls.py)."""
        entry = self._near_entry(key, ttl, cache_none)
        if entry is not None and entry.content_type == codec.content_type:
            self.hits += 1
            note_read(key, entry.version)
            return None if entry.negative else entry.value
        value = await self._load_far(key, ttl, codec, loader, cache_none)
        return None if value is None else codec.encode(value)

    async def get(self, key: str, codec: Codec[T]) -> tuple[bool, T | None]:
        """(True, value) for a cached value of this codec, (True, None) for a negative
        entry, (False, None) for a miss or when the sidecar cannot be reached."""
        entry = self._near_entry(key, 0.0, True)
        if entry is not None:
            hit = self._take(key, codec, entry)
            if hit[0]:
                return hit
        if fresh_reads_requested():
            return False, None
        response, _ = await self.transport.call("Get", cache_pb2.CacheGetRequest(key=key))
        if response is None or not response.found:
            return False, None
        return self._far_hit(key, 0.0, codec, response.entry)

    def _near_entry(self, key: str, ttl: float, cache_none: bool) -> NearEntry | None:
        _check_ttl(ttl)
        self._start()
        if self.near is None or fresh_reads_requested():
            return None
        entry = self.near.get(key)
        return entry if entry is not None and (cache_none or not entry.negative) else None

    def _take(self, key: str, codec: Codec[T], entry: NearEntry | cache_pb2.CacheEntry) -> tuple[bool, T | None]:
        if entry.content_type != codec.content_type:
            return False, None
        try:
            value = None if entry.negative else codec.decode(entry.value)
        except CodecError as exc:
            self.transport.note_failure("decode", f"{key}: {exc}")
            return False, None
        note_read(key, entry.version)
        return True, value

    def _far_hit(self, key: str, ttl: float, codec: Codec[T], entry: cache_pb2.CacheEntry) -> tuple[bool, T | None]:
        """_take() for the sidecar's entry, refused when older than an invalidation of its
        key this process has seen (its own write the sidecar has yet to hear of)."""
        if self.history.raced(key, entry.version):
            return False, None
        hit = self._take(key, codec, entry)
        if hit[0] and self.near is not None:
            self.near.put(key, entry.content_type, entry.value, entry.negative, ttl, entry.version)
        return hit

    async def _load_far(
        self, key: str, ttl: float, codec: Codec[T], loader: Callable[[], Awaitable[T | None]], cache_none: bool
    ) -> T | None:
        """The sidecar, then the loader: concurrent misses on one key share one load, but
        a caller who arrives after an invalidation of the key never joins a load that
        began before it (it may have read the database before the write committed:
        handing that to a read that began after the write was acknowledged is a stale
        read). A new load replaces the old one for later callers; a caller's
        cancellation stops its own wait, never the shared load."""
        fresh = fresh_reads_requested()
        name = (key, codec.content_type, cache_none)
        flight = self._flights.get(name)
        if fresh or flight is None or self.history.raced(key, flight[1]):
            since = self.history.known
            load = self._load_through(key, ttl, codec, loader, cache_none, since, fresh)
            flight = self._flights[name] = (asyncio.create_task(load), since)
            flight[0].add_done_callback(functools.partial(self._landed, name, flight))
        return cast("T | None", await asyncio.shield(flight[0]))

    def _landed(self, name: Hashable, flight: _Flight, task: asyncio.Task[Any]) -> None:
        if self._flights.get(name) is flight:
            del self._flights[name]
        # Mark the exception retrieved: if every waiter was cancelled, nobody else will.
        if not task.cancelled():
            task.exception()

    async def _load_through(
        self, key: str, ttl: float, codec: Codec[T], loader: Callable[[], Awaitable[T | None]], cache_none: bool, since: int, fresh: bool
    ) -> T | None:
        response = None if fresh else (await self.transport.call("Get", cache_pb2.CacheGetRequest(key=key)))[0]
        if response is not None and response.found:
            hit = self._far_hit(key, ttl, codec, response.entry)
            found, value = hit
            if found and (value is not None or cache_none):
                self.hits += 1
                return value
        self.misses += 1
        started = time.monotonic()
        value = await loader()
        # The loader read at least what this process knew committed, and what the
        # sidecar had applied when it missed: both are versions of what it read.
        version = max(since, response.position if response is not None else 0)
        note_read(key, version)
        if (value is None and not cache_none) or (response is None and not fresh) or time.monotonic() - started > FILL_WINDOW:
            return value  # nothing to keep, the sidecar is away, or the load took too long
        entry = _entry(key, codec, value, version)
        stored, _ = await self.transport.call("Set", cache_pb2.CacheSetRequest(entry=entry, ttl_seconds=ttl, fill=True))
        # Only what the sidecar took as current goes near: a refused fill raced a write.
        if stored is not None and stored.stored and self.near is not None:
            self.near.put(key, entry.content_type, entry.value, entry.negative, ttl, version)
        return value

    # --- this process's writes ---------------------------------------------------------

    def committed(self, position: int, patterns: Sequence[str]) -> None:
        """A write of this process committed at log position `position` (read-your-writes
        here); the log's relay takes its patterns to the sidecar (services/cache/log/relay.py)."""
        if self.near is not None:
            self.near.applied_own(position, patterns)
        else:
            for pattern in patterns:
                self.history.record(pattern, position)
        self.history.learn(position)

    # --- outside the log: the guide's API, operators ---------------------------------

    async def set(self, key: str, value: T, codec: Codec[T], ttl: float = 0.0) -> bool:
        """Stores a value unconditionally (every near-cache drops its copy). False when
        the sidecar could not store it; never raises for that."""
        _check_ttl(ttl)
        self._start()
        if self.near is not None:
            self.near.invalidate(escape_key(key), None)
        request = cache_pb2.CacheSetRequest(entry=_entry(key, codec, value, 0), ttl_seconds=ttl)
        response, _ = await self.transport.call("Set", request, respect_backoff=False)
        return response is not None and bool(response.stored)

    async def invalidate(self, *patterns: str) -> bool:
        """Removes every key matching the glob patterns ("*" clears everything), from
        outside the invalidation log: at once, in every layer, but not ordered against
        fills in flight. True when the sidecar applied them; never raises for sidecar failures."""
        if any(not pattern for pattern in patterns):
            raise ValueError("invalidation patterns must not be empty")
        if not patterns:
            return True
        self._start()
        if self.near is not None:
            for pattern in patterns:
                self.near.invalidate(pattern, None)
        request = cache_pb2.CacheInvalidateRequest(patterns=patterns)
        _, code = await self.transport.call("Invalidate", request, respect_backoff=False)
        return code is None

    async def delete(self, key: str) -> bool:
        """Removes one key; True when the sidecar applied it."""
        return await self.invalidate(escape_key(key))

    async def clear(self) -> bool:
        """Empties the whole cache (every service's)."""
        return await self.invalidate("*")

    async def stats(self) -> cache_pb2.CacheStats | None:
        """The sidecar's statistics, or None when it cannot be reached."""
        return (await self.probe())[0]

    async def probe(self) -> tuple[cache_pb2.CacheStats | None, grpc.StatusCode | None]:
        """One Stats call: (stats, None), or (None, why it failed), to tell an
        unreachable sidecar (the cache is optional) from a refused key (a mistake)."""
        return await self.transport.call("Stats", empty_pb2.Empty(), respect_backoff=False)

    def _start(self) -> None:
        if self._feed is not None and not self.transport.closed:
            self._feed.start()
            if self._checker is not None:
                self._checker.start()


def _check_ttl(ttl: float) -> None:
    if not math.isfinite(ttl) or ttl < 0:
        raise ValueError(f"ttl must be a finite number of seconds >= 0, got {ttl!r}")


def _entry(key: str, codec: Codec[T], value: T | None, version: int) -> cache_pb2.CacheEntry:
    entry = cache_pb2.CacheEntry(key=key, content_type=codec.content_type, negative=value is None, version=version)
    if value is not None:
        entry.value = codec.encode(value)
    return entry
