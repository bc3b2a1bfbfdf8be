"""The one shape of every serving process of DevOps Hub, the gRPC services and the gateway alike:

    build(settings) → start() → serve until SIGTERM or SIGINT → stop(grace) → close()

(docs/design.md, "One shape for every process"). run() is the whole life of a process
started with `python -m`, and running() is the part of it tests use, so a test starts
and closes a service through exactly the code production does.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol, TypeVar

import uvloop
from opentelemetry import trace

from services.common.data.db import Database, connect
from services.common.data.db.migrate import migrate
from services.common.data.idempotency_repository import IdempotencyRepository
from services.common.foundation.dependencies import DependencyUnavailable, check_redis
from services.common.foundation.settings import Settings
from services.common.runtime.grpc_calls import Guard
from services.common.runtime.grpc_host import GrpcHost
from services.common.runtime.idempotency import Idempotency
from services.common.telemetry import Telemetry
from services.common.telemetry.endpoint import Refresher
from services.common.telemetry.metrics import ServiceMetrics, service_metrics
from services.common.telemetry.profiling import SlowRequestProfiler

log = logging.getLogger(__name__)


class Process(Protocol):
    """What a server.py's build(settings) returns: wired, not yet started."""

    @property
    def address(self) -> str:
        """host:port it listens on, once started (the real port when asked for port 0)."""
        ...

    @property
    def listening(self) -> str:
        """Its address as a URL, e.g. grpc://127.0.0.1:50051."""
        ...

    @property
    def metrics_port(self) -> int:
        """Where GET /metrics is served beside it (0: not beside it)."""
        ...

    def refreshers(self) -> Sequence[Refresher]:
        """What brings its live gauges up to date before a scrape."""
        ...

    def serve_also_on(self, unix_socket: str) -> None:
        """Before start(): serve on the unix socket path too (HEALTH_SOCKET)."""
        ...

    async def start(self) -> None: ...

    async def stop(self, grace: float) -> None: ...

    async def close(self) -> None: ...


P = TypeVar("P", bound=Process)


class Build(Protocol):
    """A server.py's build: the process wired, with its Telemetry's tracer and profiler (None: off)."""

    def __call__(
        self, settings: Settings, *, tracer: trace.Tracer | None, profiler: SlowRequestProfiler | None
    ) -> Awaitable[Process]: ...


class GrpcProcess:
    """A gRPC service as a Process: its work behind a GrpcHost. Subclasses (dataclasses)
    have the host and metrics_port fields and a close(), and say what runs beside the
    handlers (start_work) and which streams end before the grace period (end_streams)."""

    host: GrpcHost
    metrics_port: int

    async def start(self) -> None:
        # The work behind the handlers first, the host last: the process listens, and
        # its health says SERVING, only once every call it admits can be served. The
        # other order lets a call reach an engine whose start has not yet failed the
        # executions a dead predecessor left, or a relay not yet running.
        await self.start_work()
        await self.host.start()

    async def start_work(self) -> None:
        """Starts what runs beside the handlers (engines, relays, stores); nothing here."""

    async def end_streams(self) -> None:
        """Ends long-lived streams once no new call is taken, so that they do not hold
        the stop open for the whole grace period; none here."""

    async def stop(self, grace: float) -> None:
        await self.host.stop(grace, pre_stop=[self.end_streams])

    @property
    def address(self) -> str:
        return self.host.bound_address

    @property
    def listening(self) -> str:
        return f"grpc://{self.address}"

    def refreshers(self) -> Sequence[Refresher]:
        return ()

    def serve_also_on(self, unix_socket: str) -> None:
        self.host.server.add_insecure_port(f"unix:{unix_socket}")


@dataclass(frozen=True)
class OnDatabase:
    """What the wiring of a service that owns tables is given (on_database)."""

    settings: Settings
    db: Database
    metrics: ServiceMetrics
    tracer: trace.Tracer | None
    profiler: SlowRequestProfiler | None

    def host(self, address: str, guard: Guard) -> GrpcHost:
        return GrpcHost(
            address,
            metrics=self.metrics.grpc,
            guard=guard,
            reflection=self.settings.grpc_reflection,
            idempotency=Idempotency(IdempotencyRepository(self.db), self.settings.idempotency_retention),
            outages=self.db.outages,
            tracer=self.tracer,
            profiler=self.profiler,
        )


def on_database(assemble: Callable[[OnDatabase], Awaitable[P]]) -> Callable[..., Awaitable[P]]:
    """A server.py's build for a service that owns tables: `assemble` wires it on the
    migrated database."""

    async def build(
        settings: Settings,
        metrics: ServiceMetrics | None = None,
        *,
        tracer: trace.Tracer | None = None,
        profiler: SlowRequestProfiler | None = None,
    ) -> P:
        metrics = metrics or service_metrics()
        db = await connect(
            settings.database_url,
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_max_overflow,
            pools=metrics.pools,
            tracer=tracer,
        )
        try:
            await migrate(db)
            return await assemble(OnDatabase(settings, db, metrics, tracer, profiler))
        except BaseException:
            # Its open connections (aiosqlite's threads) would otherwise keep a process
            # that cannot start from ever exiting.
            await db.close()
            raise

    return build


@asynccontextmanager
async def running(process: P, grace: float = 0.0) -> AsyncIterator[P]:
    """Starts `process`; on leaving the block, or if the start fails (what it started
    must not keep the process from exiting), stops it and closes it."""
    try:
        await process.start()
        yield process
    finally:
        try:
            await process.stop(grace)
        finally:
            await process.close()


def run(build: Build, *, name: str, service: str) -> None:
    """The whole life of a process: `name` ("agents service") is what the logs and
    the listening line call it, `service` ("agents") its name in telemetry."""
    # uvloop (libuv, in C) schedules callbacks and moves socket bytes for less CPU than
    # asyncio's own loop, and a service's hot path is exactly that: many small calls.
    uvloop.run(_live(build, name, service))


async def _live(build: Build, name: str, service: str) -> None:
    settings = Settings.from_env()
    # Before anything is built, so that what is built logs as configured.
    telemetry = Telemetry.start(settings, service)
    try:
        stopping = _stop_on_signals()
        try:
            if settings.redis_url:
                await check_redis(settings.redis_url)
            process = await build(settings, tracer=telemetry.tracer, profiler=telemetry.profiler)
        except DependencyUnavailable as exc:
            log.error("%s cannot start: %s", name, exc)
            raise SystemExit(1) from None
        if settings.health_socket:
            process.serve_also_on(settings.health_socket)
        async with running(process, settings.shutdown_grace):
            await telemetry.serve_metrics(name, process.address, process.metrics_port, process.refreshers())
            # The launcher and the tests wait for this line.
            print(f"{name} listening on {process.listening}\n", end="", flush=True)
            # What start-up built (modules, descriptors, the wiring) lives as long as the
            # process: out of the collector's reach, a full collection, which pauses every
            # request in flight, walks only what serving made (bench/gc_pause.py).
            gc.freeze()
            await stopping.wait()
            log.info("%s stopping (grace %.1fs)", name, settings.shutdown_grace)
    finally:
        await telemetry.close()


def _stop_on_signals() -> asyncio.Event:
    """Handled from the start, so that a signal during the start-up stops the process
    gracefully, and the process exits 0 rather than by the signal."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    return stopping
