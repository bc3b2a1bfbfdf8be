"""Redis first, memory when Redis fails, and back without serving what went stale.

States:

    up          every call goes to Redis. A call that fails is re-run on memory at once
                (the caller never sees the failure) and the store goes down.
    down        every call goes to memory; invalidations are also journaled. A probe
                pings Redis with backoff.
    recovering  the probe got an answer: the journal is replayed into Redis (or, if
                Redis restarted or the journal overflowed, everything under our prefix
                is cleared), while new invalidations keep going to memory and the
                journal. Once the journal is short (or after RECOVERY_SPAN of trying),
                the switch lock is taken: invalidations wait for it, the rest of the
                journal is replayed and the store switches back to up, so none can
                slip between the last replay and the switch, however many arrive.

Why replay: while Redis was away it kept entries that this sidecar invalidated (in
memory) meanwhile; serving them again after the switch back would be a stale read.
Why a restart means a clear: a Redis that restarted from a snapshot may hold entries
whose invalidation happened after the snapshot was taken.

Memory is cleared whenever the store comes back up, so it is empty whenever the store
goes down: it never serves an entry that was invalidated through Redis meanwhile, and
the memory goes back while Redis serves. Its entries live at most `memory_ttl`: other
sidecars cannot tell this one about their invalidations while Redis is down, so that
bounds how stale they can get.

The position in the invalidation log (position.py) is the serving store's: Redis's
own (shared by every sidecar on it) while up; memory's while not, which is fresh at
each switch since memory is empty then. The journal replay applies patterns to Redis
but never moves Redis's position: the relays send what lies after it again, and
applying an invalidation twice is harmless while skipping one is not. A Redis that
restarted loses its position along with its data (it is fresh).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, TypeVar

from redis.exceptions import RedisError

from services.cache_sidecar.stores.base import (
    REDIS_TOKEN_BIT,
    Lookup,
    NewEntry,
    StoreStats,
    Value,
    merge_namespaces,
)
from services.cache_sidecar.stores.memory import MemoryBackend
from services.cache_sidecar.stores.position import SyncState
from services.cache_sidecar.stores.redis import RedisStore
from services.common.background import cancel_and_wait
from services.common.cache.keys import escape_key

log = logging.getLogger(__name__)

T = TypeVar("T")
State = Literal["up", "down", "recovering"]

# What counts as "Redis failed" (as opposed to a bad request, which the stores raise
# as InvalidArgument before talking to Redis).
BACKEND_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
DEFAULT_JOURNAL = 10_000
PROBE_INITIAL = 0.1
# Short, so a Redis that answers again is in use within a second even after a long
# outage: a probe is one connection attempt.
PROBE_MAX = 0.5
# Journaled patterns replayed per round trip (exact keys and prefix levels are
# pipelined; see RedisStore.invalidate_many). The switch lock is taken once the
# journal is down to one batch: invalidations wait while it is replayed.
REPLAY_BATCH = 1000
# Replaying while new invalidations keep arriving stops after this long; the lock is
# taken then whatever the journal holds, so the switch happens under any write load.
RECOVERY_SPAN = 0.5


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
        # Bumped whenever the journal is emptied for a clear, so a replay that was
        # awaiting Redis meanwhile does not drop entries it did not apply.
        self._journal_epoch = 0
        self._journal_size = journal_size
        # Set when the journal overflowed or Redis restarted: replaying is not enough.
        self._must_clear = False
        # Set when Redis restarted: its position (if any survived) cannot vouch.
        self._must_forget = False
        # Held for the last replay and the switch to up; invalidations wait for it.
        self._switching = asyncio.Lock()
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

        return await self._route(lambda: self.primary.delete(key), on_memory, also_on_memory=on_memory)

    async def invalidate(self, pattern: str) -> int:
        return await self.invalidate_many([pattern])

    async def invalidate_many(self, patterns: Sequence[str], sequence: int = 0) -> int:
        async def on_memory() -> int:
            for pattern in patterns:
                self._append(pattern)
            return await self.memory.invalidate_many(patterns, sequence)

        return await self._route(
            lambda: self.primary.invalidate_many(patterns, sequence), on_memory, also_on_memory=on_memory
        )

    async def clear(self) -> int:
        return await self._route(self.primary.clear, self._clear_memory, also_on_memory=self._clear_memory)

    async def sync_state(self) -> SyncState:
        return await self._route(self.primary.sync_state, self.memory.sync_state)

    async def sync(self, after: int, through: int, patterns: Sequence[str], clear: bool) -> SyncState:
        async def apply_on_memory() -> None:
            if clear:
                await self._clear_memory()
                return
            for pattern in patterns:
                self._append(pattern)
            await self.memory.invalidate_many(patterns)

        async def on_memory() -> SyncState:
            # Journaled even if memory's position refuses the Sync: Redis missed them.
            await apply_on_memory()
            return await self.memory.sync(after, through, (), False)

        return await self._route(
            lambda: self.primary.sync(after, through, patterns, clear), on_memory, also_on_memory=apply_on_memory
        )

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
        also_on_memory: Callable[[], Awaitable[object]] | None = None,
    ) -> T:
        """Runs on Redis while it is up; on memory otherwise, including right after a
        Redis failure in this very call. An invalidation (also_on_memory given) that
        failed on Redis may or may not have reached it: on_memory journals it, and
        replaying is harmless. During the switch back to Redis, invalidations wait
        for it, and go to Redis then."""
        if also_on_memory is not None and self._state == "recovering" and self._switching.locked():
            async with self._switching:
                pass
        if self._state == "up":
            try:
                result = await on_primary()
            except BACKEND_ERRORS as exc:
                self._go_down(exc)
            else:
                if also_on_memory is not None and self._state != "up":
                    # Redis went away while this was in flight, and memory (cleared
                    # then) may since have taken a fill this invalidation covers.
                    await also_on_memory()
                return result
        return await on_memory()

    async def _clear_memory(self) -> int:
        self._owe_clear()
        return await self.memory.clear()

    def _owe_clear(self) -> None:
        """Redis is to be cleared on return: the journal is no longer needed."""
        self._journal.clear()
        self._journal_epoch += 1
        self._must_clear = True

    def _append(self, pattern: str) -> None:
        if self._must_clear:
            return  # a clear is still to come: it covers this pattern too
        self._journal.append(pattern)
        if len(self._journal) > self._journal_size:
            log.warning(
                "cache: more than %d invalidations while Redis is away; it will be cleared on return",
                self._journal_size,
            )
            self._owe_clear()

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
                    self._owe_clear()
                    self._must_forget = True
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
        the first part awaits Redis are journaled (the state is not up yet) and
        replayed too; the last part holds the switch lock, so none arrive then."""
        deadline = asyncio.get_running_loop().time() + RECOVERY_SPAN
        while self._must_clear or len(self._journal) > REPLAY_BATCH:
            if asyncio.get_running_loop().time() > deadline:
                break
            await self._replay_step()
        async with self._switching:
            while self._must_clear or self._journal:
                await self._replay_step()
            self._state = "up"
            self.switches += 1
            self.memory.store.reset()
        log.warning("cache: Redis answers again; serving from it")

    async def _replay_step(self) -> None:
        """Applies the owed clear, or the oldest batch of the journal, to Redis."""
        if self._must_clear:
            # Reset first: patterns arriving during the clear must be journaled,
            # since the clear may already have passed the keys they concern.
            self._must_clear = False
            try:
                if self._must_forget:
                    # Before the clear: leases taken meanwhile are cleared with the rest.
                    await self.primary.forget_position()
                    self._must_forget = False
                await self.primary.clear()
            except BaseException:
                self._must_clear = True
                raise
        elif self._journal:
            batch = list(itertools.islice(self._journal, REPLAY_BATCH))
            epoch = self._journal_epoch
            await self.primary.invalidate_many(batch)
            # Only once applied: if Redis failed above, it stays for the next try.
            if epoch == self._journal_epoch:
                for _ in batch:
                    self._journal.popleft()
