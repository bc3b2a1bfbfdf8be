"""The bootstrap every gRPC service shares: one grpc.aio server with health,
reflection, telemetry and error translation, started on an address and stopped
gracefully.

A service's server.py builds its servicers, registers them on a GrpcHost and calls
run_until_stopped(); nothing else about serving is written twice.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from services.common.errors import InternalError, ServiceError
from services.common.outages import PROCESS as OUTAGES
from services.common.request_checks import check_request, tolerant
from services.common.telemetry.grpc_server import ServerTelemetry

log = logging.getLogger(__name__)

# Runs before every handler: raises a ServiceError to refuse the call (auth, rate limits).
Guard = Callable[[str, grpc.aio.ServicerContext], Awaitable[None]]

# Messages up to 16 MiB: a full batch of 1000 agents fits with room to spare.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns ServiceError (and any unexpected exception) into a status with details.

    Handlers are wrapped once per method and memoised: the wrapping is not paid per call.
    """

    def __init__(self, guard: Guard | None = None) -> None:
        self._guard = guard
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = await continuation(handler_call_details)
        wrapped = _wrap_handler(handler, method, self._guard) if handler is not None else None
        self._wrapped[method] = wrapped
        return wrapped


def _wrap_handler(handler: grpc.RpcMethodHandler, method: str, guard: Guard | None) -> grpc.RpcMethodHandler:
    async def admit(request, context) -> None:
        if guard is not None:
            await guard(method, context)
        check_request(request)

    if handler.unary_unary:
        behavior = handler.unary_unary

        async def unary_unary(request, context):
            try:
                await admit(request, context)
                return await behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - translated, never swallowed
                await _abort(context, exc, method)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, tolerant(handler.request_deserializer), handler.response_serializer
        )
    if handler.unary_stream:
        stream_behavior = handler.unary_stream
        if inspect.isasyncgenfunction(stream_behavior):

            async def unary_stream(request, context):
                try:
                    await admit(request, context)
                    async for item in stream_behavior(request, context):
                        yield item
                except Exception as exc:  # noqa: BLE001
                    await _abort(context, exc, method)

        else:
            # Handlers that write with context.write() (grpc.health.v1 Watch) are coroutines.
            async def unary_stream(request, context):
                try:
                    await admit(request, context)
                    return await stream_behavior(request, context)
                except Exception as exc:  # noqa: BLE001
                    await _abort(context, exc, method)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, tolerant(handler.request_deserializer), handler.response_serializer
        )
    # Client-streaming methods are not part of the API; pass them through untouched.
    return handler


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if not isinstance(exc, ServiceError):
        # A dependency that is down (and logged once for it), not a bug.
        exc = OUTAGES.unavailable(exc) or exc
    if not isinstance(exc, ServiceError):
        log.exception("unexpected error in %s", method)
        exc = InternalError("internal error; the service log has the details", reason="INTERNAL")
    status = rpc_status.to_status(exc.to_status())
    if exc.trailing_metadata:
        status = _Status(status.code, status.details, (*status.trailing_metadata, *exc.trailing_metadata))
    await context.abort_with_status(status)


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    """A status with trailing metadata beside its details (grpc.Status is abstract)."""


class GrpcHost:
    """One grpc.aio server: the service's servicers plus health and reflection."""

    def __init__(
        self,
        address: str,
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        guard: Guard | None = None,
        reflection: bool = True,
    ) -> None:
        self.address = address
        # Server reflection lists every method to anyone who asks, key or not: handy
        # for grpcurl and ghz, off where nobody should browse (GRPC_REFLECTION=false).
        self.reflection = reflection
        self.server = grpc.aio.server(
            # Telemetry first, so it sees every call as the client will: after errors
            # are translated, with the status they were translated to.
            interceptors=[ServerTelemetry(), ErrorInterceptor(guard), *interceptors],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 1),
            ],
        )
        self.health = health.aio.HealthServicer()
        self._service_names: list[str] = []
        self.port: int | None = None

    def add(self, register: Callable[[object, grpc.aio.Server], None], servicer: object, service_name: str) -> None:
        """Registers a servicer, e.g. add(add_AgentsServiceServicer_to_server, servicer, name)."""
        register(servicer, self.server)
        self._service_names.append(service_name)

    async def start(self) -> int:
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.reflection:
            reflection.enable_server_reflection(
                [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
            )
        self.port = self.server.add_insecure_port(self.address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.address}")
        await self.server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float, *, pre_stop: Iterable[Callable[[], Awaitable[None]]] = ()) -> None:
        """Health goes NOT_SERVING first so balancers stop sending, then in-flight calls finish.

        pre_stop hooks run once the server has stopped taking new calls and before the
        grace period is waited out: the place to end long-lived streams (Watch), which
        would otherwise hold the stop open for the whole grace period.
        """
        # Every service reads NOT_SERVING from here on, whatever sets it later.
        await self.health.enter_graceful_shutdown()
        stopping = asyncio.ensure_future(self.server.stop(grace))
        # One turn of the loop lets stop() begin refusing new calls first.
        await asyncio.sleep(0)
        try:
            for hook in pre_stop:
                await hook()
        finally:
            await stopping

    async def _set_health(self, status: int) -> None:
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    @property
    def bound_address(self) -> str:
        host = self.address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"


async def run_until_stopped(
    host: GrpcHost,
    name: str,
    grace: float,
    cleanups: Iterable[Callable[[], Awaitable[None]]] = (),
    *,
    pre_stop: Iterable[Callable[[], Awaitable[None]]] = (),
) -> None:
    """Serves until SIGTERM or SIGINT, then stops gracefully (running the pre_stop
    hooks, see GrpcHost.stop) and runs the clean-ups."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await host.start()
    print(f"{name} listening on grpc://{host.bound_address}", flush=True)
    await stop.wait()
    log.info("%s stopping (grace %.1fs)", name, grace)
    await host.stop(grace, pre_stop=pre_stop)
    for cleanup in cleanups:
        await cleanup()
