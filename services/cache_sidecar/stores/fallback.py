"""Redis first, memory when Redis fails, and back without serving what went stale.

States:

    up          every call goes to Redis. A call that fails is re-run on memory at once
                (the caller never sees the failure) and the store goes down.
    down        every call goes to memory; invalidations are also journaled. A probe
                pings Redis with backoff.
    recovering  the probe got an answer: the journal is replayed into Redis (or, if
                Redis restarted or the journal overflowed, everything under our prefix
                is cleared), then the store switches back to up in the same step that
                sees the journal empty, so no invalidation can slip between the two.

Why replay: while Redis was away it kept entries that this sidecar invalidated (in
memory) meanwhile; serving them again after the switch back would be a stale read.
Why a restart means a clear: a Redis that restarted from a snapshot may hold entries
whose invalidation happened after the snapshot was taken.

Memory is cleared whenever the store comes back up, so it is empty whenever the store
goes down: it never serves an entry that was invalidated through Redis meanwhile, and
the memory goes back while Redis serves. Its entries live at most `memory_ttl`: other sidecars cannot tell this one about
their invalidations while Redis is down, so that bounds how stale they can get.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, TypeVar

from redis.exceptions import RedisError

from services.common.cache.keys import escape_key
from services.cache_sidecar.stores.base import (
    REDIS_TOKEN_BIT,
    Lookup,
    NewEntry,
    StoreStats,
    Value,
    merge_namespaces,
)
from services.cache_sidecar.stores.memory import MemoryBackend
from services.cache_sidecar.stores.redis import RedisStore

log = logging.getLogger(__name__)

T = TypeVar("T")
State = Literal["up", "down", "recovering"]

# What counts as "Redis failed" (as opposed to a bad request, which the stores raise
# as InvalidArgument before talking to Redis).
BACKEND_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
DEFAULT_JOURNAL = 10_000
PROBE_INITIAL = 0.1
PROBE_MAX = 2.0


class FallbackStore:
    def __init__(
        self,
        primary: RedisStore,
        memory: MemoryBackend,
        *,
        memory_ttl: float,
        journal_size: int = DEFAULT_JOURNAL,
        probe_initial: float = PROBE_INITIAL,
        probe_max: float = PROBE_MAX,
    ) -> None:
        if memory_ttl <= 0 or journal_size < 1:
            raise ValueError("memory_ttl and journal_size must be positive")
        self.primary = primary
        self.memory = memory
        self._memory_ttl = memory_ttl
        self._journal: collections.deque[str] = collections.deque()
        self._journal_size = journal_size
        # Set when the journal overflowed or Redis restarted: replaying is not enough.
        self._must_clear = False
        self._probe_initial = probe_initial
        self._probe_max = probe_max
        self._state: State = "up"
        self._server_id: str | None = None
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

    @property
    def journal(self) -> tuple[str, ...]:
        """Invalidations Redis has yet to receive."""
        return tuple(self._journal)

    async def start(self) -> None:
        """Checks Redis once; starting while it is down starts in memory."""
        self.memory.start()
        try:
            self._server_id = await self.primary.server_id()
        except BACKEND_ERRORS as exc:
            self._go_down(exc)

    # --- the Store operations --------------------------------------------------------

    async def get(self, key: str) -> Lookup:
        return await self._route(lambda: self.primary.get(key), lambda: self.memory.get(key))

    async def get_many(self, keys: Sequence[str]) -> dict[str, Value]:
        return await self._route(lambda: self.primary.get_many(keys), lambda: self.memory.get_many(keys))

    async def set(
        self, key: str, value: bytes, content_type: str, ttl: float = 0.0, fill_token: int = 0, negative: bool = False
    ) -> bool:
        async def on_memory() -> bool:
            if fill_token & REDIS_TOKEN_BIT:
                return False  # Redis issued it and cannot vouch for it now: drop the fill.
            return await self.memory.set(key, value, content_type, self._capped(ttl), fill_token, negative)

        return await self._route(lambda: self.primary.set(key, value, content_type, ttl, fill_token, negative), on_memory)

    async def set_many(self, entries: Sequence[NewEntry], ttl: float = 0.0) -> int:
        return await self._route(
            lambda: self.primary.set_many(entries, ttl), lambda: self.memory.set_many(entries, self._capped(ttl))
        )

    async def delete(self, key: str) -> bool:
        async def on_memory() -> bool:
            self._append(escape_key(key))  # replayed as a pattern: it must match only this key
            return await self.memory.delete(key)

        return await self._route(lambda: self.primary.delete(key), on_memory, invalidation=True)

    async def invalidate(self, pattern: str) -> int:
        async def on_memory() -> int:
            self._append(pattern)
            return await self.memory.invalidate(pattern)

        return await self._route(lambda: self.primary.invalidate(pattern), on_memory, invalidation=True)

    async def clear(self) -> int:
        async def on_memory() -> int:
            self._journal.clear()
            self._must_clear = True
            return await self.memory.clear()

        return await self._route(self.primary.clear, on_memory, invalidation=True)

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
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
        if self._journal or self._must_clear:
            log.warning(
                "cache: closing with %s never applied to Redis",
                "a clear" if self._must_clear else f"{len(self._journal)} invalidations",
            )
        await self.memory.close()
        await self.primary.close()

    # --- routing and recovery --------------------------------------------------------

    async def _route(
        self,
        on_primary: Callable[[], Awaitable[T]],
        on_memory: Callable[[], Awaitable[T]],
        *,
        invalidation: bool = False,
    ) -> T:
        """Runs on Redis while it is up; on memory otherwise, including right after a
        Redis failure in this very call. An invalidation that failed on Redis may or
        may not have reached it: on_memory journals it, and replaying is harmless."""
        if self._state == "up":
            try:
                result = await on_primary()
            except BACKEND_ERRORS as exc:
                self._go_down(exc)
            else:
                if invalidation and self._state != "up":
                    # Redis went away while this was in flight, and memory (cleared
                    # then) may since have taken a fill this invalidation covers.
                    await on_memory()
                return result
        return await on_memory()

    def _append(self, pattern: str) -> None:
        if self._must_clear:
            return  # a clear is still to come: it covers this pattern too
        self._journal.append(pattern)
        if len(self._journal) > self._journal_size:
            log.warning(
                "cache: more than %d invalidations while Redis is away; it will be cleared on return",
                self._journal_size,
            )
            self._journal.clear()
            self._must_clear = True

    def _capped(self, ttl: float) -> float:
        return min(ttl, self._memory_ttl) if ttl > 0 else self._memory_ttl

    def _go_down(self, exc: BaseException) -> None:
        self.errors += 1
        if self._state == "up":
            self.switches += 1
            log.warning(
                "cache: Redis failed (%s: %s); serving from memory until it answers again", type(exc).__name__, exc
            )
        self._state = "down"
        if not self._closed and (self._probe is None or self._probe.done()):
            self._probe = asyncio.create_task(self._probe_until_recovered())

    async def _probe_until_recovered(self) -> None:
        delay = self._probe_initial
        while not self._closed:
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._probe_max)
            try:
                await self.primary.reset_connections()
                server_id = await self.primary.server_id()
                self._state = "recovering"
                if self._server_id is not None and server_id != self._server_id:
                    log.warning("cache: Redis restarted while away; clearing it before use")
                    self._journal.clear()
                    self._must_clear = True
                self._server_id = server_id
                await self._replay()
            except BACKEND_ERRORS as exc:
                self._state = "down"
                self.errors += 1
                log.debug("cache: Redis still unavailable: %s", exc)
                continue
            return

    async def _replay(self) -> None:
        """Applies what Redis missed, then switches back. Invalidations arriving while
        this awaits Redis are journaled (the state is not up yet) and replayed by a
        later turn of the loop."""
        while True:
            if self._must_clear:
                # Reset first: patterns arriving during the clear must be journaled,
                # since the clear may already have passed the keys they concern.
                self._must_clear = False
                try:
                    await self.primary.clear()
                except BaseException:
                    self._must_clear = True
                    raise
            elif self._journal:
                pattern = self._journal[0]
                await self.primary.invalidate(pattern)
                # Only once applied: if Redis failed above, it stays for the next try.
                if self._journal and self._journal[0] == pattern:
                    self._journal.popleft()
            else:
                break
        # No await between seeing the journal empty and the switch: nothing slips in.
        self._state = "up"
        self.switches += 1
        self.memory.store.clear()
        log.warning("cache: Redis answers again; serving from it")
