"""The freshness table, read once from the `cache_max_age` option of every RPC.

A read RPC declares in its .proto how long its answer may be reused. The service's
own caches keep it that long, and every successful response says it as
`cache-control: max-age=N` metadata, which the gateway passes on as the HTTP header:
so whoever caches an answer downstream learns its lifetime from the service, never
from a table of its own.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from devops_hub.v1 import options_pb2

from services.common.api import discover_services

CACHE_CONTROL = "cache-control"


def max_age(method: MethodDescriptor) -> int:
    """Seconds the method's answers may be reused; 0 when it is not cacheable."""
    return method.GetOptions().Extensions[options_pb2.cache_max_age]


def max_ages(services: Iterable[ServiceDescriptor] | None = None) -> dict[str, int]:
    """'/pkg.Service/Method' -> seconds, for every cacheable method of the API."""
    table = {}
    for service in discover_services() if services is None else services:
        for method in service.methods:
            seconds = max_age(method)
            if seconds:
                table[f"/{service.full_name}/{method.name}"] = seconds
    return table


def cache_control(seconds: int) -> tuple[str, str]:
    """The metadata entry a response carries to say how long it stays fresh."""
    return (CACHE_CONTROL, f"max-age={seconds}")
