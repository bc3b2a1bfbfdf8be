"""What the near-cache (a process's own) and the gateway's edge cache share: a small
LRU that is trusted only while an invalidation stream feeds it.

Live exactly while its feed (near_feed.py) is: either change of that clears it, since
invalidations may have been missed in the dark, and a fill whose read began in the
dark must not land. Bounded by entries and bytes (an entry over a sixteenth of the
bytes is not kept), entries capped at max_ttl, least recently used evicted first.
Fills check the shared invalidation history (history.py). Subclasses say what an
entry weighs and what else goes when one is removed.
"""

from __future__ import annotations

import abc
import collections
import time
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

from services.common.cache.history import InvalidationHistory


class Expiring(Protocol):
    @property
    def expires_at(self) -> float: ...


K = TypeVar("K", bound=Hashable)
E = TypeVar("E", bound=Expiring)


class FedCache(abc.ABC, Generic[K, E]):
    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        max_ttl: float,
        clock: Callable[[], float] = time.monotonic,
        history: InvalidationHistory | None = None,
    ) -> None:
        if max_entries < 1 or max_bytes < 1 or max_ttl <= 0:
            raise ValueError("max_entries, max_bytes and max_ttl must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_ttl = max_ttl
        self._clock = clock
        self._entries: collections.OrderedDict[K, E] = collections.OrderedDict()
        self._bytes = 0
        self._live = False
        self.history = history or InvalidationHistory()
        self.hits = 0
        self.misses = 0

    @property
    def live(self) -> bool:
        return self._live

    def set_live(self, live: bool) -> None:
        """Either change clears it: going dark, invalidations may be missed from now on;
        going live, no fill whose read started in the dark (and may have missed one) may land."""
        if live != self._live:
            self.clear()
        self._live = live

    def __len__(self) -> int:
        return len(self._entries)

    def snapshot(self) -> int:
        return self.history.snapshot()

    def get(self, key: K) -> E | None:
        if not self._live:
            return None
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at <= self._clock():
            self._remove(key)
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def clear(self) -> None:
        self.history.forget()
        self._entries.clear()
        self._bytes = 0

    def _fits(self, size: int) -> bool:
        return self._live and size <= self.max_bytes // 16

    def _store(self, key: K, entry: E) -> None:
        """Keeps entry (replacing the key's), then evicts down to the bounds."""
        if key in self._entries:
            self._remove(key)
        self._entries[key] = entry
        self._bytes += self._weight(entry)
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._remove(next(iter(self._entries)))

    @abc.abstractmethod
    def _weight(self, entry: E) -> int:
        """The bytes an entry counts against max_bytes."""

    def _remove(self, key: K) -> E:
        entry = self._entries.pop(key)
        self._bytes -= self._weight(entry)
        return entry
