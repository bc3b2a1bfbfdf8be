"""Which keys were invalidated after a given moment: the question both a fill and a
shared load must answer before they may hand out what they read.

A reader takes snapshot() before it reads the sidecar or the database; raced(key,
snapshot) is then True if an invalidation matching key (or a clear) was recorded
since, in which case what it read may predate a write and must not be cached, nor
shared with a caller who arrived after that invalidation. The history is bounded:
a snapshot older than what it remembers counts as raced (the safe answer).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from services.common.cache.keys import parse_pattern

# Invalidations remembered; a snapshot older than all of them counts as raced.
DEFAULT_HISTORY = 256


class InvalidationHistory:
    def __init__(self, size: int = DEFAULT_HISTORY) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self._size = size
        self._version = 0
        # Snapshots below the floor cannot be checked (history dropped, or a clear).
        self._floor = 0
        self._entries: collections.deque[tuple[int, Callable[[str], bool]]] = collections.deque()

    def snapshot(self) -> int:
        return self._version

    def record(self, pattern: str) -> None:
        """One invalidation: "*" (a clear) races every earlier snapshot."""
        if pattern == "*":
            self.forget()
            return
        self._version += 1
        self._entries.append((self._version, parse_pattern(pattern).matches))
        if len(self._entries) > self._size:
            self._floor = self._entries.popleft()[0]

    def forget(self) -> None:
        """Every earlier snapshot counts as raced from now on."""
        self._version += 1
        self._floor = self._version
        self._entries.clear()

    def raced(self, key: str, since: int) -> bool:
        if since < self._floor:
            return True
        for version, matches in reversed(self._entries):
            if version <= since:
                return False
            if matches(key):
                return True
        return False
