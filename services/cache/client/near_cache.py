"""The in-process near-cache: a small LRU in front of the sidecar, so a hot read never
leaves the process; trusted only while fed (fed_cache.py). Entries live at most
max_ttl whatever their TTL in the sidecar, as a bound on any staleness nobody
anticipated. Values are kept as bytes and decoded per hit, so callers never share a
mutable object through the cache; an answer that goes out encoded takes the bytes as
they are (CacheClient.load_encoded).
"""

from __future__ import annotations

import dataclasses

from services.cache.client.fed_cache import FedCache
from services.cache.client.keys import GlobPattern


@dataclasses.dataclass(slots=True)
class NearEntry:
    content_type: str
    value: bytes
    negative: bool
    expires_at: float
    version: int  # the log position it was read at


class NearCache(FedCache[str, NearEntry]):
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
