"""CacheService over gRPC. Its RPCs are its use case, so no layer of its own stands
between them and the store; an invalidation goes to the Watch streams (hub.py) once the
store has applied it."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from devops_hub.v1 import cache_pb2, cache_pb2_grpc
from google.protobuf import empty_pb2

from services.cache.client.keys import escape_key, key_problem
from services.cache.sidecar.hub import InvalidationHub
from services.cache.sidecar.stores.base import Found, NewEntry, SyncState
from services.cache.sidecar.stores.fallback import FallbackStore
from services.common.contract.errors import Aborted, Unavailable, invalid_fields
from services.common.runtime.grpc_calls import Context

T = TypeVar("T")

MAX_BATCH = 1000
# Log positions must be exact in a double (the Redis store's Lua numbers).
MAX_SEQUENCE = 2**53 - 1
MAX_WATCH_PREFIXES = 100
# Followers stop trusting a stream silent for a second (NearCacheFeed, client/near_cache.py): four heartbeats.
HEARTBEAT_SECONDS = 0.25


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, store: FallbackStore, hub: InvalidationHub) -> None:
        self._store = store
        self._hub = hub

    async def Get(self, request: cache_pb2.CacheGetRequest, context: Context) -> cache_pb2.CacheGetResponse:
        _check(_key_violations([("key", request.key)]))
        lookup = await self._store.get(request.key)
        entry = None if lookup.entry is None else _entry(request.key, lookup.entry)
        return cache_pb2.CacheGetResponse(found=entry is not None, entry=entry, position=lookup.position)

    async def GetMany(self, request: cache_pb2.CacheGetManyRequest, context: Context) -> cache_pb2.CacheGetManyResponse:
        _check(_key_violations([(f"keys[{i}]", key) for i, key in enumerate(request.keys)], "keys"))
        found = await self._store.get_many(list(dict.fromkeys(request.keys)))
        return cache_pb2.CacheGetManyResponse(entries=[_entry(key, value) for key, value in found.items()])

    async def Set(self, request: cache_pb2.CacheSetRequest, context: Context) -> cache_pb2.CacheSetResponse:
        # The entry is REQUIRED: the request path refused a Set without one.
        violations = _ttl_violations(request.ttl_seconds) + self._entry_violations("entry", request.entry)
        _check(violations + _sequence_violations(("entry.version", request.entry.version)))
        entry = request.entry
        version = entry.version if request.fill else None
        store = self._store.set(entry.key, entry.value, entry.content_type, request.ttl_seconds, version, entry.negative)
        # An overwrite, not a fill: near-caches may hold the value it replaces.
        stored = await (store if request.fill else self._outside_log([escape_key(entry.key)], store))
        return cache_pb2.CacheSetResponse(stored=stored)

    async def SetMany(self, request: cache_pb2.CacheSetManyRequest, context: Context) -> cache_pb2.CacheSetManyResponse:
        violations = _ttl_violations(request.ttl_seconds)
        if len(request.entries) > MAX_BATCH:
            violations.append(("entries", f"at most {MAX_BATCH} entries per call, got {len(request.entries)}"))
        else:
            for i, entry in enumerate(request.entries):
                violations += self._entry_violations(f"entries[{i}]", entry)
        _check(violations)
        # Validated as a whole first, so a bad entry never leaves the batch half-stored.
        entries = [NewEntry(e.key, e.value, e.content_type, e.negative) for e in request.entries]
        stored = await self._outside_log([escape_key(e.key) for e in entries], self._store.set_many(entries, request.ttl_seconds))
        return cache_pb2.CacheSetManyResponse(stored=stored)

    async def Delete(self, request: cache_pb2.CacheDeleteRequest, context: Context) -> cache_pb2.CacheDeleteResponse:
        _check(_key_violations([("key", request.key)]))
        patterns = [escape_key(request.key)]
        return cache_pb2.CacheDeleteResponse(deleted=bool(await self._outside_log(patterns, self._store.remove(patterns))))

    async def Invalidate(self, request: cache_pb2.CacheInvalidateRequest, context: Context) -> cache_pb2.CacheInvalidateResponse:
        named = [("pattern", request.pattern)] if request.pattern or not request.patterns else []
        named += [(f"patterns[{i}]", pattern) for i, pattern in enumerate(request.patterns)]
        _check(_key_violations(named, "patterns"))
        patterns = [pattern for _, pattern in named]
        return cache_pb2.CacheInvalidateResponse(removed=await self._outside_log(patterns, self._store.remove(patterns)))

    async def Clear(self, request: empty_pb2.Empty, context: Context) -> cache_pb2.CacheClearResponse:
        return cache_pb2.CacheClearResponse(removed=await self._outside_log(["*"], self._store.clear()))

    async def GetSyncState(self, request: empty_pb2.Empty, context: Context) -> cache_pb2.CacheSyncState:
        return _sync_state(await self._store.sync_state())

    async def Sync(self, request: cache_pb2.CacheSyncRequest, context: Context) -> cache_pb2.CacheSyncState:
        violations = _key_violations([(f"patterns[{i}]", pattern) for i, pattern in enumerate(request.patterns)], "patterns")
        violations += _sequence_violations(("after", request.after), ("through", request.through))
        if request.through < request.after:
            violations.append(("through", f"must not be below after ({request.after}), got {request.through}"))
        _check(violations)
        state = await self._store.sync(request.after, request.through, list(request.patterns), request.clear)
        if state.changed is not None:
            self._hub.publish(request.after, request.through, list(state.changed))
        return _sync_state(state)

    async def Stats(self, request: empty_pb2.Empty, context: Context) -> cache_pb2.CacheStats:
        return await self._store.stats()

    async def Watch(self, request: cache_pb2.CacheWatchRequest, context: Context) -> AsyncIterator[cache_pb2.CacheInvalidation]:
        """Streams invalidations, starting with a heartbeat (no patterns, the position)
        that says "subscribed"; heartbeats flow whenever the stream is idle, so a client
        can tell a quiet stream from a dead connection."""
        if len(request.prefixes) > MAX_WATCH_PREFIXES:
            raise invalid_fields([("prefixes", f"at most {MAX_WATCH_PREFIXES} prefixes, got {len(request.prefixes)}")])
        watcher = self._hub.subscribe(request.prefixes)
        if watcher is None:
            raise Unavailable("invalidations cannot be streamed right now; retry later", reason="WATCH_UNAVAILABLE")
        try:
            yield self._heartbeat()
            while True:
                if watcher.ended == "overflow":
                    raise Aborted("watch stream fell behind; clear the near-cache and resubscribe", reason="WATCH_OVERFLOW")
                if watcher.ended is not None:
                    raise Unavailable(f"watch stream ended ({watcher.ended}); resubscribe", reason="WATCH_ENDED")
                try:
                    async with asyncio.timeout(HEARTBEAT_SECONDS):
                        message = await watcher.queue.get()
                except TimeoutError:
                    # A message put as the wait timed out goes first: a heartbeat never
                    # carries a position past what the stream has sent (gateway/edge.py relies on it).
                    message = self._heartbeat() if watcher.queue.empty() else watcher.queue.get_nowait()
                if message is not None:
                    yield message
        finally:
            self._hub.unsubscribe(watcher)

    def _heartbeat(self) -> cache_pb2.CacheInvalidation:
        return cache_pb2.CacheInvalidation(after=self._hub.position, through=self._hub.position)

    async def _outside_log(self, patterns: list[str], change: Awaitable[T]) -> T:
        """Makes a change the log does not number, then streams its patterns at the
        hub's position (after == through): even when a store failure cut it short,
        since an extra invalidation only costs near-caches a miss."""
        try:
            return await change
        finally:
            if patterns:
                self._hub.publish(self._hub.position, self._hub.position, patterns)

    def _entry_violations(self, path: str, entry: cache_pb2.CacheEntry) -> list[tuple[str, str]]:
        found = self._store.entry_violations(entry.key, entry.value, entry.content_type, entry.negative)
        return [(f"{path}.{field}", problem) for field, problem in found]


def _sync_state(state: SyncState) -> cache_pb2.CacheSyncState:
    return cache_pb2.CacheSyncState(applied=state.applied, fresh=state.fresh)


def _check(violations: list[tuple[str, str]]) -> None:
    if violations:
        raise invalid_fields(violations)


def _key_violations(named: list[tuple[str, str]], batch: str = "") -> list[tuple[str, str]]:
    """A pattern is bounded like a key: a store keeps it in its history of invalidations."""
    if len(named) > MAX_BATCH:
        return [(batch, f"at most {MAX_BATCH} {batch} per call, got {len(named)}")]
    return [(field, problem) for field, key in named if (problem := key_problem(key))]


def _sequence_violations(*named: tuple[str, int]) -> list[tuple[str, str]]:
    return [
        (field, f"must be at most {MAX_SEQUENCE}, got {value}") for field, value in named if value > MAX_SEQUENCE
    ]


def _entry(key: str, value: Found) -> cache_pb2.CacheEntry:
    return cache_pb2.CacheEntry(
        key=key, value=value.value, content_type=value.content_type, negative=value.negative, version=value.version
    )


def _ttl_violations(ttl: float) -> list[tuple[str, str]]:
    if not math.isfinite(ttl) or ttl < 0:
        return [("ttl_seconds", "must be a finite number of seconds, 0 or more (0 = the default TTL)")]
    return []
