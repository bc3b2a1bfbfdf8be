"""The relay: delivers the invalidation log to the cache, whatever the fast path lost.

Every write tells the cache what it made stale right after its commit (outbox.py);
that call is lost when the sidecar is down, or the process dies before it. The log
is durable, and the cache knows its position in it (CacheService.GetSyncState), so
every process that writes runs a relay which, every RELAY_INTERVAL:

- asks the cache for its position (nothing to do while it cannot be reached, or
  answers UNIMPLEMENTED: a sidecar without the log's RPCs);
- a fresh cache (no position: new, or emptied) is given the log's head, read after
  its state, with no patterns: it held nothing that any entry up to the head could
  make stale, and every fill after that Sync was loaded after those entries;
- a cache behind the log is sent the patterns of the entries it missed (Sync), once
  they have been in the log for a whole interval, so the fast path is not raced;
- a cache behind entries that were pruned already (older than
  INVALIDATION_LOG_RETENTION) is told to clear itself.

Idle, that is one GetSyncState and one indexed `max(seq)` per interval. The relay
also prunes the log. It logs when its condition changes, never on every poll.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time

from devops_hub.v1 import cache_pb2

from services.common.background import cancel_and_wait, spawn
from services.common.cache.client import CacheClient
from services.common.clock import utc_now
from services.common.db import Database
from services.common.errors import Unavailable
from services.common.invalidation_log import InvalidationLog
from services.common.settings import Settings

log = logging.getLogger(__name__)

# Entries read per round; a cache further behind is caught up over several rounds.
BATCH = 500
# CacheSyncRequest.patterns takes at most this many.
MAX_PATTERNS_PER_SYNC = 1000


class InvalidationRelay:
    def __init__(
        self,
        invalidation_log: InvalidationLog,
        cache: CacheClient,
        *,
        interval: float,
        retention: float,
    ) -> None:
        self._log = invalidation_log
        self._cache = cache
        self._interval = interval
        self._retention = retention
        # Pruning is cheap but needs no haste: a few times per retention period.
        self._prune_every = max(1.0, min(60.0, retention / 4))
        self._next_prune = 0.0
        # The log's head one round ago: entries up to it had a whole interval to be
        # applied by the fast path.
        self._previous_head = 0
        self._condition = ""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = spawn(self._run(), name="invalidation-relay", essential=True)

    async def stop(self) -> None:
        """Stops the rounds for good and closes the relay's cache client."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        await self._cache.close()

    async def _run(self) -> None:
        while True:
            try:
                again = await self._relay()
                await self._prune_when_due()
            except Unavailable:
                # The database is away: services.common.outages logged it, once.
                again = False
            except Exception:  # noqa: BLE001 - a round that fails is tried again
                self._note("failing", logging.WARNING, "invalidation relay: a round failed; retrying", exc_info=True)
                again = False
            if not again:
                await asyncio.sleep(self._interval)

    async def _relay(self) -> bool:
        """One round; True when the cache is still behind and the next round should
        follow at once."""
        state = await self._cache.sync_state()
        if state is None:
            self._note(
                "unreachable",
                logging.WARNING,
                "invalidation relay: the cache sidecar cannot be reached or does not know the log (GetSyncState);"
                " entries will be sent once it can",
            )
            return False
        head = await self._log.head()
        if state.fresh:
            if await self._sync(0, head, [], clear=False) is not None:
                log.info("invalidation relay: the cache had no position; it starts at the log's head %d", head)
            return False
        previous, self._previous_head = self._previous_head, head
        if head < state.applied:
            self._note(
                "beyond",
                logging.WARNING,
                "invalidation relay: the cache has applied entry %d, past this database's newest %d:"
                " it serves another database, or the log was reset",
                state.applied,
                head,
            )
            return False
        target = min(head, previous)
        if target <= state.applied:
            self._note("in step", logging.INFO, "invalidation relay: the cache is in step with the log (entry %d)", head)
            return False
        self._note(
            "behind",
            logging.INFO,
            "invalidation relay: the cache missed log entries after %d (the log is at %d); sending them",
            state.applied,
            head,
        )
        return await self._catch_up(state, target)

    async def _catch_up(self, state: cache_pb2.CacheSyncState, target: int) -> bool:
        applied = state.applied
        if await self._log.oldest() > applied + 1:
            # What the pruned entries invalidated is unknown: the cache empties itself.
            if await self._sync(applied, target, [], clear=True) is not None:
                log.warning("invalidation relay: entries after %d were pruned; the cache was cleared", applied)
            return False
        entries = [entry for entry in await self._log.entries_after(applied, BATCH) if entry.seq <= target]
        if not entries:
            return False
        skip = set(state.ahead)
        patterns = list(dict.fromkeys(p for entry in entries if entry.seq not in skip for p in entry.patterns))
        through = entries[-1].seq
        # Every call but the last keeps the position where it is: it moves only once
        # all the patterns were applied.
        chunks = [patterns[i : i + MAX_PATTERNS_PER_SYNC] for i in range(0, len(patterns), MAX_PATTERNS_PER_SYNC)] or [[]]
        for i, chunk in enumerate(chunks):
            if await self._sync(applied, through if i == len(chunks) - 1 else applied, chunk, clear=False) is None:
                return False
        return through < target

    async def _sync(self, after: int, through: int, patterns: list[str], *, clear: bool) -> cache_pb2.CacheSyncState | None:
        state, code = await self._cache.sync(after, through, patterns, clear=clear)
        if state is None:
            # FAILED_PRECONDITION: the position moved back meanwhile; the next round
            # reads it again. Anything else: the sidecar went away.
            log.debug("invalidation relay: Sync(%d, %d] answered %s", after, through, code.name if code else "?")
        return state

    async def _prune_when_due(self) -> None:
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + self._prune_every
        cutoff = utc_now() - dt.timedelta(seconds=self._retention)
        deleted = await self._log.prune(cutoff)
        if deleted:
            log.info("invalidation relay: pruned %d log entries older than %.0f s", deleted, self._retention)

    def _note(self, condition: str, level: int, message: str, *args: object, exc_info: bool = False) -> None:
        """Logs when the relay's condition changes, not on every round (nor "in step"
        when that is how it starts)."""
        if condition != self._condition:
            if self._condition or level > logging.INFO:
                log.log(level, message, *args, exc_info=exc_info)
            self._condition = condition


def build_relay(settings: Settings, db: Database) -> InvalidationRelay:
    """The relay of a service that writes to `db`, as the settings configure it.

    It has a cache client of its own, without a near-cache: its polls neither open a
    Watch stream nor mix their failures into the request path's backoff and logs.
    """
    cache = CacheClient.from_settings(settings.replace(cache_near_size=0))
    return InvalidationRelay(
        InvalidationLog(db), cache, interval=settings.relay_interval, retention=settings.invalidation_log_retention
    )
