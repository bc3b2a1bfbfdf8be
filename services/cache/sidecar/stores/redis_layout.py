"""How cache keys and entries are laid out in Redis (docs/cache.md has the picture).

Names, with the default prefix "dh:" and the logical key "agents:get:42":

    dh:{agents}:get:42      the entry: a string record (see below), with a TTL
    dh:gen:{agents}         the namespace's generation hash: prefix level -> the log
                            position it was last invalidated at ("#": the whole
                            namespace; without it, new or lost, the hash vouches
                            for no record), no TTL
    dh:sync:{log}           the position in the invalidation log: a hash of applied
                            and floor; missing = fresh. No TTL
    dh:invalidations        the Pub/Sub channel that tells other sidecars' streams

The namespace sits in a Redis Cluster hash tag, so an entry and its generation hash
always share a slot: the Lua scripts that touch both stay single-slot.

Records are strings:

    V<version>|<content type length>|<content type><value>   a value
    N<version>|<content type length>|<content type>          a negative entry
    T<position>|                                             a tombstone: invalidated there

<version> is the log position the value was read at.
"""

from __future__ import annotations

import dataclasses

from services.cache.client.keys import namespace_of

_REDIS_GLOB_SPECIALS = frozenset("*?[]\\")


def redis_glob_escape(text: str) -> str:
    """text as a literal in a Redis MATCH pattern."""
    return "".join("\\" + c if c in _REDIS_GLOB_SPECIALS else c for c in text)


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    kind: str  # "V", "N" or "T"
    version: int
    body: bytes

    def content(self) -> tuple[str, bytes]:
        """(content_type, value) of a V or N record."""
        bar = self.body.index(b"|")
        length = int(self.body[:bar])
        start = bar + 1
        return self.body[start : start + length].decode(), self.body[start + length :]


def parse_record(record: bytes) -> Record:
    bar = record.index(b"|", 1)
    return Record(chr(record[0]), int(record[1:bar]), record[bar + 1 :])


def record(kind: str, version: int, content_type: str, value: bytes) -> bytes:
    """A V or N record."""
    encoded = content_type.encode()
    return b"%s%d|%d|" % (kind.encode(), version, len(encoded)) + encoded + value


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
        colon = literal_prefix.find(":")
        if colon < 0:
            return redis_glob_escape(self._data_start + literal_prefix) + "*"
        return redis_glob_escape(self.data_key(literal_prefix)) + "*"

    def generations_match(self) -> str:
        return redis_glob_escape(f"{self.prefix}gen:{{") + "*"
