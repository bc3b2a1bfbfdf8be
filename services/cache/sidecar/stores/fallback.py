"""The sidecar's store: memory alone without Redis; with Redis, Redis first, memory
when it fails, and back without serving what went stale (docs/cache.md, "Fallback",
has its states: up, down, recovering)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, TypeVar

from devops_hub.v1 import cache_pb2
from redis.exceptions import RedisClusterException, RedisError

from services.cache.sidecar.stores.base import Found, Lookup, NewEntry, SyncState
from services.cache.sidecar.stores.memory import MemoryStore
from services.cache.sidecar.stores.redis import RedisStore
from services.common.foundation.background import cancel_and_wait

log = logging.getLogger(__name__)

T = TypeVar("T")
State = Literal["up", "down", "recovering"]

# What counts as "Redis failed" (a bad request is refused before any store sees it). A
# Redis Cluster client raises some failures (no node reachable, a slot not covered)
# outside RedisError.
BACKEND_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)
PROBE_INITIAL = 0.1
# Short, so a Redis that answers again is in use within a second even after a long
# outage: a probe is one connection attempt.
PROBE_MAX = 0.5
# How often memory reclaims dead entries when no writes arrive to do it.
MAINTENANCE_INTERVAL = 1.0


class FallbackStore:
    def __init__(self, primary: RedisStore | None, memory: MemoryStore, *, memory_ttl: float) -> None:
        if memory_ttl <= 0:
            raise ValueError("memory_ttl must be positive")
        self.primary = primary
        self.memory = memory
        if primary is not None:
            primary.counts = memory.counts  # one set of figures, whichever served
        self._memory_ttl = memory_ttl
        self.state: State = "down" if primary is None else "up"
        # Set when memory took an invalidation from outside the log while Redis was away.
        self._must_clear = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closed = False
        self.errors = 0
        self.switches = 0

    @property
    def backend(self) -> str:
        return "redis" if self.state == "up" else "memory"

    async def start(self) -> None:
        """Starts memory's upkeep. (The first call finds out whether Redis answers.)"""
        if "maintenance" not in self._tasks:
            self._tasks["maintenance"] = asyncio.create_task(self._maintain_forever())

    # --- the operations CacheService needs -------------------------------------------

    async def get(self, key: str) -> Lookup:
        return await self._route(lambda redis: redis.get(key), lambda memory: Lookup(memory.get(key), memory.position.applied))

    async def get_many(self, keys: Sequence[str]) -> dict[str, Found]:
        def on_memory(memory: MemoryStore) -> dict[str, Found]:
            return {key: entry for key in keys if (entry := memory.get(key)) is not None}

        return await self._route(lambda redis: redis.get_many(keys), on_memory)

    async def set(
        self, key: str, value: bytes, content_type: str, ttl: float = 0.0, version: int | None = None, negative: bool = False
    ) -> bool:
        return await self._route(
            lambda redis: redis.set(key, value, content_type, ttl, version, negative),
            lambda memory: memory.set(key, value, content_type, self._capped(ttl), version, negative),
            outside_log=version is None,
        )

    async def set_many(self, entries: Sequence[NewEntry], ttl: float = 0.0) -> int:
        def on_memory(memory: MemoryStore) -> int:
            return sum(memory.set(e.key, e.value, e.content_type, self._capped(ttl), None, e.negative) for e in entries)

        return await self._route(lambda redis: redis.set_many(entries, ttl), on_memory, outside_log=True)

    async def remove(self, patterns: Sequence[str]) -> int:
        return await self._route(
            lambda redis: redis.remove(patterns),
            lambda memory: sum(memory.invalidate(pattern) for pattern in patterns),
            outside_log=True,
        )

    async def clear(self) -> int:
        return await self._route(lambda redis: redis.clear(), lambda memory: memory.clear(), outside_log=True)

    async def sync_state(self) -> SyncState:
        # While recovering, what Redis has applied: the relays send it what lies after.
        return await self._route(
            lambda redis: redis.sync_state(), lambda memory: memory.position, on_redis_while=("up", "recovering")
        )

    async def sync(self, after: int, through: int, patterns: Sequence[str], clear: bool) -> SyncState:
        if self.state != "recovering":
            return await self._route(
                lambda redis: redis.sync(after, through, patterns, clear),
                lambda memory: memory.sync(after, through, patterns, clear),
            )
        # Memory may be ahead of `after` (it took the entries Redis missed): any Sync
        # continues it. Redis checks `after` against its own position.
        on_memory = self.memory.sync(min(after, self.memory.position.applied), through, patterns, clear)

        async def on_redis(redis: RedisStore) -> SyncState:
            state = await redis.sync(after, through, patterns, clear)
            if self.state == "recovering":
                await self._up_if_caught_up(redis, state)
            return state

        return await self._route(on_redis, lambda _: on_memory, on_redis_while=("recovering",))

    async def stats(self) -> cache_pb2.CacheStats:
        memory = self.memory.stats()
        stats = await self._route(lambda redis: redis.stats(), lambda _: memory)
        # Only memory counts evictions: Redis's counters are the whole server's.
        stats.evictions.update(memory.evictions)
        stats.backend, stats.backend_errors, stats.backend_switches = self.backend, self.errors, self.switches
        return stats

    def entry_violations(self, key: str, value: bytes, content_type: str, negative: bool) -> list[tuple[str, str]]:
        # Memory's checks include Redis's plus its own byte budget: an entry must fit
        # both, since either may be the one to store it.
        return self.memory.entry_violations(key, value, content_type, negative)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks.values()):
            await cancel_and_wait(task)
        if self.primary is not None:
            await self.primary.close()

    # --- routing and recovery --------------------------------------------------------

    async def _route(
        self,
        on_redis: Callable[[RedisStore], Awaitable[T]],
        on_memory: Callable[[MemoryStore], T],
        *,
        on_redis_while: tuple[State, ...] = ("up",),
        outside_log: bool = False,
    ) -> T:
        """Runs on Redis in the states named; on memory otherwise, including right after
        a Redis failure in this very call."""
        if self.primary is not None and self.state in on_redis_while:
            try:
                return await on_redis(self.primary)
            except BACKEND_ERRORS as exc:
                self._go_down(self.primary, exc)
        # A change memory takes that the log cannot send Redis again.
        self._must_clear |= outside_log
        return on_memory(self.memory)

    def _capped(self, ttl: float) -> float:
        """Other sidecars cannot tell this one about their invalidations while Redis
        is away: that bounds how stale their entries here can get."""
        if self.primary is None:
            return ttl
        return min(ttl, self._memory_ttl) if ttl > 0 else self._memory_ttl

    def _go_down(self, redis: RedisStore, exc: BaseException) -> None:
        self.errors += 1
        if self.state == "up":
            self.switches += 1
            log.warning("cache: Redis failed (%s: %s); serving from memory until it answers again", type(exc).__name__, exc)
            # Empty and fresh: it takes fills again once a relay gives it a position.
            self.memory.reset()
        self.state = "down"
        probe = self._tasks.get("probe")
        if not self._closed and (probe is None or probe.done()):
            # No context of the call that failed goes along (its metadata is gone with it).
            self._tasks["probe"] = asyncio.create_task(self._probe_until_recovered(redis), context=contextvars.Context())

    async def _up_if_caught_up(self, redis: RedisStore, redis_state: SyncState) -> None:
        """Back to Redis once it has applied as much of the log as memory has (and
        lost what only memory was told: invalidations from outside the log)."""
        ours = self.memory.position
        if not (ours.fresh or (not redis_state.fresh and redis_state.applied >= ours.applied)):
            if self.state == "down":
                log.warning("cache: Redis answers again but missed log entries: the relays catch it up before it is used")
            self.state = "recovering"
            return
        if self._must_clear:
            log.warning("cache: invalidations outside the log were made while Redis was away; clearing it")
            await redis.clear()
            self._must_clear = False
        self.state = "up"
        self.switches += 1
        self.memory.reset()
        log.warning("cache: Redis answers again and has caught up with the log; serving from it")

    async def _probe_until_recovered(self, redis: RedisStore) -> None:
        delay = PROBE_INITIAL
        while not self._closed and self.state == "down":
            await asyncio.sleep(delay)
            delay = min(delay * 2, PROBE_MAX)
            try:
                await redis.reset_connections()
                await self._up_if_caught_up(redis, await redis.sync_state())
            except BACKEND_ERRORS as exc:
                self.state = "down"
                self.errors += 1
                log.debug("cache: Redis still unavailable: %s", exc)

    async def _maintain_forever(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            self.memory.maintain()
