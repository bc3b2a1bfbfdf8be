"""The in-process near-cache: a small LRU in front of the sidecar, so a hot read never
leaves the process.

It is only trusted while fed: the client's Watch stream marks it live on its first
message and clears it the moment the stream drops or goes silent, since
invalidations may then be missed. Entries live at most max_ttl whatever their TTL in
the sidecar, as a bound on any staleness nobody anticipated.

A fill must not land after an invalidation that it raced (the reader fetched the old
value just before a write elsewhere was invalidated): every value carries its
version, the log position it was read at, and is refused if an invalidation matching
its key (or a clear) was recorded after it (history.py; the client shares one
history between its near-cache and its single-flight loads). Values are kept as bytes
and decoded per hit, so callers never share a mutable object through the cache; a
caller whose answer goes out encoded takes the bytes as they are (load_encoded).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from services.cache.client.fed_cache import FedCache
from services.cache.client.history import InvalidationHistory
from services.cache.client.keys import GlobPattern

DEFAULT_MAX_ENTRIES = 1024
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_TTL = 10.0


@dataclasses.dataclass(slots=True)
class NearEntry:
    content_type: str
    value: bytes
    negative: bool
    expires_at: float
    version: int


class NearCache(FedCache[str, NearEntry]):
    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_ttl: float = DEFAULT_MAX_TTL,
        clock: Callable[[], float] = time.monotonic,
        history: InvalidationHistory | None = None,
    ) -> None:
        super().__init__(max_entries=max_entries, max_bytes=max_bytes, max_ttl=max_ttl, clock=clock, history=history)

    def put(self, key: str, content_type: str, value: bytes, negative: bool, ttl: float, version: int) -> bool:
        """Stores unless not live, too big, or raced by an invalidation after `version`."""
        if not self._fits(len(value)) or self.history.raced(key, version):
            return False
        ttl = min(ttl, self.max_ttl) if ttl > 0 else self.max_ttl
        self._store(key, NearEntry(content_type, value, negative, self._clock() + ttl, version))
        return True

    def holds_older(self, key: str, at: int) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.version < at

    def _drop(self, pattern: GlobPattern) -> None:
        if pattern.kind == "exact":
            if pattern.text in self._entries:
                self._remove(pattern.text)
            return
        # Bounded by max_entries: the near-cache is small by design.
        for key in [key for key in self._entries if pattern.matches(key)]:
            self._remove(key)

    def _weight(self, entry: NearEntry) -> int:
        return len(entry.value)
