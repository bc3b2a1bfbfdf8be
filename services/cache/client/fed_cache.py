"""What the near-cache and the gateway's edge cache share: a small LRU trusted only
while an invalidation stream feeds it (near_feed.py; docs/cache.md, "The near-cache,
the edge cache and Watch"). Going live or dark clears it, since invalidations may have
been missed in the dark; `position` is how far of the log the stream has brought; fills
are checked by version (history.py). An entry over a sixteenth of the bytes is not kept.
"""

from __future__ import annotations

import abc
import collections
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, Protocol, TypeVar

from services.cache.client.history import InvalidationHistory
from services.cache.client.keys import GlobPattern, parse_pattern


class Expiring(Protocol):
    @property
    def expires_at(self) -> float: ...


K = TypeVar("K", bound=Hashable)
E = TypeVar("E", bound=Expiring)


class FedCache(abc.ABC, Generic[K, E]):
    def __init__(
        self,
        *,
        max_entries: int = 1024,
        max_bytes: int = 32 * 1024 * 1024,
        max_ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or max_bytes < 1 or max_ttl <= 0:
            raise ValueError("max_entries, max_bytes and max_ttl must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_ttl = max_ttl
        self._clock = clock
        self._entries: collections.OrderedDict[K, E] = collections.OrderedDict()
        self._bytes = 0
        self.live = False
        self.position = 0
        self.history = InvalidationHistory()
        # Told of every invalidation from the log this cache applies (consistency.py).
        self.observer: Callable[[str, int], None] | None = None
        # Log entries this process applied at its own commits (CacheClient.committed),
        # until the stream brings them back: they are not applied a second time.
        self._own: set[int] = set()

    def go_live(self, position: int) -> None:
        """The stream is at `position`: nothing read before it may land (it may have
        missed an invalidation while dark)."""
        self.clear(position)
        self.position = position
        self.live = True

    def go_dark(self) -> None:
        """Invalidations may be missed from now on."""
        self.clear(self.history.known)
        self.live = False

    def invalidate(self, pattern: str, at: int | None) -> None:
        """Drops what the pattern names; `at` is its log position, recorded so that a
        fill read before it is refused (None: from outside the log, not recorded)."""
        if pattern == "*":
            self.clear(self.history.known if at is None else at)
            return
        if at is not None:
            self.history.record(pattern, at)
            if self.observer is not None:
                self.observer(pattern, at)
        self._drop(parse_pattern(pattern))

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> E | None:
        entry = self._entries.get(key) if self.live else None
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def applied_own(self, position: int, patterns: Sequence[str]) -> None:
        """A write of this process committed at log entry `position`: its patterns apply
        here now, and its stream's copy of them is skipped (took_own()); nothing is
        applied when the stream has brought them already."""
        if self.live and position <= self.position:
            return
        for pattern in patterns:
            self.invalidate(pattern, position)
        if self.live:
            self._own.add(position)

    def took_own(self, after: int, through: int) -> bool:
        """Whether the stream's span (after, through] holds only entries applied_own()
        already applied (the relay sends writes that commit together in one span);
        entries the stream has passed are forgotten either way."""
        own = self._own
        mine = through > after and all(position in own for position in range(after + 1, through + 1))
        if own:
            self._own = {position for position in own if position > through}
        return mine

    def clear(self, at: int) -> None:
        self.history.forget(at)
        self._entries.clear()
        self._bytes = 0
        self._own.clear()

    def _fits(self, size: int) -> bool:
        return self.live and size <= self.max_bytes // 16

    def _store(self, key: K, entry: E) -> None:
        """Keeps entry (replacing the key's), then evicts down to the bounds."""
        if key in self._entries:
            self._remove(key)
        self._entries[key] = entry
        self._bytes += self._weight(entry)
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._remove(next(iter(self._entries)))

    def _remove(self, key: K) -> E:
        entry = self._entries.pop(key)
        self._bytes -= self._weight(entry)
        return entry

    @abc.abstractmethod
    def _weight(self, entry: E) -> int:
        """The bytes an entry counts against max_bytes."""

    @abc.abstractmethod
    def _drop(self, pattern: GlobPattern) -> None:
        """Removes the entries the pattern names."""

    @abc.abstractmethod
    def holds_older(self, key: str, at: int) -> bool:
        """Whether it holds a value of `key` read before log position `at` (consistency.py)."""
