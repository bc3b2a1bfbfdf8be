"""How cache keys and entries are laid out in Redis (docs/cache.md, "The Redis store",
has the names). The namespace sits in a Redis Cluster hash tag, so an entry and its
generation hash always share a slot: the Lua scripts that touch both stay single-slot.

Records are strings, <version> being the log position the value was read at:

    V<version>|<content type length>|<content type><value>   a value
    N<version>|<content type length>|<content type>          a negative entry
    T<position>|                                             a tombstone: invalidated there
"""

from __future__ import annotations

from services.cache.client.keys import namespace_of
from services.cache.sidecar.stores.base import Found

_REDIS_GLOB_SPECIALS = frozenset("*?[]\\")


def redis_glob_escape(text: str) -> str:
    return "".join("\\" + c if c in _REDIS_GLOB_SPECIALS else c for c in text)


def record(kind: str, version: int, content_type: str, value: bytes) -> bytes:
    """A V or N record."""
    encoded = content_type.encode()
    return b"%s%d|%d|" % (kind.encode(), version, len(encoded)) + encoded + value


def parse_record(raw: bytes) -> Found:
    """A V or N record's entry."""
    version_end = raw.index(b"|", 1)
    length_end = raw.index(b"|", version_end + 1)
    start = length_end + 1
    end = start + int(raw[version_end + 1 : length_end])
    return Found(raw[end:], raw[start:end].decode(), raw[:1] == b"N", int(raw[1:version_end]))


class KeyLayout:
    """Physical names under one prefix (one per deployment; tests use their own)."""

    def __init__(self, prefix: str = "dh:") -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the Redis key prefix must not contain '{' or '}': it would break the hash tags")
        self.prefix = prefix
        self.channel = f"{prefix}invalidations"
        # Outside the data and generation names, so no clear or glob ever matches them.
        self.position = f"{prefix}sync:{{log}}"
        self._data_start = f"{prefix}{{"

    def data_key(self, key: str) -> str:
        namespace = namespace_of(key)
        return f"{self._data_start}{namespace}}}{key[len(namespace):]}"

    def generations_key(self, namespace: str) -> str:
        return f"{self.prefix}gen:{{{namespace}}}"

    def logical_key(self, physical: bytes | str) -> str | None:
        """The cache key a data key stands for; None for a name that is not one."""
        name = physical.decode() if isinstance(physical, bytes) else physical
        if not name.startswith(self._data_start):
            return None
        rest = name[len(self._data_start) :]
        close = rest.find("}")
        return None if close < 0 else rest[:close] + rest[close + 1 :]

    def data_match(self, literal_prefix: str) -> str:
        """A SCAN MATCH pattern covering every data key whose cache key starts with
        literal_prefix (a superset: results are filtered with the exact glob)."""
        if ":" not in literal_prefix:
            return redis_glob_escape(self._data_start + literal_prefix) + "*"
        return redis_glob_escape(self.data_key(literal_prefix)) + "*"

    def generations_match(self) -> str:
        return redis_glob_escape(f"{self.prefix}gen:{{") + "*"
