"""How a client reaches DevOps Hub: which address serves each service, a channel that
presents an API key on every call, and the retries and deadlines it applies.

The system is several gRPC servers: each service's proto names the part that serves
it (`option (backend)`), and that part listens at `<BACKEND>_ADDR`, the variable the
stack itself reads. Retries and deadlines are gRPC's service config, built from the
descriptors: every unary call gets a deadline; reads (an RPC whose HTTP rule is a GET)
are retried on UNAVAILABLE, as a restarting server answers, since repeating them is safe.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from google.api import annotations_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from devops_hub.v1 import agents_pb2, auth_pb2, cache_pb2, events_pb2, options_pb2, workflows_pb2

# The services a client calls, by name.
SERVICES: dict[str, ServiceDescriptor] = {
    service.name: service
    for module in (agents_pb2, auth_pb2, workflows_pb2, events_pb2, cache_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
}
# Where each part listens unless <BACKEND>_ADDR says otherwise: the stack's own defaults.
DEFAULT_ADDRESSES = {"agents": "127.0.0.1:50051", "workflows": "127.0.0.1:50052", "cache": "127.0.0.1:50053"}
DEFAULT_TIMEOUT = 10.0
RETRY_ATTEMPTS = 4

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def backend_of(service: ServiceDescriptor) -> str:
    """The part that serves `service`, as its `option (backend)` declares ("" if none)."""
    return str(service.GetOptions().Extensions[options_pb2.backend])  # type: ignore[index]  # protoc's .pyi types extensions as plain FieldDescriptors


def addresses_from_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Each part's address: AGENTS_ADDR, WORKFLOWS_ADDR, CACHE_ADDR, else the defaults."""
    return {backend: env.get(f"{backend.upper()}_ADDR") or default for backend, default in DEFAULT_ADDRESSES.items()}


def is_read(method: MethodDescriptor) -> bool:
    """An RPC served over HTTP as a GET: safe to repeat."""
    return bool(method.GetOptions().Extensions[annotations_pb2.http].HasField("get"))


def service_config(timeout: float = DEFAULT_TIMEOUT, attempts: int = RETRY_ATTEMPTS) -> str:
    """The service config (JSON) of a client channel: a deadline of `timeout` seconds on
    every unary call, and up to `attempts` tries of a read that found no server."""
    retry = {
        "maxAttempts": attempts,
        "initialBackoff": "0.1s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    groups: dict[tuple[bool, bool], list[dict[str, str]]] = {}
    for service in SERVICES.values():
        for method in service.methods:
            key = (is_read(method), method.server_streaming)
            groups.setdefault(key, []).append({"service": service.full_name, "method": method.name})
    configs: list[dict[str, Any]] = []
    for (read, streaming), names in sorted(groups.items()):
        # A stream lives as long as its reader wants: no deadline.
        config: dict[str, Any] = {"name": names, **({} if streaming else {"timeout": f"{timeout:g}s"})}
        configs.append({**config, "retryPolicy": retry} if read else config)
    return json.dumps({"methodConfig": configs})


def open_channel(
    address: str, api_key: str = "", *, timeout: float = DEFAULT_TIMEOUT, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A channel to `address` that presents `api_key` and applies service_config()."""
    merged = dict([("grpc.service_config", service_config(timeout)), ("grpc.enable_retries", 1), *options])
    return grpc.aio.insecure_channel(address, options=list(merged.items()), interceptors=key_interceptors(api_key) or None)


class _KeyMetadata:
    """Adds the key to a call's metadata, unless the call carries one already."""

    def __init__(self, key: str) -> None:
        self._entry = ("x-api-key", key)

    def details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        # Metadata iterates (key, value) pairs but `in` tests keys; keys() says so to the type checker.
        if "x-api-key" not in metadata.keys() and "authorization" not in metadata.keys():
            metadata.add(*self._entry)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


# grpc.aio files an interceptor under one call type only, so each type has its own class.
class _UnaryWithKey(_KeyMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Req], Awaitable[grpc.aio.UnaryUnaryCall[Req, Resp]]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Req,
    ) -> Resp | grpc.aio.UnaryUnaryCall[Req, Resp]:
        return await continuation(self.details(client_call_details), request)


class _StreamWithKey(_KeyMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Req], Awaitable[grpc.aio.UnaryStreamCall[Req, Resp]]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Req,
    ) -> AsyncIterator[Resp] | grpc.aio.UnaryStreamCall[Req, Resp]:
        return await continuation(self.details(client_call_details), request)


def key_interceptors(key: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that present `key` as x-api-key on every call (none for no key)."""
    return [_UnaryWithKey(key), _StreamWithKey(key)] if key else []
