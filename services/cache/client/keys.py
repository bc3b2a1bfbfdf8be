"""What a cache key is, and how glob patterns over keys are parsed and applied: one
answer to "which keys does this pattern remove" for both stores, the servicer and the
client (docs/cache.md, "Keys, namespaces and invalidation").
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
from collections.abc import Callable
from typing import Literal

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 4 * 1024 * 1024
MAX_CONTENT_TYPE_CHARS = 256
# Prefix levels that get O(1) invalidation; deeper ':' are ordinary characters.
# Bounded so that checking an entry's freshness costs at most this many lookups.
MAX_PREFIX_DEPTH = 4
# The namespaces DevOps Hub's own services cache under (services/agents/agents.py,
# services/workflows/workflows.py): the sidecar exports their hits and misses from start.
SERVICE_NAMESPACES = ("agents", "workflows")

_GLOB_CHARS = "*?["
_GLOB_CHAR_RE = re.compile(r"([*?\[])")


def namespace_of(key: str) -> str:
    colon = key.find(":")
    return key if colon < 0 else key[:colon]


def prefix_levels(key: str) -> list[str]:
    """The O(1)-invalidatable prefixes of a key: "agents:get:1" → ["agents:", "agents:get:"]."""
    levels: list[str] = []
    position = key.find(":")
    while position >= 0 and len(levels) < MAX_PREFIX_DEPTH:
        levels.append(key[: position + 1])
        position = key.find(":", position + 1)
    return levels


def escape_key(key: str) -> str:
    """A glob pattern matching exactly this key, so a Delete can travel as a pattern."""
    return _GLOB_CHAR_RE.sub(r"[\1]", key)


def key_problem(key: str) -> str | None:
    """Why a key (or a pattern) is unusable, or None; cheap enough for the Get hot path.
    The Redis store wraps the namespace in a Cluster hash tag ("{agents}"), which must be
    non-empty and unambiguous so a namespace's keys and its generation counters share a slot."""
    if not key:
        return "must not be empty"
    # A str of n characters has at most 4n UTF-8 bytes: short keys skip the encode.
    if len(key) * 4 > MAX_KEY_BYTES and len(key.encode()) > MAX_KEY_BYTES:
        return f"must be at most {MAX_KEY_BYTES} bytes of UTF-8"
    if key[0] == ":":
        return "must start with a namespace (the text before the first ':')"
    if "{" in key or "}" in key:
        namespace = namespace_of(key)
        if "{" in namespace or "}" in namespace:
            return "namespace (the text before the first ':') must not contain '{' or '}'"
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class GlobPattern:
    """A parsed fnmatch pattern. kind: "exact" (no glob characters), "prefix" (literal
    text then one final '*') or "glob"; every matching key starts with literal_prefix,
    which bounds a scan; level is set for a prefix the stores invalidate in O(1)."""

    text: str
    kind: Literal["exact", "prefix", "glob"]
    literal_prefix: str
    matches: Callable[[str], bool]

    @property
    def level(self) -> str | None:
        literal = self.literal_prefix
        if self.kind != "prefix" or not literal.endswith(":"):
            return None
        if literal.count(":") > MAX_PREFIX_DEPTH or literal[0] == ":":
            return None
        return literal


@functools.lru_cache(maxsize=1024)
def parse_pattern(pattern: str) -> GlobPattern:
    """Parses once per distinct pattern: services invalidate the same few patterns."""
    positions = [i for i in (pattern.find(c) for c in _GLOB_CHARS) if i >= 0]
    if not positions:
        return GlobPattern(pattern, "exact", pattern, lambda key: key == pattern)
    first = min(positions)
    literal = pattern[:first]
    if first == len(pattern) - 1 and pattern[first] == "*":
        return GlobPattern(pattern, "prefix", literal, lambda key: key.startswith(literal))
    # fnmatchcase semantics: no case folding, '*' crosses ':' like any other character.
    search = re.compile(fnmatch.translate(pattern)).match
    return GlobPattern(pattern, "glob", literal, lambda key: search(key) is not None)
