"""Trace context on outgoing gRPC calls: a CLIENT span per call, and its W3C context
(`traceparent`, `tracestate`) in the call's metadata for the server to continue.
channels.py puts these interceptors on every channel it opens with a tracer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Status, StatusCode

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")

# Span-ending tasks of finished streams, kept referenced until they run.
_pending: set[asyncio.Task[None]] = set()


class _Tracing:
    """What both call types share; one pair per channel, so spans name the server the
    channel talks to."""

    def __init__(self, tracer: trace.Tracer, target: str) -> None:
        self._tracer = tracer
        host, _, port = target.rpartition(":")
        self._address: dict[str, str | int] = {"server.address": host.strip("[]") or target}
        if port.isdigit():
            self._address["server.port"] = int(port)

    def _start(self, details: grpc.aio.ClientCallDetails) -> trace.Span:
        method: str | bytes = details.method
        path = (method.decode() if isinstance(method, bytes) else method).lstrip("/")
        service, _, name = path.rpartition("/")
        return self._tracer.start_span(
            path,
            kind=trace.SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name, **self._address},
        )

    @staticmethod
    def _carrying(details: grpc.aio.ClientCallDetails, span: trace.Span) -> grpc.aio.ClientCallDetails:
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()), *carrier.items())
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


# grpc.aio files an interceptor under one call type only (the first of its bases it
# matches), so each call type has its own class. The system has no client-streaming RPC.
class _TracingUnaryUnary(_Tracing, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, _Request], Awaitable[grpc.aio.UnaryUnaryCall[_Request, _Response]]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: _Request,
    ) -> _Response | grpc.aio.UnaryUnaryCall[_Request, _Response]:
        span = self._start(client_call_details)
        try:
            call = await continuation(self._carrying(client_call_details, span), request)
            # Awaited here so that the span lasts as long as the call; the caller's own
            # await then returns the same, finished call's result.
            await call
        except grpc.aio.AioRpcError as error:
            _end(span, error.code())
            raise
        except asyncio.CancelledError:
            _end(span, grpc.StatusCode.CANCELLED)
            raise
        except BaseException:
            _end(span, grpc.StatusCode.UNKNOWN)
            raise
        _end(span, grpc.StatusCode.OK)
        return call


class _TracingUnaryStream(_Tracing, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, _Request], Awaitable[grpc.aio.UnaryStreamCall[_Request, _Response]]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: _Request,
    ) -> AsyncIterator[_Response] | grpc.aio.UnaryStreamCall[_Request, _Response]:
        span = self._start(client_call_details)
        try:
            call = await continuation(self._carrying(client_call_details, span), request)
        except BaseException:
            _end(span, grpc.StatusCode.UNKNOWN)
            raise
        # The stream is the caller's to read; its span ends when the call does.
        call.add_done_callback(lambda done: _end_later(span, done))
        return call


def tracing_interceptors(tracer: trace.Tracer, target: str) -> list[grpc.aio.ClientInterceptor]:
    return [_TracingUnaryUnary(tracer, target), _TracingUnaryStream(tracer, target)]


def _end(span: trace.Span, code: grpc.StatusCode) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


def _end_later(span: trace.Span, call: Any) -> None:
    # `call` is whatever grpc.aio hands a done callback (a call object with code()).
    async def read_code() -> None:
        _end(span, await call.code())

    task = asyncio.get_running_loop().create_task(read_code())
    _pending.add(task)
    task.add_done_callback(_pending.discard)
