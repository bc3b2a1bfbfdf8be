"""Walking into JSON-like values by dotted paths ("a.b.0"), shared by step references
and the built-in agents so both read paths the same way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class PathNotFound(LookupError):
    def __init__(self, segment: str) -> None:
        super().__init__(f"no {segment!r} in the value")
        self.segment = segment


def walk(value: Any, segments: Sequence[str]) -> Any:
    """The value at `segments` below `value`: object keys, or list indexes as digits."""
    current = value
    for segment in segments:
        if isinstance(current, dict) and segment in current:
            current = current[segment]
        elif isinstance(current, list) and segment.isdigit() and int(segment) < len(current):
            current = current[int(segment)]
        else:
            raise PathNotFound(segment)
    return current
