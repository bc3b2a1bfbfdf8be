"""Which keys this process saw invalidated after a given log position (raced()): the
question a fill, a shared load and a hit from the sidecar must each answer before they
may hand out what they read, as the value may predate a write (docs/cache.md, the rule).

`known` is the furthest position this process knows committed (its own writes, and what
its stream delivered): a load that starts now reads at least that, which makes it the
load's version. Bounded: a version older than what it remembers (its floor, raised too
by a clear) counts as raced, the safe answer.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

from services.cache.client.keys import parse_pattern

HISTORY_SIZE = 4096


class InvalidationHistory:
    def __init__(self, size: int = HISTORY_SIZE) -> None:
        if size < 1:
            raise ValueError("the history must hold at least one invalidation")
        self._size = size
        self.known = 0
        self.floor = 0
        # Kept in log order (a stream's span may arrive after this process's own later
        # write), so a check reads only the records newer than its version.
        self._entries: list[tuple[int, Callable[[str], bool]]] = []

    def record(self, pattern: str, at: int) -> None:
        """An invalidation of log position `at` ("*", a clear, races every earlier version)."""
        self.learn(at)
        if pattern == "*":
            self.forget(at)
            return
        bisect.insort(self._entries, (at, parse_pattern(pattern).matches), key=lambda entry: entry[0])
        if len(self._entries) > self._size:
            self.floor = max(self.floor, self._entries.pop(0)[0])

    def learn(self, position: int) -> None:
        """Every log entry up to `position` has committed."""
        self.known = max(self.known, position)

    def forget(self, at: int) -> None:
        """Every version before `at` counts as raced from now on."""
        self.learn(at)
        self.floor = max(self.floor, at)
        self._entries.clear()

    def raced(self, key: str, version: int) -> bool:
        if version < self.floor:
            return True
        for at, matches in reversed(self._entries):
            if at <= version:
                return False
            if matches(key):
                return True
        return False
