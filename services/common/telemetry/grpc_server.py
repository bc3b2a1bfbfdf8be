"""What every gRPC server records about every call, as layers for the call wrapper
(services/common/runtime/grpc_calls.py): the status a call ended with as its client sees it,
and (when on) a SERVER span continuing the caller's trace and a profile of slow calls.

The wrapper picks layers once per method: with tracing and profiling off, a call pays
for two clock reads, a context variable and two pre-bound metric updates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Status, StatusCode

from services.common.telemetry.metrics import GRPC_TYPES, SERVER_ERROR_CODES
from services.common.telemetry.profiling import SlowRequestProfiler

# (request streaming, response streaming) → the grpc_type label and the handler factory.
KINDS = {
    streaming: (GRPC_TYPES[streaming], factory)
    for streaming, factory in {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }.items()
}


class _MetadataGetter(Getter[grpc.aio.Metadata]):
    """Reads W3C trace context from a call's invocation metadata."""

    def get(self, carrier: grpc.aio.Metadata, key: str) -> list[str] | None:
        values = [value for name, value in carrier if name == key and isinstance(value, str)]
        return values or None

    def keys(self, carrier: grpc.aio.Metadata) -> list[str]:
        return [name for name, _ in carrier]


_GETTER = _MetadataGetter()

Context = grpc.aio.ServicerContext[Any, Any]
# A method's behaviour as the call wrapper holds it: a coroutine for a unary response,
# an async generator for a streamed one.
Behavior = Callable[[Any, Context], Awaitable[Any]]
StreamBehavior = Callable[[Any, Context], AsyncIterator[Any]]
Attributes = dict[str, str]


# A client's deadline runs from when it sent the call, the server's from when gRPC
# received it, so the cancellation a client sends at its deadline can arrive just
# before the server's own (half a millisecond, seen under load).
DEADLINE_SLACK = 0.05


def outcome(exc: BaseException | None, context: Context) -> grpc.StatusCode:
    """The status a call ended with, as its client will see it."""
    if isinstance(exc, asyncio.CancelledError):
        remaining = context.time_remaining()
        passed = remaining is not None and remaining <= DEADLINE_SLACK
        return grpc.StatusCode.DEADLINE_EXCEEDED if passed else grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    # An exception the handler did not turn into a status is UNKNOWN to the client.
    return grpc.StatusCode.UNKNOWN if exc is not None else grpc.StatusCode.OK


def profiled(behavior: Behavior, profiler: SlowRequestProfiler, path: str) -> Behavior:
    async def handle(request: Any, context_: Context) -> Any:
        profile = profiler.begin()
        started = time.perf_counter()
        try:
            return await behavior(request, context_)
        finally:
            profiler.end(profile, path, time.perf_counter() - started)

    return handle


@contextmanager
def _server_span(tracer: trace.Tracer, path: str, attributes: Attributes, context_: Context) -> Iterator[None]:
    parent = propagate.extract(context_.invocation_metadata() or grpc.aio.Metadata(), getter=_GETTER)
    with tracer.start_as_current_span(
        path, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as span:
        failure = None
        try:
            yield
        except BaseException as exc:
            failure = exc
            raise
        finally:
            code = outcome(failure, context_)
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code in SERVER_ERROR_CODES:
                span.set_status(Status(StatusCode.ERROR, code.name))


def traced(behavior: Behavior, tracer: trace.Tracer, path: str, attributes: Attributes) -> Behavior:
    async def handle(request: Any, context_: Context) -> Any:
        with _server_span(tracer, path, attributes, context_):
            return await behavior(request, context_)

    return handle


def traced_stream(behavior: StreamBehavior, tracer: trace.Tracer, path: str, attributes: Attributes) -> StreamBehavior:
    async def handle(request: Any, context_: Context) -> AsyncIterator[Any]:
        with _server_span(tracer, path, attributes, context_):
            async for item in behavior(request, context_):
                yield item

    return handle
