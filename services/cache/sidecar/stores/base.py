"""What the stores share: their position in the invalidation log, the values they
hold, the checks on an entry and the figures they count (docs/cache.md has the model)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from devops_hub.v1 import cache_pb2

from services.cache.client.keys import namespace_of
from services.common.contract.errors import FailedPrecondition

EVICTION_REASONS = ("size", "bytes", "ttl")
# Per-namespace figures are kept for this many namespaces; the rest are pooled so a
# client inventing namespaces cannot grow them without bound.
MAX_TRACKED_NAMESPACES = 256
OTHER_NAMESPACE = "(other)"
# TTLs are spread by ±10% so entries filled together do not all expire (and reload)
# in the same instant.
TTL_JITTER = 0.1


@dataclasses.dataclass(frozen=True, slots=True)
class SyncState:
    """A store's position: every log entry through `applied` has been applied. A
    `fresh` store (new, or it lost its data) cannot say which entries it missed, so
    it refuses fills until a Sync gives it a position."""

    applied: int = 0
    fresh: bool = True
    # Only on a Sync's answer, and no part of the position: the patterns it applied,
    # for the Watch streams; None when another relay's Sync had covered them.
    changed: tuple[str, ...] | None = dataclasses.field(default=None, compare=False)

    def changes(self, after: int, through: int, patterns: Sequence[str], clear: bool) -> list[str] | None:
        """What a Sync of the entries in (after, through] applies: its patterns, or a
        clear when the log no longer holds them or the store is fresh (it vouched for
        nothing, and no fill read before `through` may land); None when another relay's
        Sync covered them already. FailedPrecondition when it would skip the entries
        between the position and `after`: the relay must read the state again."""
        if not self.fresh:
            if after > self.applied:
                raise FailedPrecondition(
                    f"the cache has applied the log through {self.applied}, not {after}: read its sync state again",
                    reason="SYNC_POSITION_BEHIND",
                    metadata={"applied": str(self.applied), "after": str(after)},
                )
            if through <= self.applied:
                return None
        return ["*"] if self.fresh or clear else list(patterns)

    def advanced(self, through: int) -> SyncState:
        return SyncState(through if self.fresh else max(self.applied, through), False)


FRESH = SyncState()


def lifetime(ttl: float, negative: bool, default_ttl: float, negative_ttl: float, rand: float) -> float:
    """`rand`: uniform in [0, 1)."""
    ttl = min(ttl if ttl > 0 else default_ttl, negative_ttl if negative else math.inf)
    return ttl * (1.0 + TTL_JITTER * (2.0 * rand - 1.0))


@dataclasses.dataclass(frozen=True, slots=True)
class Found:
    """What a hit carries. A negative entry is a cached "not found" (empty value)."""

    value: bytes
    content_type: str
    negative: bool
    version: int


@dataclasses.dataclass(frozen=True, slots=True)
class Lookup:
    """A Get's answer; `position` is what a fill of the miss carries as its version."""

    entry: Found | None
    position: int


@dataclasses.dataclass(frozen=True, slots=True)
class NewEntry:
    key: str
    value: bytes
    content_type: str
    negative: bool = False


class Counts:
    """What a store did, for CacheService.Stats. The Redis store and its memory
    fallback share one, so the sidecar's figures add up whichever of them served."""

    def __init__(self) -> None:
        self.hits = self.misses = self.sets = self.invalidations = 0
        self._by_namespace: dict[str, list[int]] = {}

    def read(self, key: str, *, hit: bool) -> None:
        namespace = namespace_of(key)
        counts = self._by_namespace.get(namespace)
        if counts is None:
            if len(self._by_namespace) >= MAX_TRACKED_NAMESPACES:
                namespace = OTHER_NAMESPACE
            counts = self._by_namespace.setdefault(namespace, [0, 0])
        counts[0 if hit else 1] += 1
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def stats(self, entries: int, size: int, evictions: dict[str, int], backend: str) -> cache_pb2.CacheStats:
        namespaces = {
            name: cache_pb2.NamespaceStats(hits=hits, misses=misses, hit_rate=_rate(hits, misses))
            for name, (hits, misses) in self._by_namespace.items()
        }
        return cache_pb2.CacheStats(
            hits=self.hits,
            misses=self.misses,
            hit_rate=_rate(self.hits, self.misses),
            entries=entries,
            bytes=size,
            sets=self.sets,
            invalidations=self.invalidations,
            evictions=evictions,
            namespaces=namespaces,
            backend=backend,
        )


def _rate(hits: int, misses: int) -> float:
    return hits / (hits + misses) if hits + misses else 0.0
