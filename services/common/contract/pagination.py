"""AIP-158 pagination: bounded page sizes and opaque, filter-bound page tokens.

A token carries the last key of the page it ends and a fingerprint of the request's
filters; a token replayed with other filters is refused instead of silently walking
a different result set.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from google.protobuf.message import Message

from services.common.contract.errors import invalid_fields

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

Item = TypeVar("Item")


def page_size(requested: int) -> int:
    if requested < 0:
        raise invalid_fields([("page_size", f"must not be negative, got {requested}")])
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def fingerprint(request: Message, without: Sequence[str] = ("page_size", "page_token")) -> str:
    """A digest of everything in the request but the fields `without` (by default,
    where and how much to read)."""
    rest = type(request)()
    rest.CopyFrom(request)
    for name in without:
        rest.ClearField(name)
    return hashlib.sha256(rest.SerializeToString(deterministic=True)).hexdigest()


def encode_token(after: str, request: Message) -> str:
    raw = json.dumps({"a": after, "f": fingerprint(request)[:16]}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(request: Message) -> str | None:
    """The key to read after, or None for the first page."""
    token: str = getattr(request, "page_token")  # noqa: B009 - every List request has one (AIP-158)
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after, bound_to = data["a"], data["f"]
        if not isinstance(after, str):
            raise TypeError
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise invalid_fields([("page_token", "is not a token this service issued")]) from None
    if bound_to != fingerprint(request)[:16]:
        raise invalid_fields([("page_token", "was issued for other filters; start again without a page_token")])
    return after


async def page(
    request: Message, load: Callable[[str | None, int], Awaitable[list[Item]]], key: Callable[[Item], str]
) -> tuple[list[Item], str]:
    """One page of what `load(after, limit)` reads in key order, and the token of the
    next page ("" on the last): the tail every List RPC shares."""
    size = page_size(getattr(request, "page_size"))  # noqa: B009 - every List request has one (AIP-158)
    # One item more than the page tells whether another page follows.
    found = await load(decode_token(request), size + 1)
    return found[:size], encode_token(key(found[size - 1]), request) if len(found) > size else ""
