"""The cache keys a cacheable call's answer was built from, said back as `surrogate-key`.

While a cacheable call runs (the call wrapper start()s it), every read through
the cache client (CacheClient.load) notes its key here. The answer then carries them
as `surrogate-key` trailing metadata beside its `cache-control`, so a cache
downstream (the gateway's edge cache) knows which invalidations must drop it, as CDNs
purge by Surrogate-Key. A read under no-cache counts (it refills the cache, and
the key's invalidations follow); a read that bypassed the cache because the key's
invalidation is still pending spoils the call: its answer says no keys, and nobody
downstream may keep it.
"""

from __future__ import annotations

import contextvars

SURROGATE_KEY = "surrogate-key"


class Reads:
    """The cache keys one call read through the cache, and whether any read went past it."""

    __slots__ = ("keys", "spoiled", "_token")

    def __init__(self) -> None:
        self.keys: dict[str, None] = {}
        self.spoiled = False
        self._token: contextvars.Token[Reads | None] | None = None


_CURRENT: contextvars.ContextVar[Reads | None] = contextvars.ContextVar("surrogate_keys", default=None)


def note_read(key: str, *, cached: bool) -> None:
    """One read of the current call: through the cache (`cached`), or past it."""
    reads = _CURRENT.get()
    if reads is None:
        return
    if not cached or " " in key or not (key.isascii() and key.isprintable()):
        reads.spoiled = True
    else:
        reads.keys[key] = None


def start() -> Reads:
    """From now on, in this context, cached reads are noted; stop() ends it."""
    reads = Reads()
    reads._token = _CURRENT.set(reads)
    return reads


def stop(reads: Reads) -> None:
    if reads._token is not None:
        _CURRENT.reset(reads._token)
        reads._token = None


def metadata(reads: Reads) -> tuple[tuple[str, str], ...]:
    """The `surrogate-key` entry for the reads noted, or none when the answer must not be cached."""
    if reads.spoiled or not reads.keys:
        return ()
    return ((SURROGATE_KEY, " ".join(reads.keys)),)
