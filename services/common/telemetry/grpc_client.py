"""Trace context on outgoing gRPC calls: a CLIENT span per call, and its W3C context
(`traceparent`, `tracestate`) in the call's metadata for the server to continue.

While tracing is installed, grpc.aio.insecure_channel and grpc.aio.secure_channel add
this interceptor to every channel they open. So every stub in the system (the
gateway's, the workflows service's, the cache client's) carries the context without
knowing about tracing, and when tracing is off channels are exactly what gRPC makes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Status, StatusCode

_originals: tuple[Callable[..., Any], Callable[..., Any]] | None = None
# Span-ending tasks of finished streams, kept referenced until they run.
_pending: set[asyncio.Task[None]] = set()


class TracingClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """One per channel, so spans name the server the channel talks to."""

    def __init__(self, tracer: trace.Tracer, target: str) -> None:
        self._tracer = tracer
        host, _, port = target.rpartition(":")
        self._address: dict[str, str | int] = {"server.address": host.strip("[]") or target}
        if port.isdigit():
            self._address["server.port"] = int(port)

    async def intercept_unary_unary(self, continuation, client_call_details, request):
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

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        span = self._start(client_call_details)
        try:
            call = await continuation(self._carrying(client_call_details, span), request)
        except BaseException:
            _end(span, grpc.StatusCode.UNKNOWN)
            raise
        # The stream is the caller's to read; its span ends when the call does.
        call.add_done_callback(lambda done: _end_later(span, done))
        return call

    def _start(self, details: grpc.aio.ClientCallDetails) -> trace.Span:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        path = method.lstrip("/")
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
        return details._replace(metadata=metadata)  # type: ignore[attr-defined]  # a namedtuple at run time


def _end(span: trace.Span, code: grpc.StatusCode) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


def _end_later(span: trace.Span, call: Any) -> None:
    async def read_code() -> None:
        _end(span, await call.code())

    task = asyncio.get_running_loop().create_task(read_code())
    _pending.add(task)
    task.add_done_callback(_pending.discard)


def instrument_channels(tracer: trace.Tracer) -> None:
    """Makes every grpc.aio channel opened from now on trace its calls into `tracer`."""
    global _originals
    uninstrument_channels()
    insecure, secure = grpc.aio.insecure_channel, grpc.aio.secure_channel

    def insecure_channel(target, options=None, compression=None, interceptors=None):
        return insecure(target, options, compression, [*(interceptors or ()), TracingClientInterceptor(tracer, target)])

    def secure_channel(target, credentials, options=None, compression=None, interceptors=None):
        return secure(
            target, credentials, options, compression, [*(interceptors or ()), TracingClientInterceptor(tracer, target)]
        )

    _originals = (insecure, secure)
    grpc.aio.insecure_channel, grpc.aio.secure_channel = insecure_channel, secure_channel


def uninstrument_channels() -> None:
    """Channels opened from now on are plain again (open ones keep tracing)."""
    global _originals
    if _originals is not None:
        grpc.aio.insecure_channel, grpc.aio.secure_channel = _originals
        _originals = None


def instrumented() -> bool:
    return _originals is not None
