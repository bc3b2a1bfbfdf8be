"""The in-process near-cache: a small LRU in front of the sidecar, so a hot read never
leaves the process.

It is only trusted while fed: the client's Watch stream marks it live on its first
message and clears it the moment the stream drops, since invalidations may then be
missed. Entries live at most max_ttl whatever their TTL in the sidecar, as a bound
on any staleness nobody anticipated.

A fill must not land after an invalidation that it raced (the reader fetched the old
value just before a write elsewhere was invalidated): every fill carries the
snapshot() taken before its sidecar read, and is refused if an invalidation matching
its key (or a clear) came after that snapshot (history.py; the client shares one
history between its near-cache and its single-flight loads). Values are kept as bytes and decoded
per hit, so callers never share a mutable object through the cache.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

from services.common.cache.history import InvalidationHistory
from services.common.cache.keys import parse_pattern

DEFAULT_MAX_ENTRIES = 1024
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_TTL = 10.0


@dataclasses.dataclass(slots=True)
class NearEntry:
    content_type: str
    value: bytes
    negative: bool
    expires_at: float


class NearCache:
    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_ttl: float = DEFAULT_MAX_TTL,
        clock: Callable[[], float] = time.monotonic,
        history: InvalidationHistory | None = None,
    ) -> None:
        if max_entries < 1 or max_bytes < 1 or max_ttl <= 0:
            raise ValueError("max_entries, max_bytes and max_ttl must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_ttl = max_ttl
        self._clock = clock
        self._entries: collections.OrderedDict[str, NearEntry] = collections.OrderedDict()
        self._bytes = 0
        self._live = False
        self.history = history or InvalidationHistory()
        self.hits = 0
        self.misses = 0

    @property
    def live(self) -> bool:
        return self._live

    def set_live(self, live: bool) -> None:
        """Live while a Watch stream feeds it. Either change clears it: going dark, as
        invalidations may be missed from now on; going live, so that no fill whose
        read started in the dark (and may have missed one) can land."""
        if live != self._live:
            self.clear()
        self._live = live

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> NearEntry | None:
        if not self._live:
            return None
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry.expires_at <= self._clock():
            self._remove(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def snapshot(self) -> int:
        return self.history.snapshot()

    def put(self, key: str, content_type: str, value: bytes, negative: bool, ttl: float, since: int) -> bool:
        """Stores unless not live, too big, or raced by an invalidation after `since`."""
        if not self._live or self.history.raced(key, since) or len(value) > self.max_bytes // 16:
            return False
        ttl = min(ttl, self.max_ttl) if ttl > 0 else self.max_ttl
        if key in self._entries:
            self._remove(key)
        self._entries[key] = NearEntry(content_type, value, negative, self._clock() + ttl)
        self._bytes += len(value)
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted.value)
        return True

    def invalidate(self, pattern: str) -> None:
        if pattern == "*":
            self.clear()
            return
        self.history.record(pattern)
        parsed = parse_pattern(pattern)
        if parsed.kind == "exact":
            if pattern in self._entries:
                self._remove(pattern)
            return
        # Bounded by max_entries: the near-cache is small by design.
        for key in [key for key in self._entries if parsed.matches(key)]:
            self._remove(key)

    def clear(self) -> None:
        self.history.forget()
        self._entries.clear()
        self._bytes = 0

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= len(entry.value)
