"""Etags are revisions written as decimal text: the one reading of them."""

from __future__ import annotations

# Revisions are BIGINT columns: a longer number names no revision and must not reach SQL.
_MAX_REVISION = 2**63 - 1


def revision_of(etag: str) -> int | None:
    """The revision an etag names, or None for one this service never issued (not
    ASCII digits, or beyond what a revision column holds)."""
    if not (etag.isascii() and etag.isdigit()):
        return None
    revision = int(etag)
    return revision if revision <= _MAX_REVISION else None
