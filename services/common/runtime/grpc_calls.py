"""The one wrapper every call of every service runs in, built once per method.

Around a handler sit telemetry (metrics, the request context for the logs, and when
on a SERVER span and a slow-call profile), the access guard, the method's freshness
(`cache-control` metadata, services/cache/client/freshness.py) and the translation of
errors into statuses (services/common/contract/errors.py). They used to be separate
interceptors, each one more coroutine and one more lookup per call; here the layers
a method needs are chosen when its handler is registered, and a call pays for one
function around its handler and nothing else.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import grpc
from opentelemetry import trace

from services.cache.client import freshness
from services.cache.edge import surrogate_keys
from services.common.contract.errors import grpc_status
from services.common.contract.request_checks import check_request, tolerant
from services.common.data.outages import Outages
from services.common.telemetry import context
from services.common.telemetry.grpc_server import KINDS, outcome, profiled, traced, traced_stream
from services.common.telemetry.metrics import GrpcServerMetrics, MethodMetrics
from services.common.telemetry.profiling import SlowRequestProfiler

if TYPE_CHECKING:
    from services.common.runtime.idempotency import Idempotency

Metadata = tuple[tuple[str, str], ...]
Context = grpc.aio.ServicerContext[Any, Any]
# A string: RpcMethodHandler is generic in grpc's type stubs only.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
# What a method does, as grpc.aio calls it: a coroutine function (which may also write
# its answers with context.write()), or, for a server stream, an async generator function.
Single = Callable[[Any, Context], Awaitable[Any]]
Streaming = Callable[[Any, Context], AsyncIterator[Any]]

# Runs before every handler: raises a ServiceError to refuse the call (auth, rate
# limits), or returns the trailing metadata an admitted call carries (its limits).
Guard = Callable[[str, Context], Awaitable[Metadata]]


class CallWrapper:
    """Untranslated errors are asked about `outages`: the database's, or a fresh set without one."""

    def __init__(
        self,
        guard: Guard | None = None,
        *,
        metrics: GrpcServerMetrics,
        idempotency: Idempotency | None = None,
        outages: Outages | None = None,
        tracer: trace.Tracer | None = None,
        profiler: SlowRequestProfiler | None = None,
    ) -> None:
        self._guard = guard
        self._idempotency = idempotency
        self._outages = Outages() if outages is None else outages
        self._metrics = metrics
        self._tracer = tracer
        self._profiler = profiler
        self._max_ages = freshness.max_ages()
        self._wrapped: dict[str, Handler] = {}

    def wrap(self, method: str, handler: Handler) -> Handler:
        """`handler` of '/pkg.Service/Method' inside every layer, made once per method."""
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = self._wrapped[method] = self._build(method, handler)
        return wrapped

    def _build(self, method: str, handler: Handler) -> Handler:
        path = method.lstrip("/")
        service, _, name = path.rpartition("/")
        kind, factory = KINDS[(bool(handler.request_streaming), bool(handler.response_streaming))]
        behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        if behavior is None:
            raise ValueError(f"{method} is registered without a behaviour")
        stats = self._metrics.method(service, name, kind)
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        # grpc's stubs type behaviours as the synchronous API's; under grpc.aio they are
        # the async kinds that Single and Streaming name.
        wrapped: Callable[..., Any]
        if handler.response_streaming and inspect.isasyncgenfunction(behavior):
            wrapped = _streaming(cast(Streaming, behavior), method, stats, self._guard, self._outages)
            if self._tracer is not None:
                wrapped = traced_stream(wrapped, self._tracer, path, attributes)
        else:
            # Handlers that write with context.write() (grpc.health.v1 Watch) are coroutines too.
            single = cast(Single, behavior)
            max_age = self._max_ages.get(method, 0)
            cacheable = max_age > 0 and not handler.response_streaming
            fresh = (freshness.cache_control(max_age),) if cacheable else ()
            if self._idempotency is not None and not handler.response_streaming:
                single = self._idempotency.wrap(single, method)
            wrapped = _single(single, method, stats, self._guard, fresh, self._outages)
            if self._profiler is not None and not handler.response_streaming:
                wrapped = profiled(wrapped, self._profiler, path)
            if self._tracer is not None:
                wrapped = traced(wrapped, self._tracer, path, attributes)
        # Bytes that do not decode, or hold what no engine stores, are answered as
        # INVALID_ARGUMENT once the guard has admitted the call (request_checks.py).
        return factory(wrapped, tolerant(handler.request_deserializer), _passing_bytes(handler.response_serializer))


def _passing_bytes(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """The method's serializer, except that an answer already in wire form (bytes: a
    cached reply, CacheClient.load_encoded) goes out as it is, not decoded and encoded
    again on every hit."""
    if serialize is None:
        return None

    def serialize_unless_bytes(reply: Any) -> bytes:
        return reply if type(reply) is bytes else serialize(reply)

    return serialize_unless_bytes


def _single(
    behavior: Single, method: str, stats: MethodMetrics, guard: Guard | None, fresh: Metadata, outages: Outages
) -> Single:
    """`fresh` (a cacheable method's max-age) goes out with a success. A cacheable read
    whose caller sent `cache-control: no-cache` reads past every cache layer
    (freshness.py); other methods never pay for looking."""

    async def handle(request: Any, context_: Context) -> Any:
        context.bind_call(context_)
        started = time.perf_counter()
        failure: BaseException | None = None
        trailers: Metadata = ()
        # An answer names the cache keys it was read from, or what it made stale (surrogate_keys.py).
        reads = surrogate_keys.start()
        try:
            if guard is not None:
                trailers = await guard(method, context_)
            check_request(request)
            if fresh and freshness.asks_for_fresh(context_.invocation_metadata() or ()):
                with freshness.fresh_reads():
                    reply = await behavior(request, context_)
            else:
                reply = await behavior(request, context_)
        except BaseException as exc:
            failure = exc
            await _abort_if_translatable(context_, exc, method, trailers, outages)
            raise
        else:
            trailers = (*trailers, *fresh, *surrogate_keys.metadata(reads, cacheable=bool(fresh)))
            if trailers:
                context_.set_trailing_metadata(trailers)
            return reply
        finally:
            surrogate_keys.stop(reads)
            stats.observe(outcome(failure, context_), time.perf_counter() - started)

    return handle


def _streaming(behavior: Streaming, method: str, stats: MethodMetrics, guard: Guard | None, outages: Outages) -> Streaming:
    """A handler that yields its answers: the guard's metadata is set before the first."""

    async def handle(request: Any, context_: Context) -> AsyncIterator[Any]:
        context.bind_call(context_)
        started = time.perf_counter()
        failure: BaseException | None = None
        trailers: Metadata = ()
        try:
            if guard is not None:
                trailers = await guard(method, context_)
                if trailers:
                    context_.set_trailing_metadata(trailers)
            check_request(request)
            async for item in behavior(request, context_):
                yield item
        except BaseException as exc:
            failure = exc
            await _abort_if_translatable(context_, exc, method, trailers, outages)
            raise
        finally:
            stats.observe(outcome(failure, context_), time.perf_counter() - started)

    return handle


async def _abort_if_translatable(context_: Context, exc: BaseException, method: str, trailers: Metadata, outages: Outages) -> None:
    """Ends the call with the status errors.py gives `exc`; cancellation, and a handler's
    own abort, pass through as they are."""
    if isinstance(exc, Exception) and not isinstance(exc, grpc.aio.AbortError):
        # A dependency that is down (and logged once for it, outages.py), not a bug.
        exc = outages.unavailable(exc) or exc
        await context_.abort_with_status(grpc_status(exc, method, trailers))


class _WrappedGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, wrapper: CallWrapper) -> None:
        self._inner = inner
        self._wrapper = wrapper

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        return self._wrapper.wrap(handler_call_details.method, handler)


class Registrar:
    """What a generated add_*_to_server is given instead of the server, so every
    handler it registers is wrapped before the server ever sees it."""

    def __init__(self, server: grpc.aio.Server, wrapper: CallWrapper) -> None:
        self._server = server
        self._wrapper = wrapper

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_WrappedGeneric(h, self._wrapper) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Handler]) -> None:
        self._server.add_registered_method_handlers(
            service, {name: self._wrapper.wrap(f"/{service}/{name}", handler) for name, handler in handlers.items()}
        )
