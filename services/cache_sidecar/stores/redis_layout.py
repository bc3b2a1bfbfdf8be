"""How cache keys and entries are laid out in Redis (docs/cache.md has the picture).

Names, with the default prefix "dh:" and the logical key "agents:get:42":

    dh:{agents}:get:42      the entry: a string record (see below), with a TTL
    dh:gen:{agents}         the namespace's generation hash, no TTL
    dh:invalidations        the Pub/Sub channel that tells other sidecars
    dh:sync:{log}           the position in the invalidation log (redis_position.py),
    dh:sync:{log}:ahead     no TTL

The namespace sits in a Redis Cluster hash tag, so an entry and its generation
hash always share a slot: the Lua scripts that touch both stay single-slot, and a
namespace's keys can be read with one MGET per namespace.

Records are strings so that GetMany is a single MGET:

    V<stamp>|<content type length>|<content type><value>   a value
    N<stamp>|<content type length>|<content type>          a negative entry
    L<stamp>|<token>                                       a lease: a miss being filled

<stamp> is "<incarnation>.<g1>.<g2>…": the generation hash's incarnation id and the
counters of the key's prefix levels when the record was written. A record whose
stamp differs from the current one was invalidated; it is ignored and left to its TTL.
"""

from __future__ import annotations

import dataclasses

from services.common.cache.keys import namespace_of

_REDIS_GLOB_SPECIALS = frozenset("*?[]\\")


def redis_glob_escape(text: str) -> str:
    """text as a literal in a Redis MATCH pattern."""
    return "".join("\\" + c if c in _REDIS_GLOB_SPECIALS else c for c in text)


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    kind: str  # "V", "N" or "L"
    stamp: bytes
    body: bytes

    def content(self) -> tuple[str, bytes]:
        """(content_type, value) of a V or N record."""
        bar = self.body.index(b"|")
        length = int(self.body[:bar])
        start = bar + 1
        return self.body[start : start + length].decode(), self.body[start + length :]


def parse_record(record: bytes) -> Record:
    bar = record.index(b"|", 1)
    return Record(chr(record[0]), record[1:bar], record[bar + 1 :])


def value_body(content_type: str, value: bytes) -> bytes:
    """The part of a V or N record after the stamp."""
    encoded = content_type.encode()
    return b"%d|" % len(encoded) + encoded + value


class KeyLayout:
    """Physical names under one prefix (one per deployment; tests use their own)."""

    def __init__(self, prefix: str = "dh:") -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the Redis key prefix must not contain '{' or '}': it would break the hash tags")
        self.prefix = prefix
        self.channel = f"{prefix}invalidations"
        # Outside the data and generation names, so no clear or glob ever matches them.
        self.position = f"{prefix}sync:{{log}}"
        self.position_ahead = f"{prefix}sync:{{log}}:ahead"
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
