"""Redis first, memory when Redis fails, and back without serving what went stale.

    up          every call goes to Redis. A call that fails is re-run on memory at once
                (the caller never sees the failure) and the store goes down.
    down        every call goes to memory, which starts empty and fresh (it refuses
                fills until a relay's Sync gives it a position). A probe pings Redis
                with backoff.
    recovering  Redis answers again, but it missed the log entries applied meanwhile.
                The relays are told Redis's position (GetSyncState), so they send what
                it missed; Syncs go to both stores, reads still to memory. Once Redis
                has applied as much of the log as memory has, the store is up again.

No journal: what Redis missed is in the invalidation log, and the log's relays send
it, as they do for any store behind. Only an invalidation from outside the log (an
operator's, the guide API's without a database) cannot be sent again: one of those
while Redis was away clears Redis before it is used. A Redis that restarted empty is
fresh, and its first Sync clears it; one that restarted from a snapshot has the
snapshot's position, and is sent everything after it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, TypeVar

from redis.exceptions import RedisClusterException, RedisError

from services.cache.sidecar.stores.base import Lookup, NewEntry, StoreStats, Value, merge_namespaces
from services.cache.sidecar.stores.memory import MemoryBackend
from services.cache.sidecar.stores.position import SyncState
from services.cache.sidecar.stores.redis import RedisStore
from services.common.background import cancel_and_wait

log = logging.getLogger(__name__)

T = TypeVar("T")
State = Literal["up", "down", "recovering"]

# What counts as "Redis failed" (as opposed to a bad request, which the stores raise
# as InvalidArgument before talking to Redis). A Redis Cluster client raises some
# failures (no node reachable, a slot not covered) outside RedisError.
BACKEND_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)
PROBE_INITIAL = 0.1
# Short, so a Redis that answers again is in use within a second even after a long
# outage: a probe is one connection attempt.
PROBE_MAX = 0.5


class FallbackStore:
    def __init__(
        self,
        primary: RedisStore,
        memory: MemoryBackend,
        *,
        memory_ttl: float,
        probe_initial: float = PROBE_INITIAL,
        probe_max: float = PROBE_MAX,
    ) -> None:
        if memory_ttl <= 0:
            raise ValueError("memory_ttl must be positive")
        self.primary = primary
        self.memory = memory
        self._memory_ttl = memory_ttl
        self._probe_initial = probe_initial
        self._probe_max = probe_max
        self._state: State = "up"
        # Set when memory took an invalidation from outside the log while Redis was away.
        self._must_clear = False
        self._probe: asyncio.Task[None] | None = None
        self._closed = False
        self.errors = 0
        self.switches = 0

    @property
    def backend(self) -> str:
        """The backend serving reads now: the gauge operators watch."""
        return "redis" if self._state == "up" else "memory"

    @property
    def state(self) -> State:
        return self._state

    async def start(self) -> None:
        """Checks Redis once; starting while it is down starts in memory."""
        self.memory.start()
        try:
            await self.primary.sync_state()
        except BACKEND_ERRORS as exc:
            self._go_down(exc)

    # --- the Store operations --------------------------------------------------------

    async def get(self, key: str) -> Lookup:
        return await self._route(lambda: self.primary.get(key), lambda: self.memory.get(key))

    async def get_many(self, keys: Sequence[str]) -> dict[str, Value]:
        return await self._route(lambda: self.primary.get_many(keys), lambda: self.memory.get_many(keys))

    async def set(
        self, key: str, value: bytes, content_type: str, ttl: float = 0.0, version: int | None = None, negative: bool = False
    ) -> bool:
        return await self._route(
            lambda: self.primary.set(key, value, content_type, ttl, version, negative),
            lambda: self._outside_log(version is None, self.memory.set(key, value, content_type, self._capped(ttl), version, negative)),
        )

    async def set_many(self, entries: Sequence[NewEntry], ttl: float = 0.0) -> int:
        return await self._route(
            lambda: self.primary.set_many(entries, ttl),
            lambda: self._outside_log(True, self.memory.set_many(entries, self._capped(ttl))),
        )

    async def delete(self, key: str) -> bool:
        return await self._route(lambda: self.primary.delete(key), lambda: self._outside_log(True, self.memory.delete(key)))

    async def remove(self, patterns: Sequence[str]) -> int:
        return await self._route(
            lambda: self.primary.remove(patterns),
            lambda: self._outside_log(True, self.memory.remove(patterns)),
        )

    async def clear(self) -> int:
        return await self._route(self.primary.clear, lambda: self._outside_log(True, self.memory.clear()))

    async def sync_state(self) -> SyncState:
        if self._state == "recovering":
            # What Redis has applied: the relays send it what lies after.
            return await self._guarded(self.primary.sync_state(), self.memory.sync_state)
        return await self._route(self.primary.sync_state, self.memory.sync_state)

    async def sync(self, after: int, through: int, patterns: Sequence[str], clear: bool) -> SyncState:
        if self._state != "recovering":
            return await self._route(
                lambda: self.primary.sync(after, through, patterns, clear),
                lambda: self.memory.sync(after, through, patterns, clear),
            )
        # Memory may be ahead of `after` (it took the entries Redis missed): any Sync
        # continues it. Redis checks `after` against its own position.
        ours = self.memory.store.position
        await self.memory.sync(min(after, ours.applied), through, patterns, clear)
        state = await self._guarded(self.primary.sync(after, through, patterns, clear), self.memory.sync_state)
        if self._state == "recovering":
            try:
                await self._up_if_caught_up(state)
            except BACKEND_ERRORS as exc:
                self._go_down(exc)
        return state

    async def stats(self) -> StoreStats:
        memory = await self.memory.stats()
        active = memory
        if self._state == "up":
            try:
                active = await self.primary.stats()
            except BACKEND_ERRORS as exc:
                self._go_down(exc)
        counted = self.primary.local_stats()
        evictions = dict(memory.evictions)
        if active is not memory:
            evictions = {reason: count + active.evictions.get(reason, 0) for reason, count in evictions.items()}
        return StoreStats(
            hits=memory.hits + counted.hits,
            misses=memory.misses + counted.misses,
            entries=active.entries,
            bytes=active.bytes,
            sets=memory.sets + counted.sets,
            invalidations=memory.invalidations + counted.invalidations,
            evictions=evictions,
            namespaces=merge_namespaces(memory.namespaces, counted.namespaces),
            backend=self.backend,
            backend_errors=self.errors,
            backend_switches=self.switches,
        )

    def entry_violations(self, key: str, value: bytes, content_type: str) -> list[tuple[str, str]]:
        # Memory's checks include Redis's plus its own byte budget: an entry must fit
        # both, since either may be the one to store it.
        return self.memory.entry_violations(key, value, content_type)

    async def close(self) -> None:
        self._closed = True
        probe, self._probe = self._probe, None
        if probe is not None:
            await cancel_and_wait(probe)
        await self.memory.close()
        await self.primary.close()

    # --- routing and recovery --------------------------------------------------------

    async def _route(self, on_primary: Callable[[], Awaitable[T]], on_memory: Callable[[], Awaitable[T]]) -> T:
        """Runs on Redis while it is up; on memory otherwise, including right after a
        Redis failure in this very call."""
        if self._state == "up":
            try:
                return await on_primary()
            except BACKEND_ERRORS as exc:
                self._go_down(exc)
        return await on_memory()

    async def _guarded(self, on_primary: Awaitable[T], on_memory: Callable[[], Awaitable[T]]) -> T:
        try:
            return await on_primary
        except BACKEND_ERRORS as exc:
            self._go_down(exc)
            return await on_memory()

    async def _outside_log(self, outside: bool, call: Awaitable[T]) -> T:
        """A change memory takes that the log cannot send Redis again."""
        if outside:
            self._must_clear = True
        return await call

    def _capped(self, ttl: float) -> float:
        """Other sidecars cannot tell this one about their invalidations while Redis
        is away: that bounds how stale their entries here can get."""
        return min(ttl, self._memory_ttl) if ttl > 0 else self._memory_ttl

    def _go_down(self, exc: BaseException) -> None:
        self.errors += 1
        if self._state == "up":
            self.switches += 1
            log.warning("cache: Redis failed (%s: %s); serving from memory until it answers again", type(exc).__name__, exc)
            # Empty and fresh: it takes fills again once a relay gives it a position.
            self.memory.store.reset()
        self._state = "down"
        if not self._closed and (self._probe is None or self._probe.done()):
            # No context of the call that failed goes along (its metadata is gone with it).
            self._probe = asyncio.create_task(self._probe_until_recovered(), context=contextvars.Context())

    async def _up_if_caught_up(self, redis_state: SyncState) -> None:
        """Back to Redis once it has applied as much of the log as memory has (and
        lost what only memory was told: invalidations from outside the log)."""
        ours = self.memory.store.position
        if not (ours.fresh or (not redis_state.fresh and redis_state.applied >= ours.applied)):
            self._state = "recovering"
            return
        if self._must_clear:
            log.warning("cache: invalidations outside the log were made while Redis was away; clearing it")
            await self.primary.clear()
            self._must_clear = False
        self._state = "up"
        self.switches += 1
        self.memory.store.reset()
        log.warning("cache: Redis answers again and has caught up with the log; serving from it")

    async def _probe_until_recovered(self) -> None:
        delay = self._probe_initial
        while not self._closed and self._state == "down":
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._probe_max)
            try:
                await self.primary.reset_connections()
                await self._up_if_caught_up(await self.primary.sync_state())
            except BACKEND_ERRORS as exc:
                self._state = "down"
                self.errors += 1
                log.debug("cache: Redis still unavailable: %s", exc)
                continue
            if self.state == "recovering":  # the property: mypy keeps "down" narrowed on the field
                log.warning("cache: Redis answers again but missed log entries: the relays catch it up before it is used")
