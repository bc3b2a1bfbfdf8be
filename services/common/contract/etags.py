"""Etags (revisions) and event ids are BIGINT columns written as decimal text: the one reading of them."""

from __future__ import annotations

# A longer number names no row and must not reach SQL.
_MAX_BIGINT = 2**63 - 1


def revision_of(text: str) -> int | None:
    """The revision (or event id) `text` names, or None for one this service never
    issued: not ASCII digits (str.isdigit also takes '³', which int() refuses), or
    beyond what a BIGINT column holds."""
    if not (text.isascii() and text.isdigit()):
        return None
    number = int(text)
    return number if number <= _MAX_BIGINT else None
