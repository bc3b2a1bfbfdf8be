"""The host every gRPC service runs on: one grpc.aio server with health and
reflection, every handler registered inside the call wrapper (grpc_calls.py), started
on an address and stopped gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from opentelemetry import trace

from services.common.contract.limits import GRPC_SIZE_OPTIONS
from services.common.data.outages import Outages
from services.common.runtime.grpc_calls import CallWrapper, Guard, Registrar
from services.common.runtime.idempotency import Idempotency
from services.common.telemetry.metrics import GrpcServerMetrics
from services.common.telemetry.profiling import SlowRequestProfiler


def _descriptors(names: Iterable[str]) -> list[ServiceDescriptor]:
    pool = descriptor_pool.Default()
    found = []
    for name in names:
        with contextlib.suppress(KeyError):
            found.append(pool.FindServiceByName(name))
    return found


class GrpcHost:
    def __init__(
        self,
        address: str,
        *,
        metrics: GrpcServerMetrics,
        guard: Guard | None = None,
        reflection: bool = True,
        idempotency: Idempotency | None = None,
        outages: Outages | None = None,
        tracer: trace.Tracer | None = None,
        profiler: SlowRequestProfiler | None = None,
    ) -> None:
        self.address = address
        # Server reflection lists every method to anyone who asks, key or not: handy
        # for grpcurl and ghz, off where nobody should browse (GRPC_REFLECTION=false).
        self.reflection = reflection
        self._metrics = metrics
        # No interceptors: handlers are wrapped once, as they are registered, so a call
        # runs no interceptor chain before its handler.
        self.server = grpc.aio.server(
            options=[*GRPC_SIZE_OPTIONS, ("grpc.so_reuseport", 1)],
        )
        self._registrar = Registrar(self.server, CallWrapper(
            guard, metrics=metrics, idempotency=idempotency, outages=outages, tracer=tracer, profiler=profiler
        ))
        self.health = health.aio.HealthServicer()
        self._service_names: list[str] = []
        self.port: int | None = None

    def add(self, register: Callable[[object, Any], None], servicer: object, service_name: str) -> None:
        """Registers a servicer, e.g. add(add_AgentsServiceServicer_to_server, servicer, name)."""
        register(servicer, self._registrar)
        self._service_names.append(service_name)

    async def start(self) -> int:
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._registrar)
        names = [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        if self.reflection:
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(names), self._registrar)
        self._metrics.declare(_descriptors(names))
        self.port = self.server.add_insecure_port(self.address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.address}")
        await self.server.start()
        for name in ["", *self._service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float, *, pre_stop: Iterable[Callable[[], Awaitable[None]]] = ()) -> None:
        """Health goes NOT_SERVING first so balancers stop sending, then in-flight calls
        finish; `pre_stop` runs once no new call is taken (GrpcProcess.end_streams)."""
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

    @property
    def bound_address(self) -> str:
        host = self.address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"
