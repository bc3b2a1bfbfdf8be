"""A cache's position in the services' invalidation log (cache.proto, CacheSyncState).

The services append every invalidation to a durable log in the transaction of the
write that causes it; each log entry has a sequence number. A cache records which
entries it has applied, so the services' relays can send it exactly what it missed:

    applied   every entry up to and including it has been applied
    ahead     entries after `applied` applied out of order (an immediate invalidation
              that overtook an earlier one), at most MAX_AHEAD, lowest dropped first
    fresh     no position at all: the cache is new or lost its data, and cannot say
              which entries it missed. It refuses fills until a Sync gives it one.

These are the rules for the memory store; the Redis store keeps the same ones in Lua
(redis_position.py), atomically for every sidecar sharing that Redis.
"""

from __future__ import annotations

import dataclasses

from services.common.errors import FailedPrecondition

# How many out-of-order entries are remembered. Forgetting one is safe: the relay
# sends its patterns again, and applying an invalidation twice is harmless.
MAX_AHEAD = 1000


@dataclasses.dataclass(frozen=True, slots=True)
class SyncState:
    applied: int = 0
    ahead: tuple[int, ...] = ()
    fresh: bool = True


FRESH = SyncState()


def position_behind(applied: int, after: int) -> FailedPrecondition:
    """A Sync whose `after` is beyond the cache's position: its patterns do not cover
    the entries in between, so the relay must read the state again."""
    return FailedPrecondition(
        f"the cache has applied the log through {applied}, not {after}: read its sync state again",
        reason="SYNC_POSITION_BEHIND",
        metadata={"applied": str(applied), "after": str(after)},
    )


class SyncPosition:
    """The position of a store that lives in this process (synchronous, so each
    method is atomic on the event loop together with the invalidation it records)."""

    def __init__(self) -> None:
        self._applied = 0
        self._ahead: set[int] = set()
        self._fresh = True

    @property
    def fresh(self) -> bool:
        return self._fresh

    def state(self) -> SyncState:
        if self._fresh:
            return FRESH
        return SyncState(self._applied, tuple(sorted(self._ahead)), False)

    def record(self, sequence: int) -> None:
        """Entry `sequence` has just been applied (an Invalidate that carried it)."""
        if self._fresh or sequence <= self._applied:
            return
        if sequence == self._applied + 1:
            self._applied = sequence
            self._absorb()
            return
        self._ahead.add(sequence)
        if len(self._ahead) > MAX_AHEAD:
            self._ahead.remove(min(self._ahead))

    def check(self, after: int) -> None:
        """Raises FailedPrecondition when a Sync from `after` would skip entries."""
        if not self._fresh and after > self._applied:
            raise position_behind(self._applied, after)

    def sync(self, through: int) -> SyncState:
        """Every entry through `through` has been applied (a Sync, once checked)."""
        if self._fresh:
            self._fresh = False
            self._applied = through
            self._ahead.clear()
        else:
            self._applied = max(self._applied, through)
            self._ahead = {sequence for sequence in self._ahead if sequence > self._applied}
            self._absorb()
        return self.state()

    def forget(self) -> None:
        """The store can no longer vouch for what it holds: fresh again."""
        self._fresh = True
        self._applied = 0
        self._ahead.clear()

    def _absorb(self) -> None:
        while self._applied + 1 in self._ahead:
            self._applied += 1
            self._ahead.remove(self._applied)
