"""The relay: the one route by which the invalidation log reaches the cache
(docs/cache.md, "The invalidation log and the relay"). Besides the writes' own
entries (deliver), its rounds send what a Sync missed: the sidecar down or
restarted, or a process dying first.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Sequence

import grpc
from devops_hub.v1 import cache_pb2
from google.protobuf import empty_pb2
from google.protobuf.message import Message
from opentelemetry import trace

from services.cache.client.transport import CACHE_SERVICE, SidecarTransport
from services.cache.log.repository import InvalidationLog
from services.common.contract.errors import Unavailable
from services.common.data.db import Database
from services.common.foundation.background import cancel_and_wait, spawn, wait_set
from services.common.foundation.clock import utc_now
from services.common.foundation.settings import Settings
from services.common.transport.channels import service_address

log = logging.getLogger(__name__)

# Entries read per round; a cache further behind is caught up over several rounds.
BATCH = 500
# CacheSyncRequest.patterns takes at most this many.
MAX_PATTERNS_PER_SYNC = 1000
# The most a write waits for the sidecar to take its entry (and a Sync's deadline):
# longer than a read's CACHE_TIMEOUT, since a write acknowledged before the sidecar has
# its entry can be read stale elsewhere, yet short; and a sidecar that just proved
# silent is not waited for at all.
DELIVER_TIMEOUT = 1.0


class InvalidationRelay:
    def __init__(self, invalidation_log: InvalidationLog, transport: SidecarTransport, *, interval: float, retention: float) -> None:
        self._log = invalidation_log
        self._transport = transport
        self._interval = interval
        self._retention = retention
        # Pruning is cheap but needs no haste: a few times per retention period.
        self._prune_every = max(1.0, min(60.0, retention / 4))
        self._next_prune = 0.0
        # The cache's position as its last answer gave it (None: unknown).
        self._applied: int | None = None
        # This process's writes not yet known applied: log position -> patterns.
        self._pending: dict[int, Sequence[str]] = {}
        self._nudged = asyncio.Event()
        # Set (and replaced) whenever a call to the cache ends: deliver() waits on it.
        self._advanced = asyncio.Event()
        # Whether a Sync is on its way: one at a time, what commits meanwhile waits for the next.
        self._sending = False
        # While the sidecar has just proved silent, deliver() does not wait for it.
        self._silent_until = 0.0
        self._condition = ""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = spawn(self._run(), name="invalidation-relay", essential=True)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        await self._transport.close()

    async def deliver(self, position: int, patterns: Sequence[str]) -> None:
        """Waits (at most its channel's deadline) until the cache has applied the log
        through `position`. This process's entries that continue the cache's position
        are sent from here, the writers' tasks: those committed while a Sync was on its
        way go together in the next, so a write never waits behind a round that reads
        the database, nor sends a Sync of its own behind one that is under way. Any
        other entry is the relay's to send."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._transport.timeout
        self._hold(position, patterns)
        while (self._applied is None or self._applied < position) and (remaining := deadline - loop.time()) > 0:
            if time.monotonic() < self._silent_until:
                # It just proved silent (or refuses connections, which fails every call at
                # once): the relay's rounds send the entry once it answers.
                self._nudged.set()
                return
            if not self._sending:
                # (Not once dropped from _pending, see _hold: _send_own would have nothing to send.)
                if self._applied is not None and position in self._pending and await self._send_own():
                    continue
                self._nudged.set()
            await wait_set(self._advanced, remaining)

    def _hold(self, position: int, patterns: Sequence[str]) -> None:
        if len(self._pending) >= BATCH:
            # The sidecar has been away a while: the log holds them all, and the next
            # round reads them from there. Only the fast path needs them in memory.
            self._pending.clear()
        self._pending[position] = patterns

    async def _run(self) -> None:
        while True:
            # Cleared before the round, so a nudge during it starts the next at once.
            self._nudged.clear()
            try:
                again = await self._relay()
                await self._prune_when_due()
            except Unavailable:
                # The database is away: services.common.data.outages logged it, once.
                again = False
            except Exception:  # noqa: BLE001 - a round that fails is tried again
                self._note("failing", logging.WARNING, "invalidation relay: a round failed; retrying", exc_info=True)
                again = False
            if again:
                continue
            # Idle rounds read the position again (another relay may have moved it), but
            # keep the one known meanwhile: a position known too low only makes the fast
            # path send a span the cache already has, and one too high (a cache that lost
            # its data) is refused or taken as a fresh start, so the fast path never waits
            # on the database, which may be the part that just came back.
            await wait_set(self._nudged, self._interval)

    async def _relay(self) -> bool:
        """One round; True when the cache is still behind and the next round should
        follow at once."""
        if self._sending:
            # A writer's Sync is on its way; its writers nudge again if it fails.
            return False
        if self._pending and self._applied is not None and await self._send_own():
            return bool(self._pending)
        state = await self._call("GetSyncState", empty_pb2.Empty())
        if state is None:
            return False
        head = await self._log.head()
        if state.fresh:
            # With a clear: another relay may have positioned the cache since it answered,
            # and a Sync without one would then skip the entries after that position.
            if await self._sync(0, head, [], clear=True) is not None:
                log.info("invalidation relay: the cache had no position; it starts at the log's head %d", head)
            return False
        if head < state.applied:
            message = "invalidation relay: the cache has applied entry %d, past this database's newest %d: another database's, or a reset log"
            self._note("beyond", logging.WARNING, message, state.applied, head)
            return False
        if head == state.applied:
            self._note("in step", logging.DEBUG, "invalidation relay: the cache is in step with the log (entry %d)", head)
            return False
        return await self._catch_up(state.applied, head)

    async def _send_own(self) -> bool:
        """The fast path: this process's own writes, when they continue the cache's
        position, without reading the log. False when they do not."""
        assert self._applied is not None
        positions = sorted(p for p in self._pending if p > self._applied)
        for p in [p for p in self._pending if p <= self._applied]:
            del self._pending[p]
        if not positions:
            return True
        if positions != list(range(self._applied + 1, positions[-1] + 1)):
            return False
        patterns = list(dict.fromkeys(pattern for p in positions for pattern in self._pending[p]))
        if len(patterns) > MAX_PATTERNS_PER_SYNC:
            return False
        return await self._sync(self._applied, positions[-1], patterns) is not None

    async def _catch_up(self, applied: int, head: int) -> bool:
        # Routine, not news: with several writing processes each relay sends the others'
        # entries it finds first; only failures are logged above DEBUG.
        self._note("behind", logging.DEBUG, "invalidation relay: the cache missed entries after %d (the log is at %d); sending them", applied, head)
        if await self._log.oldest() > applied + 1:
            # What the pruned entries invalidated is unknown: the cache empties itself.
            if await self._sync(applied, head, [], clear=True) is not None:
                log.warning("invalidation relay: entries after %d were pruned; the cache was cleared", applied)
            return False
        entries = [entry for entry in await self._log.entries_after(applied, BATCH) if entry.seq <= head]
        if not entries:
            return False
        patterns = list(dict.fromkeys(p for entry in entries for p in entry.patterns))
        through = entries[-1].seq
        # Every call but the last keeps the position where it is: it moves only once
        # all the patterns were applied.
        chunks = [patterns[i : i + MAX_PATTERNS_PER_SYNC] for i in range(0, len(patterns), MAX_PATTERNS_PER_SYNC)] or [[]]
        for i, chunk in enumerate(chunks):
            if await self._sync(applied, through if i == len(chunks) - 1 else applied, chunk) is None:
                return False
        return through < head

    async def _sync(self, after: int, through: int, patterns: list[str], *, clear: bool = False) -> cache_pb2.CacheSyncState | None:
        self._sending = True
        try:
            return await self._call("Sync", cache_pb2.CacheSyncRequest(after=after, through=through, patterns=patterns, clear=clear))
        finally:
            self._sending = False

    async def _call(self, method: str, request: Message) -> cache_pb2.CacheSyncState | None:
        """GetSyncState or Sync; the cache's position as it answers, None when it does not."""
        state: cache_pb2.CacheSyncState | None
        state, code = await self._transport.call(method, request, respect_backoff=False)
        self._advanced.set()
        self._advanced = asyncio.Event()
        if state is None:
            self._applied = None
            if method == "Sync" and code == grpc.StatusCode.FAILED_PRECONDITION:
                # The position is not where this relay thought: it reads it again.
                log.debug("invalidation relay: a Sync was refused; reading the cache's position again")
            else:
                self._silent_until = time.monotonic() + self._transport.retry_after
                message = "invalidation relay: the cache sidecar cannot be reached (%s); entries will be sent once it can"
                self._note("unreachable", logging.WARNING, message, method)
            return None
        self._applied = None if state.fresh else state.applied
        for p in [p for p in self._pending if self._applied is not None and p <= self._applied]:
            del self._pending[p]
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


def build_relay(settings: Settings, db: Database, tracer: trace.Tracer | None = None) -> InvalidationRelay:
    """The relay has a channel of its own: its calls neither wait behind the request
    path's nor mix their failures into its backoff and logs."""
    address = service_address(CACHE_SERVICE, settings)
    transport = SidecarTransport(address, max(settings.cache_timeout, DELIVER_TIMEOUT), api_key=settings.service_api_key, tracer=tracer)
    return InvalidationRelay(InvalidationLog(db), transport, interval=settings.relay_interval, retention=settings.invalidation_log_retention)
