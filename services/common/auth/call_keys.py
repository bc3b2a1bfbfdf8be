"""The client side of keys: interceptors that present a key on every outgoing call.

Kept apart from the server-side wiring so that the channel factory can use them
without importing the guard (which imports the verifier, which opens channels).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

# Each interceptor method is generic over the call's messages, as grpc.aio declares it.
Req = TypeVar("Req")
Resp = TypeVar("Resp")


class _KeyMetadata:
    """Adds the service's own key to a call's metadata, unless it carries one already."""

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
    """Client interceptors that present `key` on every call (none for no key)."""
    return [_UnaryWithKey(key), _StreamWithKey(key)] if key else []

