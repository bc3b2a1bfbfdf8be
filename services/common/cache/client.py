"""The client every service uses to read through, and invalidate, the cache sidecar.

The cache is an optimisation, never a dependency: any sidecar failure (unreachable,
slow, erroring) degrades to calling the loader, i.e. reading the source of truth.
Nothing the sidecar does reaches the caller as an exception, and grpc reconnects by
itself once the sidecar is back.

Layers, fastest first: the near-cache (in-process, only while a Watch stream feeds
it), the sidecar, the loader. This class composes the parts, each in a module of
its own:

* transport.py: the channel and the one way every call goes through it;
* single_flight.py: concurrent misses on one key share one load, never across an
  invalidation;
* delivery.py: invalidations sent at once, retried until accepted, and the keys
  this process bypasses meanwhile;
* near_feed.py: the Watch stream that keeps the near-cache live.

A call under fresh_reads() (services/common/freshness.py: the caller sent
`cache-control: no-cache`) reads past every layer and refills them.

Fills carry the fill token of the Get that missed, so a value loaded before a write
never lands after that write's invalidation; the near-cache and single-flight check
the same invalidation history (history.py). Values are protobuf bytes or a declared
codec's (never pickle), tagged with their content type, so a reader only decodes
what it asked for: a mismatch is a miss.
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

from services.common.cache.codecs import Codec, CodecError, protobuf_codec, protobuf_content_type
from services.common.cache.delivery import InvalidationDelivery
from services.common.cache.history import InvalidationHistory
from services.common.cache.keys import escape_key
from services.common.cache.near_cache import NearCache
from services.common.cache.near_feed import DEFAULT_WATCH_LIVENESS, NearCacheFeed
from services.common.cache.single_flight import SingleFlight
from services.common.cache.transport import CACHE_SERVICE, SidecarTransport
from services.common.channels import service_address
from services.common.freshness import fresh_reads_requested
from services.common.settings import Settings
from services.common.surrogate_keys import note_read

M = TypeVar("M", bound=Message)
T = TypeVar("T")

__all__ = ["CacheClient", "protobuf_content_type"]


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
        max_pending_invalidations: int = 256,
        near_cache: NearCache | None = None,
        watch_prefixes: Sequence[str] = (),
        watch_liveness: float = DEFAULT_WATCH_LIVENESS,
        clock: Callable[[], float] = time.monotonic,
        api_key: str = "",
    ) -> None:
        self._transport = SidecarTransport(
            address, timeout, retry_after=retry_after, log_interval=log_interval, clock=clock, api_key=api_key
        )
        self.near = near_cache
        # This process's reads: served by a cache layer, or by the loader.
        self.hits = 0
        self.misses = 0
        self._history = near_cache.history if near_cache is not None else InvalidationHistory()
        self._flights = SingleFlight(self._history)
        self._delivery = InvalidationDelivery(self._transport, self._apply_locally, max_pending=max_pending_invalidations)
        self._feed = (
            NearCacheFeed(self._transport, near_cache, self._apply_locally, prefixes=watch_prefixes, liveness=watch_liveness)
            if near_cache is not None
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

    @property
    def pending_invalidations(self) -> frozenset[str]:
        """Patterns that failed to reach the sidecar and are being retried."""
        return self._delivery.pending

    async def connect(self) -> None:
        """Opens the channel now instead of on first use (it never fails: grpc
        connects in the background and reconnects by itself), and starts feeding the
        near-cache."""
        self._start()

    async def close(self) -> None:
        self._transport.closed = True
        if self._feed is not None:
            await self._feed.close()
        await self._delivery.close()
        await self._transport.close()

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
        if not math.isfinite(ttl) or ttl < 0:
            raise ValueError(f"ttl must be a finite number of seconds >= 0, got {ttl!r}")
        self._start()
        fresh = fresh_reads_requested()
        bypassed = self._delivery.bypassed(key)
        note_read(key, cached=not bypassed)
        if not fresh and not bypassed:
            # Bound, then unpacked: unpacking the call makes mypy infer T | None for the
            # codec's T (python/mypy#20219); likewise below.
            near = self._near_hit(key, codec)
            found, value = near
            if found and (value is not None or cache_none):
                self.hits += 1
                return value

        async def load_through(since: int) -> T | None:
            return await self._load_through(key, ttl, codec, loader, cache_none, since, fresh)

        return await self._flights.run((key, codec.content_type, cache_none), key, load_through, join=not fresh)

    async def get(self, key: str, codec: Codec[T]) -> tuple[bool, T | None]:
        """(True, value) for a cached value of this codec, (True, None) for a negative
        entry, (False, None) for a miss or when the sidecar cannot be reached."""
        self._start()
        if self._delivery.bypassed(key) or fresh_reads_requested():
            return False, None
        near = self._near_hit(key, codec)
        if near[0]:
            return near
        since = self._history.snapshot()
        response, _ = await self._transport.call("Get", cache_pb2.CacheGetRequest(key=key))
        if response is None or not response.found:
            return False, None
        return self._decode_hit(key, 0.0, codec, response.entry, since)

    def _near_hit(self, key: str, codec: Codec[T]) -> tuple[bool, T | None]:
        near = self.near
        if near is None or not near.live:
            return False, None
        entry = near.get(key)
        if entry is None or entry.content_type != codec.content_type:
            return False, None
        if entry.negative:
            return True, None
        with contextlib.suppress(CodecError):
            return True, codec.decode(entry.value)
        return False, None

    async def _load_through(
        self, key: str, ttl: float, codec: Codec[T], loader: Callable[[], Awaitable[T | None]], cache_none: bool, since: int, fresh: bool
    ) -> T | None:
        if self._delivery.bypassed(key):
            return await loader()
        if fresh:
            # Drop what the cache holds first, so that the Get below misses and hands
            # out a fill token: the refill then loses to any write that races it.
            await self._transport.call("Delete", cache_pb2.CacheDeleteRequest(key=key))
        response, _ = await self._transport.call("Get", cache_pb2.CacheGetRequest(key=key))
        if response is not None and response.found and not fresh:
            hit = self._decode_hit(key, ttl, codec, response.entry, since)
            found, value = hit
            if found and (value is not None or cache_none):
                self.hits += 1
                return value
        self.misses += 1
        value = await loader()
        # No fill without a token (the Get failed, or the store cannot vouch for one),
        # and none for a key whose invalidation is still pending: either could plant
        # stale data.
        if response is None or not response.fill_token or self._delivery.bypassed(key):
            return value
        if value is None and not cache_none:
            return value
        entry = cache_pb2.CacheEntry(key=key, content_type=codec.content_type, negative=value is None)
        if value is not None:
            entry.value = codec.encode(value)
        stored, _ = await self._transport.call(
            "Set", cache_pb2.CacheSetRequest(entry=entry, ttl_seconds=ttl, fill_token=response.fill_token)
        )
        # Only what the sidecar accepted as current goes near: a refused fill raced a write.
        if stored is not None and stored.stored and self.near is not None:
            self.near.put(key, entry.content_type, entry.value, entry.negative, ttl, since)
        return value

    def _decode_hit(
        self, key: str, ttl: float, codec: Codec[T], entry: cache_pb2.CacheEntry, since: int
    ) -> tuple[bool, T | None]:
        """(True, value) for a usable hit (value None for a negative entry), (False,
        None) for one of another type or undecodable (treated as a miss)."""
        if entry.content_type != codec.content_type:
            return False, None
        value = None
        if not entry.negative:
            try:
                value = codec.decode(entry.value)
            except CodecError as exc:
                self._transport.note_failure("decode", f"{key}: {exc}")
                return False, None
        if self.near is not None:
            self.near.put(key, entry.content_type, entry.value, entry.negative, ttl, since)
        return True, value

    # --- writes ----------------------------------------------------------------------

    async def set(self, key: str, value: T, codec: Codec[T], ttl: float = 0.0) -> bool:
        """Stores a value unconditionally (the sidecar tells every near-cache to drop
        its copy). False when the sidecar could not store it; never raises for that.
        The value it replaces is then invalidated instead (retried like invalidate),
        since the caller meant it to be gone."""
        if not math.isfinite(ttl) or ttl < 0:
            raise ValueError(f"ttl must be a finite number of seconds >= 0, got {ttl!r}")
        self._start()
        pattern = escape_key(key)
        self._apply_locally(pattern)
        entry = cache_pb2.CacheEntry(key=key, content_type=codec.content_type, negative=value is None)
        if value is not None:
            entry.value = codec.encode(value)
        response: cache_pb2.CacheSetResponse | None
        response, _ = await self._transport.call("Set", cache_pb2.CacheSetRequest(entry=entry, ttl_seconds=ttl), respect_backoff=False)
        self._apply_locally(pattern)
        if response is None:
            self._delivery.retry_later([pattern])
            return False
        return response.stored

    async def invalidate(self, *patterns: str, sequence: int = 0) -> bool:
        """Removes every key matching any of the glob patterns ("*" clears everything).

        `sequence` is the patterns' entry in the invalidation log, if they come from
        one: the sidecar records it as applied. True when the sidecar applied them all;
        False when some are queued for retry (see delivery.py). Never raises for
        sidecar failures.
        """
        if any(not pattern for pattern in patterns):
            raise ValueError("invalidation patterns must not be empty")
        if not patterns:
            return True
        self._start()
        return await self._delivery.invalidate(patterns, sequence)

    async def delete(self, key: str) -> bool:
        """Removes one key; True when the sidecar applied it, False when queued for retry."""
        if not key:
            raise ValueError("key must not be empty")
        self._start()
        return await self._delivery.delete(key, escape_key(key))

    async def clear(self) -> bool:
        """Empties the whole cache (every service's); queued for retry like invalidate."""
        return await self.invalidate("*")

    async def stats(self) -> cache_pb2.CacheStats | None:
        """The sidecar's statistics, or None when it cannot be reached."""
        response, _ = await self.probe()
        return response

    async def probe(self) -> tuple[cache_pb2.CacheStats | None, grpc.StatusCode | None]:
        """One Stats call: (stats, None), or (None, why it failed) - e.g. to tell an
        unreachable sidecar (the cache is optional) from a refused key (a mistake)."""
        return await self._transport.call("Stats", empty_pb2.Empty(), respect_backoff=False)

    # --- the invalidation log's relay ------------------------------------------------

    async def sync_state(self) -> cache_pb2.CacheSyncState | None:
        """The sidecar's position in the invalidation log, or None when it cannot be reached."""
        response: cache_pb2.CacheSyncState | None
        response, _ = await self._transport.call("GetSyncState", empty_pb2.Empty(), respect_backoff=False)
        return response

    async def sync(
        self, after: int, through: int, patterns: Sequence[str], *, clear: bool = False
    ) -> tuple[cache_pb2.CacheSyncState | None, grpc.StatusCode | None]:
        """Applies the log entries in (after, through] (see CacheService.Sync): the new
        state, or (None, the failure's code)."""
        for pattern in ("*",) if clear else patterns:
            self._apply_locally(pattern)
        request = cache_pb2.CacheSyncRequest(after=after, through=through, patterns=patterns, clear=clear)
        return await self._transport.call("Sync", request, respect_backoff=False)

    # --- this process's own layers ---------------------------------------------------

    def _apply_locally(self, pattern: str) -> None:
        """Every invalidation this process hears of, by any path, lands here first."""
        if self.near is not None:
            self.near.invalidate(pattern)
        else:
            self._history.record(pattern)

    def _start(self) -> None:
        if self._feed is not None and not self._transport.closed:
            self._feed.start()
