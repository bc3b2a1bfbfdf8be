"""What an answer tells the caches downstream of it (the gateway's edge cache), as
CDNs learn it from Surrogate-Key headers: a cacheable read's keys (`surrogate-key`)
and the log position it was read at (`cache-version`), a write's position and
patterns (`cache-invalidated`), so the gateway it went through drops those answers
at once. While a call runs (the call wrapper start()s it), CacheClient.load notes
each read here and the outbox notes a write; a key that cannot travel in metadata
spoils the read: its answer says no keys, and nobody downstream may keep it.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Sequence

SURROGATE_KEY = "surrogate-key"
CACHE_VERSION = "cache-version"
CACHE_INVALIDATED = "cache-invalidated"
# Past this, a write's answer says "*" instead of its patterns (a batch of a thousand
# agents): gRPC refuses metadata over 16 KiB, and dropping everything is then cheaper.
MAX_SAID_BYTES = 8192


@dataclasses.dataclass(slots=True)
class Reads:
    """The cache keys one call read through the cache, their oldest version, whether any
    read cannot be named, and the write it made, if any."""

    keys: dict[str, None] = dataclasses.field(default_factory=dict)
    version: int | None = None
    spoiled: bool = False
    written: tuple[int, Sequence[str]] | None = None
    _token: contextvars.Token[Reads | None] | None = None


_CURRENT: contextvars.ContextVar[Reads | None] = contextvars.ContextVar("surrogate_keys", default=None)


def note_read(key: str, version: int) -> None:
    reads = _CURRENT.get()
    if reads is None:
        return
    if " " in key or not (key.isascii() and key.isprintable()):
        reads.spoiled = True
    else:
        reads.keys[key] = None
        reads.version = version if reads.version is None else min(reads.version, version)


def note_write(position: int, patterns: Sequence[str]) -> None:
    reads = _CURRENT.get()
    if reads is not None:
        reads.written = (position, patterns)


def start() -> Reads:
    reads = Reads()
    reads._token = _CURRENT.set(reads)
    return reads


def stop(reads: Reads) -> None:
    if reads._token is not None:
        _CURRENT.reset(reads._token)
        reads._token = None


def metadata(reads: Reads, *, cacheable: bool) -> tuple[tuple[str, str], ...]:
    said: tuple[tuple[str, str], ...] = ()
    if cacheable and not reads.spoiled and reads.keys and reads.version is not None:
        said = ((SURROGATE_KEY, " ".join(reads.keys)), (CACHE_VERSION, str(reads.version)))
    if reads.written is not None:
        position, patterns = reads.written
        text = " ".join(patterns)
        if len(text) > MAX_SAID_BYTES or not all(" " not in p and p.isascii() and p.isprintable() for p in patterns):
            text = "*"
        said += ((CACHE_INVALIDATED, f"{position} {text}"),)
    return said
