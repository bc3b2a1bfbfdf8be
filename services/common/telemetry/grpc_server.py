"""What every gRPC server records about every call: metrics, the request context for
the logs, and (when on) a SERVER span continuing the caller's trace and a profile of
slow calls.

The interceptor wraps each method's handler once and memoises it. Layers are chosen
when a handler is wrapped: with tracing and profiling off, a call pays for two clock
reads, a context variable and two pre-bound metric updates, and nothing else.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Status, StatusCode

from services.common.telemetry import context, profiling, tracing
from services.common.telemetry.metrics import GRPC_TYPES, SERVER_ERROR_CODES, GrpcServerMetrics, MethodMetrics, service_metrics
from services.common.telemetry.profiling import SlowRequestProfiler

_UNSET: Any = object()

# (request streaming, response streaming) → the handler factory.
_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class _MetadataGetter(Getter):
    """Reads W3C trace context from a call's invocation metadata."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        values = [value for name, value in carrier if name == key and isinstance(value, str)]
        return values or None

    def keys(self, carrier: Any) -> list[str]:
        return [name for name, _ in carrier]


_GETTER = _MetadataGetter()


def outcome(exc: BaseException | None, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status a call ended with, as its client will see it."""
    if isinstance(exc, asyncio.CancelledError):
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    # An exception the handler did not turn into a status is UNKNOWN to the client.
    return grpc.StatusCode.UNKNOWN if exc is not None else grpc.StatusCode.OK


class ServerTelemetry(grpc.aio.ServerInterceptor):
    """The first interceptor of every GrpcHost. Tracer and profiler default to the
    process's (None when off), as configured before the host is built."""

    def __init__(
        self,
        metrics: GrpcServerMetrics | None = None,
        *,
        tracer: trace.Tracer | None = _UNSET,
        profiler: SlowRequestProfiler | None = _UNSET,
    ) -> None:
        self._metrics = metrics or service_metrics().grpc
        self._tracer = tracing.tracer() if tracer is _UNSET else tracer
        self._profiler = profiling.profiler() if profiler is _UNSET else profiler
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = await continuation(handler_call_details)
        wrapped = self._wrap(handler, method) if handler is not None else None
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        path = method.lstrip("/")
        service, _, name = path.rpartition("/")
        shape = (bool(handler.request_streaming), bool(handler.response_streaming))
        kind, factory = GRPC_TYPES[shape], _FACTORIES[shape]
        behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        stats = self._metrics.method(service, name, kind)
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        if handler.response_streaming and inspect.isasyncgenfunction(behavior):
            wrapped = _measured_stream(behavior, stats)
            if self._tracer is not None:
                wrapped = _traced_stream(wrapped, self._tracer, path, attributes)
        else:
            wrapped = _measured(behavior, stats)
            if self._profiler is not None and not handler.response_streaming:
                wrapped = _profiled(wrapped, self._profiler, path)
            if self._tracer is not None:
                wrapped = _traced(wrapped, self._tracer, path, attributes)
        return factory(wrapped, handler.request_deserializer, handler.response_serializer)


def _measured(behavior: Callable, stats: MethodMetrics) -> Callable:
    async def handle(request, context_):
        context.bind_call(context_)
        started = time.perf_counter()
        failure = None
        try:
            return await behavior(request, context_)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            stats.observe(outcome(failure, context_), time.perf_counter() - started)

    return handle


def _measured_stream(behavior: Callable, stats: MethodMetrics) -> Callable:
    async def handle(request, context_):
        context.bind_call(context_)
        started = time.perf_counter()
        failure = None
        try:
            async for item in behavior(request, context_):
                yield item
        except BaseException as exc:
            failure = exc
            raise
        finally:
            stats.observe(outcome(failure, context_), time.perf_counter() - started)

    return handle


def _profiled(behavior: Callable, profiler: SlowRequestProfiler, path: str) -> Callable:
    async def handle(request, context_):
        profile = profiler.begin()
        started = time.perf_counter()
        try:
            return await behavior(request, context_)
        finally:
            profiler.end(profile, path, time.perf_counter() - started)

    return handle


def _server_span(tracer: trace.Tracer, path: str, attributes: dict, context_: grpc.aio.ServicerContext):
    parent = propagate.extract(context_.invocation_metadata() or (), getter=_GETTER)
    return tracer.start_as_current_span(
        path,
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    )


def _close_span(span: trace.Span, code: grpc.StatusCode) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in SERVER_ERROR_CODES:
        span.set_status(Status(StatusCode.ERROR, code.name))


def _traced(behavior: Callable, tracer: trace.Tracer, path: str, attributes: dict) -> Callable:
    async def handle(request, context_):
        with _server_span(tracer, path, attributes, context_) as span:
            failure = None
            try:
                return await behavior(request, context_)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                _close_span(span, outcome(failure, context_))

    return handle


def _traced_stream(behavior: Callable, tracer: trace.Tracer, path: str, attributes: dict) -> Callable:
    async def handle(request, context_):
        with _server_span(tracer, path, attributes, context_) as span:
            failure = None
            try:
                async for item in behavior(request, context_):
                    yield item
            except BaseException as exc:
                failure = exc
                raise
            finally:
                _close_span(span, outcome(failure, context_))

    return handle
