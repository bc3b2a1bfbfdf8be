"""Freshness, both ways. A read RPC declares in its .proto (`cache_max_age`) how long
its answer may be reused: the service's caches keep it that long and every answer
says it as `cache-control: max-age=N`, so whoever caches downstream learns its
lifetime from the service, never from a table of its own. A caller that sends
`cache-control: no-cache` gets, under fresh_reads() (set by grpc_calls.py), reads
that bypass every cache layer and refill them.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator

from devops_hub.v1 import options_pb2
from google.protobuf.descriptor import MethodDescriptor

from services.common.contract.api import discover_services, method_path

CACHE_CONTROL = "cache-control"


def max_age(method: MethodDescriptor) -> int:
    """Seconds the method's answers may be reused; 0 when it is not cacheable."""
    max_age: int = method.GetOptions().Extensions[options_pb2.cache_max_age]  # type: ignore[index]  # protoc's .pyi types extensions as plain FieldDescriptors
    return max_age


def max_ages() -> dict[str, int]:
    """'/pkg.Service/Method' -> seconds, for every cacheable method of the API."""
    methods = (method for service in discover_services() for method in service.methods)
    return {method_path(method): max_age(method) for method in methods if max_age(method)}


def cache_control(seconds: int) -> tuple[str, str]:
    return (CACHE_CONTROL, f"max-age={seconds}")


_FRESH: contextvars.ContextVar[bool] = contextvars.ContextVar("fresh_reads", default=False)


def fresh_reads_requested() -> bool:
    return _FRESH.get()


@contextlib.contextmanager
def fresh_reads() -> Iterator[None]:
    token = _FRESH.set(True)
    try:
        yield
    finally:
        _FRESH.reset(token)


def asks_for_fresh(metadata: Iterable[tuple[str, str | bytes]]) -> bool:
    """True when request metadata carries a cache-control with no-cache or no-store
    (RFC 9111 §5.2.1)."""
    for name, value in metadata:
        if name == CACHE_CONTROL:
            text = value if isinstance(value, str) else value.decode("latin-1")
            if {part.strip().split("=", 1)[0].lower() for part in text.split(",")} & {"no-cache", "no-store"}:
                return True
    return False
