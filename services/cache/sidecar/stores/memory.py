"""The in-process store (docs/cache.md, "The memory store").

MemoryStore is synchronous on purpose. The sidecar runs one event loop, so a method
that never awaits is atomic: an invalidation and the fills it races with cannot
interleave half-way, which is what makes the version check simple and exact.

A prefix invalidation that ends on a level detaches that subtree in O(1): its entries
are dead from that instant (every read checks that its entry's node is still
attached) and are reclaimed a few at a time by later writes and by maintain(), never
by the invalidation itself, so its cost does not depend on how many keys it removes.
Dead entries still count against max_entries and max_bytes until reclaimed, since
they still hold memory; the live figures in stats() exclude them.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import random
import time
from collections.abc import Callable, Iterator, Sequence

from devops_hub.v1 import cache_pb2

from services.cache.client.history import HISTORY_SIZE, InvalidationHistory
from services.cache.client.keys import (
    MAX_CONTENT_TYPE_CHARS,
    MAX_PREFIX_DEPTH,
    MAX_VALUE_BYTES,
    escape_key,
    key_problem,
    parse_pattern,
)
from services.cache.sidecar.stores.base import (
    EVICTION_REASONS,
    FRESH,
    Counts,
    Found,
    SyncState,
    lifetime,
)
from services.common.contract.errors import invalid_fields

# Dead entries reclaimed per write: more than one, so reclaiming outpaces filling.
SWEEP_PER_WRITE = 8
MAINTENANCE_BUDGET = 20_000


class _Node:
    """One prefix level. entries and bytes total the live entries of the subtree."""

    __slots__ = ("parent", "segment", "children", "keys", "entries", "bytes", "dead")

    def __init__(self, parent: _Node | None, segment: str) -> None:
        self.parent = parent
        self.segment = segment
        self.children: dict[str, _Node] = {}
        self.keys: set[str] = set()
        self.entries = 0
        self.bytes = 0
        self.dead = False

    def add(self, entries: int, size: int) -> None:
        node: _Node | None = self
        while node is not None:
            node.entries += entries
            node.bytes += size
            node = node.parent


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Entry(Found):
    expires_at: float
    # What the entry costs against max_bytes: value, key and content type.
    size: int
    node: _Node

    @property
    def alive(self) -> bool:
        node: _Node | None = self.node
        while node is not None:
            if node.dead:
                return False
            node = node.parent
        return True


class MemoryStore:
    """An LRU (an OrderedDict, oldest first) bounded by entries and bytes. A fill of
    version v is refused when a later invalidation in the (bounded) history matches its
    key, when v is below the history's floor, when the key holds a newer version, or
    while the store is fresh."""

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        default_ttl: float,
        negative_ttl: float = float("inf"),
        history: int = HISTORY_SIZE,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if max_entries < 1 or max_bytes < 1 or default_ttl <= 0 or negative_ttl <= 0 or history < 1:
            raise ValueError("max_entries, max_bytes, default_ttl, negative_ttl and history must be positive")
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._default_ttl = default_ttl
        self._negative_ttl = negative_ttl
        self._clock = clock
        self._rand = rand

        self._entries: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        self._root = _Node(None, "")
        # Detached subtrees whose entries are still to be reclaimed.
        self._graveyard: collections.deque[_Node] = collections.deque()
        # (expires_at, key) in a min-heap, so expired entries are reclaimed without a
        # scan. Items of replaced or removed entries stay until popped or compacted.
        self._expiry: list[tuple[float, str]] = []
        # Bytes held, live or dead: what max_bytes bounds.
        self._bytes = 0

        self._history = InvalidationHistory(history)
        self.position = FRESH
        self.counts = Counts()
        self._evictions = dict.fromkeys(EVICTION_REASONS, 0)

    def get(self, key: str) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None and (entry.expires_at <= self._clock() or not entry.alive):
            del self._entries[key]
            self._drop(key, entry, "ttl")  # a dead entry is reclaimed, not counted
            entry = None
        elif entry is not None:
            self._entries.move_to_end(key)
        self.counts.read(key, hit=entry is not None)
        return entry

    def entry_violations(self, key: str, value: bytes, content_type: str, negative: bool) -> list[tuple[str, str]]:
        """Problems with an entry as (field, description), the fields relative ("key",
        "value", "content_type") so the servicer can prefix its proto path."""
        violations = [("key", problem)] if (problem := key_problem(key)) else []
        if len(content_type) > MAX_CONTENT_TYPE_CHARS:
            violations.append(("content_type", f"must be at most {MAX_CONTENT_TYPE_CHARS} characters"))
        if len(value) > (most := min(MAX_VALUE_BYTES, self._max_bytes)):
            violations.append(("value", f"must be at most {most} bytes, got {len(value)}"))
        if negative and value:
            violations.append(("value", "must be empty for a negative entry"))
        if not violations and self._entry_size(key, value, content_type) > self._max_bytes:
            # Storing it would mean evicting everything and still not fitting.
            violations.append(("value", f"entry is larger than the cache's {self._max_bytes}-byte budget"))
        return violations

    def set(
        self,
        key: str,
        value: bytes,
        content_type: str,
        ttl: float = 0.0,
        version: int | None = None,
        negative: bool = False,
    ) -> bool:
        """A fill read at `version` (False when refused, see the class) or, with None,
        an overwrite at the store's position. InvalidArgument for an unusable entry."""
        if violations := self.entry_violations(key, value, content_type, negative):
            raise invalid_fields(violations)
        if version is not None and self._refuses(key, version):
            return False
        now = self._clock()
        self._expire_due(now)
        self._sweep(SWEEP_PER_WRITE)
        expires_at = now + lifetime(ttl, negative, self._default_ttl, self._negative_ttl, self._rand())

        old = self._entries.pop(key, None)
        if old is not None:
            self._drop(key, old, None)
        node = self._node_for(key)
        version = self.position.applied if version is None else version
        entry = Entry(value, content_type, negative, version, expires_at, self._entry_size(key, value, content_type), node)
        self._entries[key] = entry
        node.keys.add(key)
        node.add(1, entry.size)
        self._bytes += entry.size
        self.counts.sets += 1
        self._schedule_expiry(expires_at, key)
        self._evict_to_fit()
        return True

    def delete(self, key: str, at: int | None = None) -> bool:
        """Removes one key; recorded even when absent, because an in-flight fill may still hold it."""
        self._record(escape_key(key), at)
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        alive = entry.alive
        self._drop(key, entry, None)
        return alive

    def invalidate(self, pattern: str, at: int | None = None) -> int:
        """Removes every key matching the glob; returns how many live entries went."""
        parsed = parse_pattern(pattern)
        if parsed.kind == "exact":
            return int(self.delete(pattern, at))
        if parsed.text == "*":
            return self.clear(at)
        self._record(pattern, at)
        if parsed.level is not None:
            return self._detach(parsed.level)
        victims = [key for key in self._candidates(parsed.literal_prefix) if parsed.matches(key)]
        for key in victims:
            self._drop(key, self._entries.pop(key), None)
        return len(victims)

    def clear(self, at: int | None = None) -> int:
        """Removes everything. Every fill read before it is refused: the history's
        floor moves up, so it holds no match-all record."""
        removed = self._root.entries
        self._history.forget(self._recorded_at(at))
        self.counts.invalidations += 1
        self._entries.clear()
        self._root = _Node(None, "")
        self._graveyard.clear()
        self._expiry.clear()
        self._bytes = 0
        return removed

    def reset(self) -> None:
        self.clear()
        self.position = FRESH

    def sync(self, after: int, through: int, patterns: Sequence[str], clear: bool) -> SyncState:
        """Applies the log's entries in (after, through] (see SyncState.changes)."""
        if (changed := self.position.changes(after, through, patterns, clear)) is None:
            return self.position
        for pattern in changed:
            self.invalidate(pattern, through)
        self.position = self.position.advanced(through)
        return dataclasses.replace(self.position, changed=tuple(changed))

    def maintain(self, budget: int = MAINTENANCE_BUDGET) -> None:
        """Reclaims expired and invalidated entries (at most `budget` of the latter), so
        memory comes back even when no writes arrive."""
        self._expire_due(self._clock())
        self._sweep(budget)

    def stats(self) -> cache_pb2.CacheStats:
        self._expire_due(self._clock())
        return self.counts.stats(self._root.entries, self._root.bytes, dict(self._evictions), "memory")

    # --- the prefix tree -------------------------------------------------------------

    def _node_for(self, key: str) -> _Node:
        node = self._root
        start = 0
        for _ in range(MAX_PREFIX_DEPTH):
            colon = key.find(":", start)
            if colon < 0:
                break
            segment = key[start:colon]
            child = node.children.get(segment)
            if child is None:
                child = node.children[segment] = _Node(node, segment)
            node = child
            start = colon + 1
        return node

    def _detach(self, level: str) -> int:
        node: _Node | None = self._root
        for segment in level.split(":")[:-1]:
            node = node.children.get(segment) if node is not None else None
        if node is None or node.parent is None or node.entries == 0:
            return 0
        removed = node.entries
        node.dead = True
        del node.parent.children[node.segment]
        node.parent.add(-removed, -node.bytes)
        self._prune(node.parent)
        self._graveyard.append(node)
        return removed

    def _prune(self, node: _Node) -> None:
        """Removes levels left empty, so the tree stays proportional to the live keys."""
        while node.parent is not None and node.entries == 0 and not node.keys:
            if node.parent.children.get(node.segment) is node:
                del node.parent.children[node.segment]
            node = node.parent

    def _candidates(self, literal: str) -> Iterator[str]:
        """Keys that can start with `literal`, from the one subtree that can hold them:
        whole segments of the literal pick a subtree; the partial segment left over
        narrows its children to those whose segment starts with it."""
        node = self._root
        segments = literal.split(":")
        rest = segments.pop()
        for depth, segment in enumerate(segments):
            if depth == MAX_PREFIX_DEPTH:
                rest = ":".join([segment, *segments[depth + 1 :], rest])
                break
            child = node.children.get(segment)
            if child is None:
                return
            node = child
        yield from list(node.keys)
        starts = [child for segment, child in node.children.items() if segment.startswith(rest)]
        while starts:
            current = starts.pop()
            yield from list(current.keys)
            starts.extend(current.children.values())

    # --- internals -------------------------------------------------------------------

    @staticmethod
    def _entry_size(key: str, value: bytes, content_type: str) -> int:
        return len(value) + len(key.encode()) + len(content_type)

    def _drop(self, key: str, entry: Entry, reason: str | None) -> None:
        """Book-keeping for an entry already popped from _entries. Dead entries leave
        quietly: being reclaimed is not an eviction."""
        entry.node.keys.discard(key)
        self._bytes -= entry.size
        if entry.alive:
            entry.node.add(-1, -entry.size)
            self._prune(entry.node)
            if reason is not None:
                self._evictions[reason] += 1

    def _sweep(self, budget: int) -> None:
        graveyard = self._graveyard
        while budget > 0 and graveyard:
            node = graveyard[0]
            if node.keys:
                key = node.keys.pop()
                entry = self._entries.get(key)
                if entry is not None and entry.node is node:
                    del self._entries[key]
                    self._bytes -= entry.size
                budget -= 1
            elif node.children:
                graveyard.append(node.children.popitem()[1])
            else:
                graveyard.popleft()

    def _evict_to_fit(self) -> None:
        # The newest entry is last and fits on its own (checked in entry_violations),
        # so this stops before reaching it.
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            reason = "size" if len(self._entries) > self._max_entries else "bytes"
            key, entry = self._entries.popitem(last=False)
            self._drop(key, entry, reason)

    def _schedule_expiry(self, expires_at: float, key: str) -> None:
        heapq.heappush(self._expiry, (expires_at, key))
        # Overwrites and deletes leave dead heap items behind; rebuilding once they
        # outnumber the live entries keeps the heap O(entries) at amortised O(1) cost.
        if len(self._expiry) > 2 * len(self._entries) + 1024:
            self._expiry = [(entry.expires_at, key) for key, entry in self._entries.items()]
            heapq.heapify(self._expiry)

    def _expire_due(self, now: float) -> None:
        """Reclaims entries whose TTL passed, so expired data does not hold memory (or
        count in stats) until it happens to be read or pushed out by LRU."""
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            # The key may have been replaced by a later entry with its own heap item.
            if entry is not None and entry.expires_at <= now:
                del self._entries[key]
                self._drop(key, entry, "ttl")

    def _recorded_at(self, at: int | None) -> int:
        """An invalidation from the log is recorded at its entry; one from outside it at
        the current position: it refuses fills read before that, but is not ordered
        against a fill read at it (only the log orders)."""
        return self.position.applied if at is None else at

    def _record(self, pattern: str, at: int | None) -> None:
        self._history.record(pattern, self._recorded_at(at))
        self.counts.invalidations += 1

    def _refuses(self, key: str, version: int) -> bool:
        if self.position.fresh:
            return True
        held = self._entries.get(key)
        return (held is not None and held.version > version and held.alive) or self._history.raced(key, version)
