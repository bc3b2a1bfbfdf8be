"""The Redis store, shared by every sidecar on one Redis (docs/cache.md, "The Redis
store"; the record format in redis_layout.py).

Every failure of Redis is raised to the caller: the fallback store decides what to do
about it. Commands are never retried here, so a failure surfaces within one timeout.
Entries are checked before they reach it (the servicer, by memory's stricter rules).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from devops_hub.v1 import cache_pb2
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from services.cache.client.keys import GlobPattern, namespace_of, parse_pattern, prefix_levels
from services.cache.sidecar.stores.base import (
    FRESH,
    Counts,
    Found,
    Lookup,
    NewEntry,
    SyncState,
    lifetime,
)
from services.cache.sidecar.stores.redis_layout import KeyLayout, parse_record, record
from services.common.foundation.dependencies import redis_node_url

# How long a count of the store's records and bytes is reused: a SCAN is O(keyspace),
# and scrapes come often.
CENSUS_MAX_AGE = 5.0
# SCAN batch size: large enough that a walk of 1M keys is a few thousand round trips.
SCAN_COUNT = 1000
# A tombstone outlives any fill that could race it: clients fill within FILL_WINDOW
# (services/cache/client/client.py) of their read, far below this.
TOMBSTONE_MS = 60_000

# The version of a V, N or T record: the digits between its kind and the first '|'.
_VERSION = """
local function version_of(record)
  local bar = string.find(record, '|', 2, true)
  return tonumber(string.sub(record, 2, bar - 1))
end
local function invalidated_after(version, generations)
  for _, seq in ipairs(generations) do
    if seq and tonumber(seq) > version then return true end
  end
  return false
end
-- The positions of "#" and of the prefix levels in ARGV[first..]. A hash without "#"
-- is new, or was lost (evicted, deleted) with the invalidations it recorded: "#" is
-- set to `position` (the caller's last-read position), below which every record of
-- the namespace counts as invalidated.
local function generations_of(key, position, first)
  local levels = {}
  for i = first, #ARGV do levels[#levels + 1] = ARGV[i] end
  local generations = redis.call('HMGET', key, '#', unpack(levels))
  if not generations[1] then
    redis.call('HSET', key, '#', position)
    generations[1] = position
  end
  return generations
end
"""

# KEYS: entry, generations. ARGV: position, prefix levels… → the record when current, else false.
_GET = _VERSION + """
local generations = generations_of(KEYS[2], ARGV[1], 2)
local record = redis.call('GET', KEYS[1])
if not record or string.sub(record, 1, 1) == 'T' then return false end
if invalidated_after(version_of(record), generations) then return false end
return record
"""

# KEYS: entry, generations. ARGV: version, floor, ttl ms, record, position, prefix
# levels… → 1 stored, 0 refused (invalidated after the version, below the floor, or
# newer held).
_FILL = _VERSION + """
local version = tonumber(ARGV[1])
if version < tonumber(ARGV[2]) then return 0 end
local held = redis.call('GET', KEYS[1])
if held and version_of(held) > version then return 0 end
if invalidated_after(version, generations_of(KEYS[2], ARGV[5], 6)) then return 0 end
redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[3])
return 1
"""

# KEYS: entry. ARGV: log position, ttl ms, force → 1 when a value or negative entry
# went. A record read at or after the position is newer than an invalidation from the
# log: it stays, unless forced (an invalidation from outside the log).
_TOMBSTONE = _VERSION + """
local held = redis.call('GET', KEYS[1])
if held and ARGV[3] == '0' and version_of(held) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], 'T' .. ARGV[1] .. '|', 'PX', ARGV[2])
if held and string.sub(held, 1, 1) ~= 'T' then return 1 end
return 0
"""

# KEYS: generations. ARGV: field, log position: the field keeps the larger.
_RAISE = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current or tonumber(current) < tonumber(ARGV[2]) then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""

_SCRIPTS = {"get": _GET, "fill": _FILL, "tombstone": _TOMBSTONE, "raise": _RAISE}
# EVALSHA names a script by the SHA-1 of its source, known without asking Redis; a
# Redis that does not have it yet (first use, restart) answers NOSCRIPT, and the
# scripts are loaded then.
_SHAS = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in _SCRIPTS.items()}


def connect(url: str, *, max_connections: int, timeout: float) -> aioredis.Redis:
    """A client over a bounded, blocking pool: at most max_connections sockets, and a
    caller waits at most `timeout` for one, to connect, and for each reply. A URL
    with `?cluster=true` talks to a Redis Cluster (RedisCluster discovers its nodes)."""
    options: dict[str, Any] = {
        "max_connections": max_connections,
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if "cluster=true" in url:
        cluster = RedisCluster.from_url(redis_node_url(url), **options)
        return cluster  # type: ignore[return-value]  # the commands this store uses are the same
    return aioredis.Redis(connection_pool=BlockingConnectionPool.from_url(url, timeout=timeout, **options))


class RedisStore:
    backend = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        default_ttl: float,
        negative_ttl: float = float("inf"),
        layout: KeyLayout,
    ) -> None:
        self.client = client
        self.layout = layout
        # Tells this sidecar's own Pub/Sub messages from other sidecars'.
        self.origin = secrets.token_hex(8)
        self._default_ttl = default_ttl
        self._negative_ttl = negative_ttl
        self.counts = Counts()
        # The position as last read: fills are checked against its floor (see _FILL).
        self._position = FRESH
        self._floor = 0
        self._census_lock = asyncio.Lock()
        self._census: tuple[float, int, int] | None = None  # (when, records, bytes)

    async def get(self, key: str) -> Lookup:
        def queue(pipe: Any) -> None:
            self._queue_get(pipe, key)
            pipe.hmget(self.layout.position, ["applied", "floor"])

        raw, position = await self._pipeline(queue)
        self._note_position(position)
        self.counts.read(key, hit=raw is not None)
        return Lookup(None if raw is None else parse_record(raw), self._position.applied)

    async def get_many(self, keys: Sequence[str]) -> dict[str, Found]:
        records = await self._for_each(keys, self._queue_get)
        found: dict[str, Found] = {}
        for key, raw in zip(keys, records):
            self.counts.read(key, hit=raw is not None)
            if raw is not None:
                found[key] = parse_record(raw)
        return found

    async def set(
        self, key: str, value: bytes, content_type: str, ttl: float = 0.0, version: int | None = None, negative: bool = False
    ) -> bool:
        entry = NewEntry(key, value, content_type, negative)
        if version is None:
            return bool(await self.set_many([entry], ttl))
        if self._position.fresh:
            return False
        ttl_ms, body = self._record(entry, ttl, version)
        args = [version, self._floor, ttl_ms, body, self._known(), *prefix_levels(key)]
        stored = bool(await self._eval("fill", self._keys(key), args))
        self.counts.sets += stored
        return stored

    async def set_many(self, entries: Sequence[NewEntry], ttl: float = 0.0) -> int:
        """Overwrites, stored at the current position (read first: one cached from an
        earlier call may be below an invalidation, which would hide them) in one round
        trip, with "#" in each new namespace's generation hash (see generations_of)."""
        if not entries:
            return 0
        at = (await self.sync_state()).applied

        def queue(pipe: Any) -> None:
            for namespace in {namespace_of(entry.key) for entry in entries}:
                pipe.hsetnx(self.layout.generations_key(namespace), "#", at)
            for entry in entries:
                ttl_ms, body = self._record(entry, ttl, at)
                pipe.set(self.layout.data_key(entry.key), body, px=ttl_ms)

        await self._pipeline(queue)
        self.counts.sets += len(entries)
        return len(entries)

    async def remove(self, patterns: Sequence[str]) -> int:
        """From outside the log: recorded at the current position (fills read before it
        are refused) and removed at once, prefixes by SCAN, since a version cannot tell
        a value read just before it from one read just after."""
        at = (await self.sync_state()).applied
        return await self._apply(patterns, at, publish=(at, at), outside_log=True)

    async def clear(self) -> int:
        at = (await self.sync_state()).applied
        return await self._clear(at, publish=(at, at))

    async def sync_state(self) -> SyncState:
        self._note_position(await self.client.hmget(self.layout.position, ["applied", "floor"]))
        return self._position

    async def sync(self, after: int, through: int, patterns: Sequence[str], clear: bool) -> SyncState:
        """Applies the log's entries in (after, through] (see SyncState.changes) at the
        shared position, then moves it there (never back: concurrent sidecars each
        keep the larger, which the next read of the position shows)."""
        state = await self.sync_state()
        if (changed := state.changes(after, through, patterns, clear)) is None:
            return state
        await self._apply(changed, through, publish=(after, through))
        await self._eval("raise", [self.layout.position], ["applied", through])
        self._position = state.advanced(through)
        return dataclasses.replace(self._position, changed=tuple(changed))

    async def stats(self) -> cache_pb2.CacheStats:
        """Records invalidated by a prefix count until their TTL removes them."""
        async with self._census_lock:
            if self._census is None or time.monotonic() - self._census[0] >= CENSUS_MAX_AGE:
                records = size = 0
                async for names in self._scan(self.layout.data_match("")):
                    usages = await self._for_each(names, lambda pipe, name: pipe.memory_usage(name))
                    counted = [int(usage) for usage in usages if usage is not None]  # None: gone meanwhile
                    records, size = records + len(counted), size + sum(counted)
                self._census = (time.monotonic(), records, size)
        return self.counts.stats(self._census[1], self._census[2], {}, self.backend)

    async def reset_connections(self) -> None:
        """Drops every pooled connection, so the next commands connect afresh: after
        an outage the pool is full of sockets to a Redis that is gone, and each would
        fail once more (each failure a switch to memory) before being replaced."""
        pool = getattr(self.client, "connection_pool", None)
        if pool is not None:
            await pool.disconnect(inuse_connections=True)

    async def close(self) -> None:
        await self.client.aclose()
        await self.reset_connections()

    # --- internals -------------------------------------------------------------------

    async def _apply(self, patterns: Sequence[str], at: int, *, publish: tuple[int, int], outside_log: bool = False) -> int:
        """Invalidates at log position `at`, in one round trip: a tombstone per exact
        key, the raised position of each prefix. A glob that is neither raises its
        literal prefix's deepest level (more than it names, but O(1)); one without a
        namespace is a clear from the log, and raises the floor from outside it.
        Returns the values removed (-1 when a prefix went)."""
        patterns = list(dict.fromkeys(patterns))
        exact = [pattern for pattern in patterns if parse_pattern(pattern).kind == "exact"]
        levels = [_level(parse_pattern(pattern)) for pattern in patterns if pattern not in exact]
        if None in levels and not outside_log:
            return await self._clear(at, publish=publish)
        self.counts.invalidations += len(patterns)

        def queue(pipe: Any) -> None:
            for key in exact:
                self._queue(pipe, "tombstone", [self.layout.data_key(key)], [at, TOMBSTONE_MS, int(outside_log)])
            for level in levels:
                if level is None:
                    self._queue(pipe, "raise", [self.layout.position], ["floor", at])
                else:
                    self._queue(pipe, "raise", [self.layout.generations_key(namespace_of(level))], [level, at])

        results = await self._pipeline(queue)
        # Not in the pipeline: a Redis Cluster pipeline refuses PUBLISH.
        await self.client.publish(self.layout.channel, self._message(publish, patterns))
        removed = sum(int(gone) for gone in results[: len(exact)])
        if outside_log:
            for pattern in patterns:
                if pattern not in exact:
                    removed += await self._unlink_matching(parse_pattern(pattern))
            return removed
        return -1 if levels else removed

    async def _clear(self, at: int, *, publish: tuple[int, int]) -> int:
        """Every namespace invalidated at `at`, the floor raised to it (so fills read
        before it are refused, in namespaces not seen yet too), the records reclaimed."""
        self.counts.invalidations += 1
        async for names in self._scan(self.layout.generations_match()):
            await self._for_each(names, lambda pipe, name: self._queue(pipe, "raise", [name], ["#", at]))
        await self._eval("raise", [self.layout.position], ["floor", at])
        self._floor = max(self._floor, at)
        removed = await self._unlink_matching(parse_pattern("*"))
        await self.client.publish(self.layout.channel, self._message(publish, ["*"]))
        return removed

    async def _unlink_matching(self, pattern: GlobPattern) -> int:
        """UNLINKs the records a glob matches; returns how many were values or negative
        entries (a tombstone is no entry)."""
        removed = 0
        async for scanned in self._scan(self.layout.data_match(pattern.literal_prefix)):
            names = [name for name in scanned if (key := self.layout.logical_key(name)) is not None and pattern.matches(key)]
            if names:
                kinds = await self._for_each(names, lambda pipe, name: pipe.getrange(name, 0, 0))
                await self.client.unlink(*names)
                removed += sum(kind in (b"V", b"N") for kind in kinds)
        return removed

    async def _scan(self, match: str) -> AsyncIterator[list[Any]]:
        """SCAN (never KEYS), in batches of up to SCAN_COUNT distinct names (a cluster
        client splits a command on a batch by slot)."""
        batch: dict[Any, None] = {}  # SCAN may return a name twice
        async for name in self.client.scan_iter(match=match, count=SCAN_COUNT):
            batch[name] = None
            if len(batch) >= SCAN_COUNT:
                yield list(batch)
                batch = {}
        if batch:
            yield list(batch)

    def _keys(self, key: str) -> list[str]:
        return [self.layout.data_key(key), self.layout.generations_key(namespace_of(key))]

    def _known(self) -> int:
        """The position as last read (see generations_of)."""
        return max(self._position.applied, self._floor)

    def _note_position(self, reply: list[Any]) -> None:
        applied, floor = reply
        self._position = FRESH if applied is None else SyncState(int(applied), False)
        self._floor = int(floor or 0)

    def _record(self, entry: NewEntry, ttl: float, version: int) -> tuple[int, bytes]:
        ttl_ms = max(1, int(lifetime(ttl, entry.negative, self._default_ttl, self._negative_ttl, random.random()) * 1000))
        return ttl_ms, record("N" if entry.negative else "V", version, entry.content_type, entry.value)

    def _message(self, span: tuple[int, int], patterns: Sequence[str]) -> str:
        """For the other sidecars' Watch streams; JSON, since a key may hold any character."""
        return json.dumps([self.origin, span[0], span[1], list(patterns)])

    def _queue(self, pipe: Any, name: str, keys: list[str], args: Sequence[Any]) -> None:
        pipe.evalsha(_SHAS[name], len(keys), *keys, *args)

    def _queue_get(self, pipe: Any, key: str) -> None:
        self._queue(pipe, "get", self._keys(key), [self._known(), *prefix_levels(key)])

    async def _eval(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return (await self._pipeline(lambda pipe: self._queue(pipe, name, keys, args)))[0]

    async def _for_each(self, items: Sequence[Any], queue_one: Callable[[Any, Any], object]) -> list[Any]:
        return await self._pipeline(lambda pipe: [queue_one(pipe, item) for item in items])

    async def _pipeline(self, queue: Callable[[Any], object]) -> list[Any]:
        """Runs what `queue` puts in a pipeline, in one round trip; once more after
        loading the scripts when Redis did not have them (first use, a restart). All of
        it is idempotent."""

        async def run() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                queue(pipe)
                return list(await pipe.execute())

        try:
            return await run()
        except NoScriptError:
            for source in _SCRIPTS.values():
                await self.client.script_load(source)
            return await run()


def _level(parsed: GlobPattern) -> str | None:
    """The prefix level a non-exact pattern invalidates: its own, or its literal
    prefix's deepest; None when it names no namespace (then it is a clear)."""
    levels = prefix_levels(parsed.literal_prefix)
    return parsed.level or (levels[-1] if levels else None)
