"""Freshness on demand: a read whose caller sent `Cache-Control: no-cache` (HTTP) or
the gRPC metadata `cache-control: no-cache` bypasses every cache layer and refills
them with what it read.

The request's wish is carried in a context variable, set once per call by
FreshReadsInterceptor (every service's server installs it), so that every cached
read the call makes honours it without each use case passing a flag down.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import grpc

_FRESH: contextvars.ContextVar[bool] = contextvars.ContextVar("cache_fresh_reads", default=False)

METADATA_KEY = "cache-control"


def fresh_reads_requested() -> bool:
    return _FRESH.get()


@contextlib.contextmanager
def fresh_reads(fresh: bool = True) -> Iterator[None]:
    """Within the block, cached reads bypass the cache (and refill it)."""
    token = _FRESH.set(fresh)
    try:
        yield
    finally:
        _FRESH.reset(token)


def asks_for_fresh(cache_control: str) -> bool:
    """True for a Cache-Control value with no-cache or no-store (RFC 9111 §5.2.1)."""
    directives = {part.strip().split("=", 1)[0].lower() for part in cache_control.split(",")}
    return bool(directives & {"no-cache", "no-store"})


class FreshReadsInterceptor(grpc.aio.ServerInterceptor):
    """Sets the context variable for the call (grpc.aio runs the interceptors and the
    handler in the call's one task, so the value reaches the handler)."""

    async def intercept_service(self, continuation, handler_call_details):
        fresh = False
        for name, value in handler_call_details.invocation_metadata or ():
            if name == METADATA_KEY and asks_for_fresh(value if isinstance(value, str) else value.decode("latin-1")):
                fresh = True
        _FRESH.set(fresh)
        return await continuation(handler_call_details)
