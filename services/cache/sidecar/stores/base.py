"""The contract every store keeps, and the small pieces they share.

A store is async because the Redis store talks to a network; the memory store is
synchronous underneath (see memory.py for why) and wrapped to fit.

Versions: every value carries the invalidation log's position it was read at. A Get
that misses answers the store's position (0 while fresh, see position.py); the fill
carries it, and a store refuses a fill of a key it invalidated after that position,
so a value loaded before a write never lands after that write's invalidation. The
log's sequence numbers are the only ordering number: whichever store served the Get,
any store can check the fill.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from services.cache.client.keys import MAX_CONTENT_TYPE_CHARS, key_problem
from services.cache.sidecar.stores.position import SyncState

EVICTION_REASONS = ("size", "bytes", "ttl")
# Per-namespace statistics are kept for this many namespaces; the rest are pooled so a
# client inventing namespaces cannot grow the stats without bound.
MAX_TRACKED_NAMESPACES = 256
OTHER_NAMESPACE = "(other)"
# TTLs are spread by ±10% so entries filled together do not all expire (and reload)
# in the same instant.
TTL_JITTER = 0.1


def jittered(ttl: float, rand: float) -> float:
    """ttl spread by ±TTL_JITTER, for rand uniform in [0, 1)."""
    return ttl * (1.0 + TTL_JITTER * (2.0 * rand - 1.0))


def entry_violations(key: str, value: bytes, content_type: str, max_value_bytes: int) -> list[tuple[str, str]]:
    """Problems with an entry as (field, description); field names are relative
    ("key", "value", "content_type") so the servicer can prefix its proto path."""
    violations: list[tuple[str, str]] = []
    problem = key_problem(key)
    if problem:
        violations.append(("key", problem))
    if len(content_type) > MAX_CONTENT_TYPE_CHARS:
        violations.append(("content_type", f"must be at most {MAX_CONTENT_TYPE_CHARS} characters"))
    if len(value) > max_value_bytes:
        violations.append(("value", f"must be at most {max_value_bytes} bytes, got {len(value)}"))
    return violations


class Value(Protocol):
    """What a hit carries. A negative entry is a cached "not found" (empty value)."""

    @property
    def value(self) -> bytes: ...

    @property
    def content_type(self) -> str: ...

    @property
    def negative(self) -> bool: ...

    @property
    def version(self) -> int: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Found:
    value: bytes
    content_type: str
    negative: bool = False
    version: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Lookup:
    """A Get's answer: the entry (None on a miss) and the store's position, which a
    fill of the miss carries as its version."""

    entry: Value | None
    position: int


@dataclasses.dataclass(frozen=True, slots=True)
class NewEntry:
    key: str
    value: bytes
    content_type: str
    negative: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class NamespaceCounts:
    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class StoreStats:
    hits: int
    misses: int
    entries: int
    bytes: int
    sets: int
    # Delete, Invalidate and Clear calls applied (not entries removed).
    invalidations: int
    evictions: dict[str, int]
    namespaces: dict[str, NamespaceCounts]
    backend: str = "memory"
    backend_errors: int = 0
    backend_switches: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class HitCounter:
    """Hits and misses, overall and per namespace (bounded, see MAX_TRACKED_NAMESPACES)."""

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self._by_namespace: dict[str, list[int]] = {}

    def count(self, namespace: str, *, hit: bool) -> None:
        counts = self._by_namespace.get(namespace)
        if counts is None:
            if len(self._by_namespace) >= MAX_TRACKED_NAMESPACES:
                namespace = OTHER_NAMESPACE
            counts = self._by_namespace.setdefault(namespace, [0, 0])
        if hit:
            self.hits += 1
            counts[0] += 1
        else:
            self.misses += 1
            counts[1] += 1

    def namespaces(self) -> dict[str, NamespaceCounts]:
        return {name: NamespaceCounts(hits, misses) for name, (hits, misses) in self._by_namespace.items()}


def merge_namespaces(*groups: dict[str, NamespaceCounts]) -> dict[str, NamespaceCounts]:
    merged: dict[str, list[int]] = {}
    for group in groups:
        for name, counts in group.items():
            total = merged.setdefault(name, [0, 0])
            total[0] += counts.hits
            total[1] += counts.misses
    return {name: NamespaceCounts(hits, misses) for name, (hits, misses) in merged.items()}


class Store(Protocol):
    """The operations CacheService needs. Invalid input raises InvalidArgument;
    anything else a store raises is a backend failure."""

    @property
    def backend(self) -> str: ...

    async def get(self, key: str) -> Lookup: ...

    async def get_many(self, keys: Sequence[str]) -> dict[str, Value]: ...

    async def set(
        self, key: str, value: bytes, content_type: str, ttl: float = 0.0, version: int | None = None, negative: bool = False
    ) -> bool:
        """A fill read at `version` (refused if the key was invalidated after it, holds a
        newer version, or the store is fresh) or an overwrite (None: stored at the
        store's position)."""
        ...

    async def set_many(self, entries: Sequence[NewEntry], ttl: float = 0.0) -> int: ...

    async def delete(self, key: str) -> bool: ...

    async def remove(self, patterns: Sequence[str]) -> int:
        """Removes what the patterns match: an invalidation from outside the log,
        recorded at the store's current position."""
        ...

    async def clear(self) -> int: ...

    # The position in the services' invalidation log (position.py).

    async def sync_state(self) -> SyncState: ...

    async def sync(self, after: int, through: int, patterns: Sequence[str], clear: bool) -> SyncState:
        """Applies the patterns (or clears), versioned `through`, and moves the position
        there; FailedPrecondition when the position is below `after`."""
        ...

    async def stats(self) -> StoreStats: ...

    def entry_violations(self, key: str, value: bytes, content_type: str) -> list[tuple[str, str]]: ...

    async def close(self) -> None: ...
