"""The Redis store: shared by every sidecar process, O(1) prefix invalidation by
generation counters, lease tokens against stale fills.

Key layout and record format: redis_layout.py and docs/cache.md.

Why leases live in the entry's own key: a glob invalidation walks the keyspace with
SCAN, which is only guaranteed to return keys that exist for the whole walk. A miss
writes its lease into the very key its fill will overwrite, so from the miss to the
fill that key exists without a gap, and an invalidation that ran in between has
either removed the lease (the fill is refused) or the filled value (gone anyway).

Every failure of Redis (refused, timed out, OOM, …) is raised to the caller: the
fallback store decides what to do about it. Commands are never retried here, so a
failure surfaces within one socket timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import random
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from services.cache_sidecar.stores import redis_position as position_scripts
from services.cache_sidecar.stores.base import (
    REDIS_TOKEN_BIT,
    Found,
    HitCounter,
    Lookup,
    NewEntry,
    StoreStats,
    Value,
    entry_violations,
    jittered,
)
from services.cache_sidecar.stores.position import FRESH, SyncState, position_behind
from services.cache_sidecar.stores.redis_layout import KeyLayout, parse_record, value_body
from services.common.cache.keys import MAX_VALUE_BYTES, escape_key, namespace_of, parse_pattern, prefix_levels
from services.common.errors import invalid_fields

# How long a count of the store's records and bytes (a SCAN of the keyspace) is reused.
CENSUS_MAX_AGE = 5.0
# SCAN batch size: large enough that a walk of 1M keys is a few thousand round trips.
SCAN_COUNT = 1000
UNLINK_BATCH = 1000
# A miss's lease outlives any sane loader; a fill arriving later is dropped.
LEASE_SECONDS = 30.0
# Fills of a hit are refused: this token is never issued as a lease (leases have
# their lowest bit set).
HIT_TOKEN = REDIS_TOKEN_BIT

# A generation hash lives this long after the last write to its namespace, so the
# hashes of namespaces no longer used go away. Expiring is safe: it comes back with a
# new incarnation id, and records stamped with the old one never match again.
GENERATIONS_TTL_MS = 24 * 3600 * 1000

# The current stamp of a key: its namespace's incarnation id and the counters of its
# prefix levels. `fresh` becomes the id only if the generation hash has none.
_STAMP = """
local function keep(generations)
  redis.call('PEXPIRE', generations, GENERATIONS_TTL_MS)
end
local function stamp(generations, fresh, levels)
  local values = redis.call('HMGET', generations, '#', unpack(levels))
  local id = values[1]
  if not id then
    id = fresh
    redis.call('HSET', generations, '#', id)
    keep(generations)
  end
  local parts = {id}
  for i = 2, #values do parts[i] = values[i] or '0' end
  return table.concat(parts, '.')
end
local function argv_from(first)
  local rest = {}
  for i = first, #ARGV do rest[#rest + 1] = ARGV[i] end
  return rest
end
local function split(record)
  local bar = string.find(record, '|', 2, true)
  return string.sub(record, 1, 1), string.sub(record, 2, bar - 1), string.sub(record, bar + 1)
end
"""

# KEYS: entry, generations, position. ARGV: fresh id, lease token, lease ms, levels…
# → {1, record} on a hit; {0, token} on a miss (an existing live lease is shared), and
# {0, '0'} (no lease) while the store is fresh: it has no position in the log.
_GET = _STAMP + """
local current = stamp(KEYS[2], ARGV[1], argv_from(4))
local record = redis.call('GET', KEYS[1])
local kind, recorded, rest
if record then
  kind, recorded, rest = split(record)
  if recorded == current and kind ~= 'L' then return {1, record} end
end
if redis.call('EXISTS', KEYS[3]) == 0 then return {0, '0'} end
if record and recorded == current then return {0, rest} end
redis.call('SET', KEYS[1], 'L' .. current .. '|' .. ARGV[2], 'PX', ARGV[3])
return {0, ARGV[2]}
"""

# KEYS: entry, generations, position. ARGV: fresh id, token ('' = unconditional), ttl
# ms, kind, body, levels… → 1 stored, 0 refused (the lease is gone, replaced or
# outdated, or the store is fresh).
_SET = _STAMP + """
local current = stamp(KEYS[2], ARGV[1], argv_from(6))
keep(KEYS[2])
if ARGV[2] ~= '' then
  if redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
  local record = redis.call('GET', KEYS[1])
  if not record then return 0 end
  local kind, recorded, rest = split(record)
  if kind ~= 'L' or recorded ~= current or rest ~= ARGV[2] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[4] .. current .. '|' .. ARGV[5], 'PX', ARGV[3])
return 1
"""

# Unconditional sets of one namespace. KEYS: generations, entries…. ARGV: fresh id,
# then per entry: ttl ms, kind, body, level count, levels… → how many were stored.
_SET_MANY = _STAMP + """
local at = 2
local stamps = {}
for k = 2, #KEYS do
  local ttl, kind, body, count = ARGV[at], ARGV[at + 1], ARGV[at + 2], tonumber(ARGV[at + 3])
  local levels = {}
  for j = 1, count do levels[j] = ARGV[at + 3 + j] end
  at = at + 4 + count
  local levels_key = table.concat(levels, '\0')
  local current = stamps[levels_key]
  if not current then
    current = stamp(KEYS[1], ARGV[1], levels)
    stamps[levels_key] = current
  end
  redis.call('SET', KEYS[k], kind .. current .. '|' .. body, 'PX', ttl)
end
keep(KEYS[1])
return #KEYS - 1
"""

# KEYS: entry → 1 when it held a value or a negative entry, 0 for a lease or nothing.
_DELETE = """
local kind = redis.call('GETRANGE', KEYS[1], 0, 0)
redis.call('UNLINK', KEYS[1])
if kind == 'V' or kind == 'N' then return 1 end
return 0
"""

_SCRIPTS = {
    **{
        name: source.replace("GENERATIONS_TTL_MS", str(GENERATIONS_TTL_MS))
        for name, source in {"get": _GET, "set": _SET, "set_many": _SET_MANY, "delete": _DELETE}.items()
    },
    **position_scripts.SCRIPTS,
}
# EVALSHA names a script by the SHA-1 of its source, known without asking Redis; a
# Redis that does not have it yet (first use, restart) answers NOSCRIPT, and the
# scripts are loaded then.
_SHAS = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in _SCRIPTS.items()}


def connect(url: str, *, max_connections: int, timeout: float) -> aioredis.Redis:
    """A client over a bounded, blocking pool: at most max_connections sockets, and a
    caller waits at most `timeout` for one, to connect, and for each reply."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    return aioredis.Redis(connection_pool=pool)


class RedisStore:
    backend = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        default_ttl: float,
        negative_ttl: float | None = None,
        layout: KeyLayout | None = None,
        max_value_bytes: int = MAX_VALUE_BYTES,
        lease_seconds: float = LEASE_SECONDS,
        origin: str | None = None,
        rand: Callable[[], float] = random.random,
        census_max_age: float = CENSUS_MAX_AGE,
    ) -> None:
        self.client = client
        self.layout = layout or KeyLayout()
        # Tells this sidecar's own Pub/Sub messages from other sidecars'.
        self.origin = origin or secrets.token_hex(8)
        self._default_ttl = default_ttl
        self._negative_ttl = min(default_ttl, 30.0) if negative_ttl is None else negative_ttl
        self._max_value_bytes = max_value_bytes
        self._lease_ms = str(int(lease_seconds * 1000))
        self._rand = rand
        self._counter = HitCounter()
        self._sets = 0
        self._invalidations = 0
        self._census_max_age = census_max_age
        self._census_lock = asyncio.Lock()
        self._census_value: tuple[int, int] | None = None
        self._census_at = 0.0

    # --- reads -----------------------------------------------------------------------

    async def get(self, key: str) -> Lookup:
        token = REDIS_TOKEN_BIT | secrets.randbits(62) | 1
        levels = prefix_levels(key)
        keys = [self.layout.data_key(key), self.layout.generations_key(namespace_of(key)), self.layout.position]
        hit, body = await self._eval("get", keys, [_fresh_id(), str(token), self._lease_ms, *levels])
        if hit:
            self._counter.count(namespace_of(key), hit=True)
            record = parse_record(body)
            content_type, value = record.content()
            return Lookup(Found(value, content_type, record.kind == "N"), HIT_TOKEN)
        self._counter.count(namespace_of(key), hit=False)
        return Lookup(None, int(body))

    async def get_many(self, keys: Sequence[str]) -> dict[str, Value]:
        """One MGET for the entries and, in the same round trip, one HMGET per
        namespace for the stamps they must carry to be current."""
        if not keys:
            return {}
        levels_of = {key: prefix_levels(key) for key in keys}
        fields: dict[str, list[str]] = {}
        for key, levels in levels_of.items():
            wanted = fields.setdefault(namespace_of(key), [])
            wanted.extend(level for level in levels if level not in wanted)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.mget([self.layout.data_key(key) for key in keys])
            for namespace, wanted in fields.items():
                pipe.hmget(self.layout.generations_key(namespace), ["#", *wanted])
            records, *generations = await pipe.execute()
        current: dict[str, dict[str, bytes] | None] = {}
        for (namespace, wanted), values in zip(fields.items(), generations):
            identity, *counters = values
            current[namespace] = None if identity is None else {"#": identity, **dict(zip(wanted, counters))}
        found: dict[str, Value] = {}
        for key, raw in zip(keys, records):
            namespace = namespace_of(key)
            hit = False
            if raw is not None and raw[:1] != b"L" and (gens := current[namespace]) is not None:
                stamp = b".".join([gens["#"], *(gens[level] or b"0" for level in levels_of[key])])
                record = parse_record(raw)
                if record.stamp == stamp:
                    content_type, value = record.content()
                    found[key] = Found(value, content_type, record.kind == "N")
                    hit = True
            self._counter.count(namespace, hit=hit)
        return found

    # --- writes ----------------------------------------------------------------------

    def entry_violations(self, key: str, value: bytes, content_type: str) -> list[tuple[str, str]]:
        return entry_violations(key, value, content_type, self._max_value_bytes)

    async def set(
        self, key: str, value: bytes, content_type: str, ttl: float = 0.0, fill_token: int = 0, negative: bool = False
    ) -> bool:
        """A fill (with a lease token) or an overwrite (without one). Overwrites are
        published, since other sidecars' near-caches may hold the value replaced."""
        entry = NewEntry(key, value, content_type, negative)
        self._check(entry)
        if fill_token and not fill_token & REDIS_TOKEN_BIT:
            return False  # issued by another store: cannot be checked here
        keys = [self.layout.data_key(key), self.layout.generations_key(namespace_of(key)), self.layout.position]
        ttl_ms, kind, body = self._record_parts(entry, ttl)
        args = [_fresh_id(), str(fill_token) if fill_token else "", ttl_ms, kind, body, *prefix_levels(key)]
        if fill_token:
            stored = bool(await self._eval("set", keys, args))
        else:
            stored = bool((await self._pipeline_eval([("set", keys, args)], publish=[escape_key(key)]))[0])
        self._sets += stored
        return stored

    async def set_many(self, entries: Sequence[NewEntry], ttl: float = 0.0) -> int:
        """Unconditional sets in one round trip: one script per namespace, and one
        message telling the other sidecars."""
        for entry in entries:
            self._check(entry)
        if not entries:
            return 0
        by_namespace: dict[str, tuple[list[str], list[Any]]] = {}
        for entry in entries:
            namespace = namespace_of(entry.key)
            keys, args = by_namespace.setdefault(namespace, ([self.layout.generations_key(namespace)], [_fresh_id()]))
            keys.append(self.layout.data_key(entry.key))
            levels = prefix_levels(entry.key)
            args.extend([*self._record_parts(entry, ttl), len(levels), *levels])
        calls = [("set_many", keys, args) for keys, args in by_namespace.values()]
        results = await self._pipeline_eval(calls, publish=[escape_key(entry.key) for entry in entries])
        stored = sum(int(result) for result in results[: len(calls)])
        self._sets += stored
        return stored

    async def delete(self, key: str) -> bool:
        self._invalidations += 1
        (deleted,) = await self._pipeline_eval([("delete", [self.layout.data_key(key)], [])], publish=[escape_key(key)])
        return bool(deleted)

    async def invalidate(self, pattern: str) -> int:
        """Exact keys are deleted, prefix levels bumped (O(1): -1, the count is not
        known), other globs removed by SCAN in batches; "*" is a clear."""
        return await self.invalidate_many([pattern])

    async def invalidate_many(self, patterns: Sequence[str], sequence: int = 0) -> int:
        """Several patterns: the globs scanned one after another, then in one round
        trip every prefix level's bump, every exact key's delete, the script that
        records log entry `sequence` as applied (last, so it runs only after the
        rest), and one message to the other sidecars. Removals commute, so their
        order does not matter; a "*" is a clear, which covers the rest."""
        patterns = list(dict.fromkeys(patterns))
        removed = 0
        calls: list[tuple[str, list[str], list[Any]]] = []
        levels: list[str] = []
        if "*" in patterns:
            removed, patterns = await self.clear(), []
        for pattern in patterns:
            parsed = parse_pattern(pattern)
            if parsed.kind == "exact":
                calls.append(("delete", [self.layout.data_key(pattern)], []))
            elif parsed.level is not None:
                levels.append(parsed.level)
            else:
                removed += await self._unlink_matching(self.layout.data_match(parsed.literal_prefix), parsed.matches)
        self._invalidations += len(patterns)
        deletes = len(calls)
        if sequence:
            calls.append(("position_record", self._position_keys(), [sequence]))
        if calls or levels or patterns:
            results = await self._pipeline_eval(calls, levels=levels, publish=patterns)
            removed += sum(int(deleted) for deleted in results[:deletes])
        return -1 if levels else removed

    async def clear(self) -> int:
        """Every namespace gets a new incarnation at once (its generation hash goes),
        then the records themselves are reclaimed by SCAN."""
        self._invalidations += 1
        await self._unlink_matching(self.layout.generations_match(), None, command="delete")
        removed = await self._unlink_matching(self.layout.data_match(""), None)
        await self.client.publish(self.layout.channel, self._message("*"))
        return removed

    # --- the invalidation log ---------------------------------------------------------

    async def sync_state(self) -> SyncState:
        return _state(await self._eval("position_state", self._position_keys(), []))

    async def sync(self, after: int, through: int, patterns: Sequence[str], clear: bool) -> SyncState:
        """Applies the patterns (or clears), then moves the shared position in one
        script, which also makes the check: patterns applied for a Sync it refuses
        cost nothing but misses."""
        if clear:
            await self.clear()
        elif patterns:
            await self.invalidate_many(patterns)
        reply = await self._eval("position_sync", self._position_keys(), [after, through])
        if not reply[0]:
            raise position_behind(int(reply[1]), after)
        return _state(reply)

    async def forget_position(self) -> None:
        """Makes the store fresh: it hands out no fill tokens until a Sync."""
        await self.client.delete(*self._position_keys())

    def _position_keys(self) -> list[str]:
        return [self.layout.position, self.layout.position_ahead]

    # --- stats and lifecycle ---------------------------------------------------------

    def local_stats(self) -> StoreStats:
        """What this process counted itself, with no Redis round trip (entries and
        bytes are left at 0): the fallback store adds these up while Redis is away."""
        return StoreStats(
            hits=self._counter.hits,
            misses=self._counter.misses,
            entries=0,
            bytes=0,
            sets=self._sets,
            invalidations=self._invalidations,
            evictions={"size": 0, "bytes": 0, "ttl": 0},
            namespaces=self._counter.namespaces(),
            backend=self.backend,
        )

    async def stats(self) -> StoreStats:
        """Entries and bytes are this deployment's cache records only, counted under
        its key prefix: the Redis server may hold other applications' keys (and DevOps
        Hub's rate-limit buckets). Records invalidated by a generation bump count until
        their TTL removes them. Redis's eviction and expiry counters are the whole
        server's, so the store reports none of its own (see docs/cache.md)."""
        entries, size = await self._census()
        return dataclasses.replace(self.local_stats(), entries=entries, bytes=size)

    async def _census(self) -> tuple[int, int]:
        """(records, bytes) by SCAN and MEMORY USAGE, one batch per round trip; kept for
        census_max_age seconds, since a walk is O(keyspace) and scrapes come often."""
        now = time.monotonic()
        if self._census_value is not None and now - self._census_at < self._census_max_age:
            return self._census_value
        async with self._census_lock:
            if self._census_value is not None and time.monotonic() - self._census_at < self._census_max_age:
                return self._census_value
            entries = size = 0
            cursor = 0
            while True:
                cursor, names = await self.client.scan(cursor=cursor, match=self.layout.data_match(""), count=SCAN_COUNT)
                if names:
                    async with self.client.pipeline(transaction=False) as pipe:
                        for name in names:
                            pipe.memory_usage(name)
                        usages = [usage for usage in await pipe.execute() if usage is not None]
                    entries += len(usages)
                    size += sum(int(usage) for usage in usages)
                if cursor == 0:
                    break
            self._census_value, self._census_at = (entries, size), time.monotonic()
            return self._census_value

    async def server_id(self) -> str:
        """Redis's run_id: it changes when Redis restarts (and may have reloaded a
        snapshot older than invalidations made since)."""
        info = await self.client.info("server")
        return str(info.get("run_id", ""))

    async def reset_connections(self) -> None:
        """Drops every pooled connection, so the next commands connect afresh: after
        an outage the pool is full of sockets to a Redis that is gone, and each would
        fail once more (each failure a switch to memory) before being replaced."""
        await self.client.connection_pool.disconnect(inuse_connections=True)

    async def close(self) -> None:
        await self.client.aclose()
        await self.client.connection_pool.disconnect()

    # --- internals -------------------------------------------------------------------

    def _check(self, entry: NewEntry) -> None:
        violations = self.entry_violations(entry.key, entry.value, entry.content_type)
        if entry.negative and entry.value:
            violations.append(("value", "must be empty for a negative entry"))
        if violations:
            raise invalid_fields(violations)

    def _record_parts(self, entry: NewEntry, ttl: float) -> tuple[int, str, bytes]:
        """(ttl in ms, jittered; record kind; record body) of an entry to store."""
        ttl = ttl if ttl > 0 else self._default_ttl
        if entry.negative:
            ttl = min(ttl, self._negative_ttl)
        ttl_ms = max(1, int(jittered(ttl, self._rand()) * 1000))
        return ttl_ms, "N" if entry.negative else "V", value_body(entry.content_type, entry.value)

    def _message(self, *patterns: str) -> str:
        """A Pub/Sub message: which sidecar sent it, and the patterns (JSON, since
        a key may hold any character)."""
        return json.dumps([self.origin, list(patterns)])

    async def _load_scripts(self) -> None:
        for source in _SCRIPTS.values():
            await self.client.script_load(source)

    async def _eval(self, name: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.client.evalsha(_SHAS[name], len(keys), *keys, *args)
        except NoScriptError:
            await self._load_scripts()
            return await self.client.evalsha(_SHAS[name], len(keys), *keys, *args)

    async def _pipeline_eval(
        self, calls: list[tuple[str, list[str], list[Any]]], *, levels: Sequence[str] = (), publish: Sequence[str] = ()
    ) -> list[Any]:
        """The prefix levels' counter bumps, then the scripts (in order), then one
        PUBLISH of the patterns, in one round trip; returns the scripts' results.
        A retry after NOSCRIPT runs everything again: all of it is idempotent but the
        bumps, and a bump too many only costs misses."""
        for attempt in (1, 2):
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for level in levels:
                        generations = self.layout.generations_key(namespace_of(level))
                        pipe.hincrby(generations, level, 1)
                        pipe.pexpire(generations, GENERATIONS_TTL_MS)
                    for name, keys, args in calls:
                        pipe.evalsha(_SHAS[name], len(keys), *keys, *args)
                    if publish:
                        pipe.publish(self.layout.channel, self._message(*publish))
                    results = await pipe.execute()
                    return results[2 * len(levels) : 2 * len(levels) + len(calls)]
            except NoScriptError:
                if attempt == 2:
                    raise
                await self._load_scripts()
        raise AssertionError("unreachable: the loop returns or raises")

    async def _unlink_matching(
        self, match: str, keep_if: Callable[[str], Any] | None, *, command: str = "unlink"
    ) -> int:
        """SCAN to the end (never KEYS), removing matches one batch per round trip.

        keep_if filters by cache key (the MATCH pattern is only a superset); without it
        every name the MATCH returns goes.
        """
        removed = 0
        cursor = 0
        while True:
            cursor, names = await self.client.scan(cursor=cursor, match=match, count=SCAN_COUNT)
            if keep_if is not None:
                names = [name for name in names if (key := self.layout.logical_key(name)) is not None and keep_if(key)]
            for start in range(0, len(names), UNLINK_BATCH):
                batch = names[start : start + UNLINK_BATCH]
                if command == "unlink":
                    removed += await self.client.unlink(*batch)
                else:
                    removed += await self.client.delete(*batch)
            if cursor == 0:
                return removed


def _state(reply: list[Any]) -> SyncState:
    """A position script's reply: {status, applied or nil, ahead…}."""
    if reply[1] is None:
        return FRESH
    return SyncState(int(reply[1]), tuple(int(sequence) for sequence in reply[2:]), False)


def _fresh_id() -> str:
    """A new incarnation id, used only if a namespace's generation hash is missing
    (never created, cleared, or evicted by Redis): records stamped with the old id can
    then never match again."""
    return os.urandom(6).hex()
