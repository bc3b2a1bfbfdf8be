"""The edge cache: ready GET answers (header lines and body bytes, as the gateway writes
them) kept in the gateway's memory, so a hot read never becomes a gRPC call (docs/cache.md,
"The near-cache, the edge cache and Watch").

The service says with each answer what may be kept, for how long and until which
invalidation (surrogate_keys.py), never a table here. A pattern drops every entry with a
surrogate key it matches, not the one with its own key: hence an index from surrogate key
to entries.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable

from services.cache.client.freshness import CACHE_CONTROL
from services.cache.client.keys import GlobPattern
from services.cache.client.near_cache import FedCache
from services.cache.edge.surrogate_keys import CACHE_INVALIDATED, CACHE_VERSION, SURROGATE_KEY

EdgeKey = tuple[str, bytes]
Headers = tuple[tuple[bytes, bytes], ...]
# What a 304 leaves out of a 200's header lines.
_CONTENT_HEADERS = frozenset({b"content-type", b"content-length"})
# The last tenth of an entry's life, when its first reader refreshes it and the others are
# still answered from it: a hot answer never expires under load (docs/cache.md).
REFRESH_AHEAD = 0.1


@dataclasses.dataclass(slots=True)
class EdgeEntry:
    body: bytes
    # The answer's header lines as ASGI sends them, made once when it is kept: all of
    # them for a 200, the validators alone for a 304, which has no body.
    head: Headers
    validators: Headers
    etag: str
    surrogate_keys: tuple[str, ...]
    stored_at: float
    expires_at: float
    version: int
    refresh_at: float
    refreshing: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Said:
    """What a service said about its answer: max-age, the cache keys it read, the log position it read them at."""

    max_age: int
    keys: tuple[str, ...]
    version: int


def cacheable(trailers: Iterable[tuple[str, object]]) -> Said | None:
    """What the service said with its answer, when it said all of it; else None."""
    max_age = 0
    keys: tuple[str, ...] = ()
    version: int | None = None
    for name, value in trailers or ():
        if not isinstance(value, str):
            continue
        if name == CACHE_CONTROL:
            for directive in value.split(","):
                field, _, seconds = directive.strip().partition("=")
                if field.lower() == "max-age" and seconds.isdigit():
                    max_age = int(seconds)
        elif name == SURROGATE_KEY:
            keys = tuple(value.split())
        elif name == CACHE_VERSION and value.isdigit():
            version = int(value)
    return Said(max_age, keys, version) if max_age > 0 and keys and version is not None else None


def write_of(trailers: Iterable[tuple[str, object]]) -> tuple[int, list[str]] | None:
    """(log position, patterns) of a write's answer, if it made anything stale."""
    for name, value in trailers or ():
        if name == CACHE_INVALIDATED and isinstance(value, str):
            position, *patterns = value.split()
            if position.isdigit() and patterns:
                return int(position), patterns
    return None


class EdgeCache(FedCache[EdgeKey, EdgeEntry]):
    def __init__(
        self, *, max_entries: int, max_bytes: int, max_ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(max_entries=max_entries, max_bytes=max_bytes, max_ttl=max_ttl, clock=clock)
        self._by_key: dict[str, set[EdgeKey]] = {}

    def get(self, key: EdgeKey) -> EdgeEntry | None:
        entry = super().get(key)
        if entry is not None and not entry.refreshing and self._clock() >= entry.refresh_at:
            entry.refreshing = True
            return None  # this reader's answer replaces it
        return entry

    def age(self, entry: EdgeEntry) -> int:
        """Whole seconds since the answer was stored (the Age header)."""
        return int(self._clock() - entry.stored_at)

    def put(self, key: EdgeKey, body: bytes, head: Iterable[tuple[bytes, bytes]], said: Said) -> bool:
        """Stores a 200 answer, whose header lines name its ETag."""
        if not self._fits(len(body)):
            return False
        if any(self.history.raced(surrogate, said.version) for surrogate in said.keys):
            return False
        head = tuple(head)
        etag = next((value.decode("latin-1") for name, value in head if name == b"etag"), None)
        if etag is None:
            return False
        validators = tuple((name, value) for name, value in head if name not in _CONTENT_HEADERS)
        now = self._clock()
        ttl = min(said.max_age, self.max_ttl)
        entry = EdgeEntry(body, head, validators, etag, said.keys, now, now + ttl, said.version, now + ttl * (1 - REFRESH_AHEAD))
        self._store(key, entry)
        for surrogate in said.keys:
            self._by_key.setdefault(surrogate, set()).add(key)
        return True

    def holds_older(self, key: str, at: int) -> bool:
        return any(self._entries[held].version < at for held in self._by_key.get(key, ()))

    def _drop(self, pattern: GlobPattern) -> None:
        if pattern.kind == "exact":
            gone = self._by_key.get(pattern.text, ())
        else:
            # Bounded by max_entries' distinct keys: the cache is small by design.
            gone = {key for surrogate, keys in self._by_key.items() if pattern.matches(surrogate) for key in keys}
        for key in list(gone):
            self._remove(key)

    def clear(self, at: int) -> None:
        super().clear(at)
        self._by_key.clear()

    def _weight(self, entry: EdgeEntry) -> int:
        return len(entry.body)

    def _remove(self, key: EdgeKey) -> EdgeEntry:
        entry = super()._remove(key)
        for surrogate in entry.surrogate_keys:
            keys = self._by_key.get(surrogate)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_key[surrogate]
        return entry
