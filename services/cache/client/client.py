"""The client every service uses to read through the cache sidecar.

The cache is an optimisation, never a dependency: any sidecar failure (unreachable,
slow, erroring) degrades to calling the loader, i.e. reading the source of truth.
Nothing the sidecar does reaches the caller as an exception, and grpc reconnects by
itself once the sidecar is back.

Layers, fastest first: the near-cache (in-process, only while a Watch stream feeds
it), the sidecar, the loader. One clock orders them all: the invalidation log's
position (docs/cache.md). Every value carries the position it was read at; this
process records, at their positions, its own writes' invalidations (committed(),
before the write is acknowledged) and those its stream brings; a value whose key was
invalidated after its version is never kept, shared or served here, whichever layer
offers it. That is read-your-writes in the writing process before the sidecar has
heard of the write, with no list of keys to bypass.

Values are protobuf bytes or a declared codec's (never pickle), tagged with their
content type, so a reader only decodes what it asked for: a mismatch is a miss. A
call under fresh_reads() (`cache-control: no-cache`) reads past every layer and
refills them.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, overload

import grpc
from devops_hub.v1 import cache_pb2
from google.protobuf import empty_pb2
from google.protobuf.message import Message
from opentelemetry import trace

from services.cache.client.codecs import Codec, CodecError, protobuf_codec, protobuf_content_type
from services.cache.client.freshness import fresh_reads_requested
from services.cache.client.history import InvalidationHistory
from services.cache.client.keys import escape_key
from services.cache.client.near_cache import NearCache, NearEntry
from services.cache.client.near_feed import DEFAULT_WATCH_LIVENESS, NearCacheFeed
from services.cache.client.single_flight import SingleFlight
from services.cache.client.transport import CACHE_SERVICE, SidecarTransport
from services.cache.consistency import ConsistencyChecker, ConsistencyMetrics
from services.cache.edge.surrogate_keys import note_read
from services.common.channels import service_address
from services.common.settings import Settings

M = TypeVar("M", bound=Message)
T = TypeVar("T")

__all__ = ["CacheClient", "protobuf_content_type"]

# A load that took longer than this is not filled: the stores' records of what was
# invalidated (Redis tombstones) outlive it by far.
FILL_WINDOW = 10.0


class CacheClient:
    """A read-through client for CacheService with single-flight loads and an optional
    near-cache. One instance per process and sidecar address; it owns its channel."""

    def __init__(
        self,
        address: str,
        timeout: float,
        *,
        retry_after: float = 1.0,
        log_interval: float = 30.0,
        near_cache: NearCache | None = None,
        watch_prefixes: Sequence[str] = (),
        watch_liveness: float = DEFAULT_WATCH_LIVENESS,
        clock: Callable[[], float] = time.monotonic,
        api_key: str = "",
        consistency: ConsistencyMetrics | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.transport = SidecarTransport(
            address, timeout, retry_after=retry_after, log_interval=log_interval, clock=clock, api_key=api_key, tracer=tracer
        )
        self.near = near_cache
        self._clock = clock
        # This process's reads: served by a cache layer, or by the loader.
        self.hits = 0
        self.misses = 0
        self.history = near_cache.history if near_cache is not None else InvalidationHistory()
        self._flights = SingleFlight(self.history)
        self._feed = (
            NearCacheFeed(self.transport, near_cache, prefixes=watch_prefixes, liveness=watch_liveness)
            if near_cache is not None
            else None
        )
        self._checker = (
            ConsistencyChecker.following(near_cache, "near", self.transport, consistency)
            if near_cache is not None and consistency is not None
            else None
        )

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> CacheClient:
        """A client for the CacheService where its proto says it runs (CACHE_ADDR); with a
        near-cache unless CACHE_NEAR_SIZE=0."""
        if settings.cache_near_size > 0 and "near_cache" not in options:
            options["near_cache"] = NearCache(max_entries=settings.cache_near_size, max_ttl=settings.cache_near_ttl)
        options.setdefault("api_key", settings.service_api_key)
        return cls(service_address(CACHE_SERVICE, settings), timeout=settings.cache_timeout, **options)

    async def connect(self) -> None:
        """Opens the channel now instead of on first use (it never fails: grpc
        connects in the background and reconnects by itself), and starts feeding the
        near-cache."""
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
        """The cached value of key, or loader()'s result (then cached for ttl seconds;
        0 = the sidecar's default). Exceptions from loader reach every waiter;
        sidecar failures never do."""
        return await self.load(key, ttl, protobuf_codec(message_type), loader)

    async def get_or_load_optional(
        self, key: str, ttl: float, message_type: type[M], loader: Callable[[], Awaitable[M | None]]
    ) -> M | None:
        """Like get_or_load, for a loader that returns None for "not found": None is
        cached too, as a negative entry, for at most the sidecar's negative TTL."""
        return await self.load(key, ttl, protobuf_codec(message_type), loader, cache_none=True)

    # The codec encodes values, never None; a loader that may return None gets its
    # result as T | None (cached as a negative entry with cache_none).
    @overload
    async def load(
        self, key: str, ttl: float, codec: Codec[T], loader: Callable[[], Awaitable[T]], *, cache_none: bool = False
    ) -> T: ...

    @overload
    async def load(
        self, key: str, ttl: float, codec: Codec[T], loader: Callable[[], Awaitable[T | None]], *, cache_none: bool = False
    ) -> T | None: ...

    async def load(
        self,
        key: str,
        ttl: float,
        codec: Codec[T],
        loader: Callable[[], Awaitable[T | None]],
        *,
        cache_none: bool = False,
    ) -> T | None:
        """get_or_load for any codec. With cache_none, a None from loader is cached
        as a negative entry and returned as None on later reads. Under fresh_reads()
        (a request's `cache-control: no-cache`) every layer is bypassed and refilled."""
        _check_ttl(ttl)
        self._start()
        fresh = fresh_reads_requested()
        if not fresh:
            # Bound, then unpacked: unpacking the call makes mypy infer T | None for the
            # codec's T (python/mypy#20219); likewise below.
            near = self._near_hit(key, codec)
            found, value = near
            if found and (value is not None or cache_none):
                self.hits += 1
                return value
        return await self._load_far(key, ttl, codec, loader, cache_none, fresh)

    async def load_encoded(
        self,
        key: str,
        ttl: float,
        codec: Codec[T],
        loader: Callable[[], Awaitable[T | None]],
        *,
        cache_none: bool = False,
    ) -> bytes | None:
        """load(), answering the value as the codec's bytes (None for a negative entry or
        a None from loader): a near-cache hit hands over the bytes it holds, decoded
        nowhere, for an answer that goes out in that same encoding (a gRPC reply of
        the cached message, passed through by grpc_calls.py). Every value the
        near-cache holds was decoded or encoded once on its way in."""
        _check_ttl(ttl)
        self._start()
        fresh = fresh_reads_requested()
        if not fresh:
            entry = self._near_entry(key, codec)
            if entry is not None and (cache_none or not entry.negative):
                self.hits += 1
                note_read(key, entry.version)
                return None if entry.negative else entry.value
        value = await self._load_far(key, ttl, codec, loader, cache_none, fresh)
        return None if value is None else codec.encode(value)

    async def _load_far(
        self, key: str, ttl: float, codec: Codec[T], loader: Callable[[], Awaitable[T | None]], cache_none: bool, fresh: bool
    ) -> T | None:
        """The sidecar, then the loader, past the near-cache: one load per key at a time."""

        async def load_through(since: int) -> T | None:
            return await self._load_through(key, ttl, codec, loader, cache_none, since, fresh)

        return await self._flights.run((key, codec.content_type, cache_none), key, load_through, join=not fresh)

    async def get(self, key: str, codec: Codec[T]) -> tuple[bool, T | None]:
        """(True, value) for a cached value of this codec, (True, None) for a negative
        entry, (False, None) for a miss or when the sidecar cannot be reached."""
        self._start()
        if fresh_reads_requested():
            return False, None
        near = self._near_hit(key, codec)
        if near[0]:
            return near
        response, _ = await self.transport.call("Get", cache_pb2.CacheGetRequest(key=key))
        if response is None or not response.found:
            return False, None
        return self._decode_hit(key, 0.0, codec, response.entry)

    def _near_entry(self, key: str, codec: Codec[Any]) -> NearEntry | None:
        near = self.near
        if near is None or not near.live:
            return None
        entry = near.get(key)
        if entry is None or entry.content_type != codec.content_type:
            return None
        return entry

    def _near_hit(self, key: str, codec: Codec[T]) -> tuple[bool, T | None]:
        entry = self._near_entry(key, codec)
        if entry is None:
            return False, None
        if entry.negative:
            note_read(key, entry.version)
            return True, None
        with contextlib.suppress(CodecError):
            value = codec.decode(entry.value)
            note_read(key, entry.version)
            return True, value
        return False, None

    async def _load_through(
        self, key: str, ttl: float, codec: Codec[T], loader: Callable[[], Awaitable[T | None]], cache_none: bool, since: int, fresh: bool
    ) -> T | None:
        response = None if fresh else (await self.transport.call("Get", cache_pb2.CacheGetRequest(key=key)))[0]
        if response is not None and response.found:
            hit = self._decode_hit(key, ttl, codec, response.entry)
            found, value = hit
            if found and (value is not None or cache_none):
                self.hits += 1
                return value
        self.misses += 1
        started = self._clock()
        value = await loader()
        # The loader read at least what this process knew committed, and what the
        # sidecar had applied when it missed: both are versions of what it read.
        version = max(since, response.position if response is not None else 0)
        note_read(key, version)
        if value is None and not cache_none:
            return value
        if response is None and not fresh:
            return value  # the sidecar is away
        if self._clock() - started > FILL_WINDOW:
            return value
        entry = cache_pb2.CacheEntry(key=key, content_type=codec.content_type, negative=value is None, version=version)
        if value is not None:
            entry.value = codec.encode(value)
        stored, _ = await self.transport.call("Set", cache_pb2.CacheSetRequest(entry=entry, ttl_seconds=ttl, fill=True))
        # Only what the sidecar took as current goes near: a refused fill raced a write.
        if stored is not None and stored.stored and self.near is not None:
            self.near.put(key, entry.content_type, entry.value, entry.negative, ttl, version)
        return value

    def _decode_hit(self, key: str, ttl: float, codec: Codec[T], entry: cache_pb2.CacheEntry) -> tuple[bool, T | None]:
        """(True, value) for a usable hit (value None for a negative entry), (False,
        None) for one of another type, undecodable, or older than an invalidation of
        its key this process has seen (its own write the sidecar has yet to hear of)."""
        if entry.content_type != codec.content_type or self.history.raced(key, entry.version):
            return False, None
        value = None
        if not entry.negative:
            try:
                value = codec.decode(entry.value)
            except CodecError as exc:
                self.transport.note_failure("decode", f"{key}: {exc}")
                return False, None
        if self.near is not None:
            self.near.put(key, entry.content_type, entry.value, entry.negative, ttl, entry.version)
        note_read(key, entry.version)
        return True, value

    # --- this process's writes ---------------------------------------------------------

    def committed(self, position: int, patterns: Sequence[str]) -> None:
        """A write of this process committed at log position `position`: from now on no
        layer's value of what it made stale is served here. The log's relay takes the
        patterns to the sidecar (services/cache/log/relay.py)."""
        near = self.near
        for pattern in patterns:
            if near is not None:
                near.invalidate(pattern, position)
            else:
                self.history.record(pattern, position)
        self.history.learn(position)
        if near is not None and near.live:
            near.applied_own(position)

    # --- outside the log: the guide's API, operators ---------------------------------

    async def set(self, key: str, value: T, codec: Codec[T], ttl: float = 0.0) -> bool:
        """Stores a value unconditionally (every near-cache drops its copy). False when
        the sidecar could not store it; never raises for that."""
        _check_ttl(ttl)
        self._start()
        self._drop_locally(escape_key(key))
        entry = cache_pb2.CacheEntry(key=key, content_type=codec.content_type, negative=value is None)
        if value is not None:
            entry.value = codec.encode(value)
        response, _ = await self.transport.call("Set", cache_pb2.CacheSetRequest(entry=entry, ttl_seconds=ttl), respect_backoff=False)
        return response is not None and bool(response.stored)

    async def invalidate(self, *patterns: str) -> bool:
        """Removes every key matching the glob patterns ("*" clears everything), from
        outside the invalidation log: at once, in every layer, but not ordered against
        fills in flight (a write that must be exact goes through the log: the outbox).
        True when the sidecar applied them; never raises for sidecar failures."""
        if any(not pattern for pattern in patterns):
            raise ValueError("invalidation patterns must not be empty")
        if not patterns:
            return True
        self._start()
        for pattern in patterns:
            self._drop_locally(pattern)
        request = cache_pb2.CacheInvalidateRequest(patterns=patterns)
        _, code = await self.transport.call("Invalidate", request, respect_backoff=False)
        return code is None

    async def delete(self, key: str) -> bool:
        """Removes one key; True when the sidecar applied it."""
        if not key:
            raise ValueError("key must not be empty")
        self._start()
        self._drop_locally(escape_key(key))
        _, code = await self.transport.call("Delete", cache_pb2.CacheDeleteRequest(key=key), respect_backoff=False)
        return code is None

    async def clear(self) -> bool:
        """Empties the whole cache (every service's)."""
        return await self.invalidate("*")

    async def stats(self) -> cache_pb2.CacheStats | None:
        """The sidecar's statistics, or None when it cannot be reached."""
        response, _ = await self.probe()
        return response

    async def probe(self) -> tuple[cache_pb2.CacheStats | None, grpc.StatusCode | None]:
        """One Stats call: (stats, None), or (None, why it failed) - e.g. to tell an
        unreachable sidecar (the cache is optional) from a refused key (a mistake)."""
        return await self.transport.call("Stats", empty_pb2.Empty(), respect_backoff=False)

    # --- this process's own layers ---------------------------------------------------

    def _drop_locally(self, pattern: str) -> None:
        if self.near is not None:
            self.near.invalidate(pattern, None)

    def _start(self) -> None:
        if self._feed is not None and not self.transport.closed:
            self._feed.start()
            if self._checker is not None:
                self._checker.start()


def _check_ttl(ttl: float) -> None:
    if not math.isfinite(ttl) or ttl < 0:
        raise ValueError(f"ttl must be a finite number of seconds >= 0, got {ttl!r}")
