"""A store's position in the invalidation log: the cache's one clock (docs/cache.md).

Every write appends its invalidations to the log (table cache_invalidations) in its
own transaction; entries commit in sequence order. A store records how far it has
applied that log:

    applied   every entry up to and including it has been applied
    fresh     no position at all: the store is new or lost its data and cannot say
              which entries it missed. It refuses fills until a Sync gives it one.

The services' relays send the entries after `applied` (CacheService.Sync); a Sync
that would skip entries is refused with the store's position, and one that arrives
after another relay's Sync covered it applies nothing new. The memory store keeps
this in the process; the Redis store keeps the same two values in Redis, shared by
every sidecar on it.
"""

from __future__ import annotations

import dataclasses

from services.common.errors import FailedPrecondition


@dataclasses.dataclass(frozen=True, slots=True)
class SyncState:
    applied: int = 0
    fresh: bool = True


FRESH = SyncState()


def position_behind(applied: int, after: int) -> FailedPrecondition:
    """A Sync whose `after` is beyond the store's position: its patterns do not cover
    the entries in between, so the relay must read the state again."""
    return FailedPrecondition(
        f"the cache has applied the log through {applied}, not {after}: read its sync state again",
        reason="SYNC_POSITION_BEHIND",
        metadata={"applied": str(applied), "after": str(after)},
    )


class SyncPosition:
    """The position of a store in this process (synchronous, so each change is atomic
    on the event loop together with the invalidations it records)."""

    def __init__(self) -> None:
        self.applied = 0
        self.fresh = True

    def state(self) -> SyncState:
        return FRESH if self.fresh else SyncState(self.applied, False)

    def check(self, after: int) -> None:
        """Raises FailedPrecondition when a Sync from `after` would skip entries."""
        if not self.fresh and after > self.applied:
            raise position_behind(self.applied, after)

    def advance(self, through: int) -> None:
        """Every entry through `through` has been applied (a Sync, once checked)."""
        self.applied = through if self.fresh else max(self.applied, through)
        self.fresh = False

    def forget(self) -> None:
        """The store can no longer vouch for what it holds: fresh again."""
        self.fresh = True
        self.applied = 0
