"""The gateway (app.py) served by uvicorn on its socket, as the Process every serving part
of DevOps Hub is (services/common/runtime/process.py), in `python -m gateway` and tests alike."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import resource
import socket
from collections.abc import Sequence
from typing import Any

import uvicorn

from gateway.app import create_app
from gateway.connections import connection_options
from services.common.foundation.background import cancel_and_wait
from services.common.foundation.settings import Settings
from services.common.runtime.process import run
from services.common.telemetry.endpoint import Refresher

# Descriptors the gateway takes room for at start: a connection each.
DESCRIPTOR_TABLE = 4096


class Gateway:
    """uvicorn's Server, driven step by step through the Process calls; SIGTERM and SIGINT are
    the process's (process.run), not uvicorn's."""

    # GET /metrics is one of the gateway's own routes, on its own port.
    metrics_port = 0

    def __init__(self, config: uvicorn.Config, sock: socket.socket) -> None:
        self._server = uvicorn.Server(config)
        self._sockets = [sock]
        host, port = sock.getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.listening = f"http://{self.address}"
        self._ticker: asyncio.Task[None] | None = None

    def refreshers(self) -> Sequence[Refresher]:
        return ()

    def serve_also_on(self, unix_socket: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound, not listening: it refuses connections until uvicorn serves it.
        sock.bind(unix_socket)
        self._sockets.append(sock)

    async def start(self) -> None:
        config = self._server.config
        config.load()
        self._server.lifespan = config.lifespan_class(config)
        try:
            await self._server.startup(sockets=self._sockets)
        except SystemExit:
            # uvicorn exits when the app cannot start; here that is an error like any other.
            raise RuntimeError("the gateway failed to start; uvicorn logged why") from None
        # uvicorn's tick, which keeps the Date header current.
        self._ticker = asyncio.create_task(self._server.main_loop())

    async def stop(self, grace: float) -> None:
        if self._ticker is not None:
            await cancel_and_wait(self._ticker)
            self._ticker = None
        if self._server.started:
            # uvicorn annotates an int but hands it to asyncio.timeout(), which takes any seconds.
            self._server.config.timeout_graceful_shutdown = grace  # type: ignore[assignment]
            await self._server.shutdown(sockets=self._sockets)
            self._server.started = False

    async def close(self) -> None:
        for sock in self._sockets:
            sock.close()


async def build(settings: Settings, **app_options: Any) -> Gateway:
    """`app_options` go to create_app (tests give it other services or registries)."""
    config = uvicorn.Config(
        create_app(settings, **app_options),
        **connection_options(settings),
        lifespan="on",
        access_log=False,
        log_config=None,
        log_level=settings.log_level.lower(),
        server_header=False,
    )
    return Gateway(config, _listening_socket(settings.gateway_host, settings.gateway_port))


def _listening_socket(host: str, port: int) -> socket.socket:
    """The gateway's socket, bound with SO_REUSEPORT so that WORKERS processes share
    one port and the kernel spreads connections across them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    grow_descriptor_table(sock.fileno())
    return sock


def grow_descriptor_table(fd: int) -> None:
    """Grows the descriptor table now, not as connections come: with threads (grpc's) each
    growth stops accept() for an RCU grace period, 1 to 2 s for a fresh gateway's first
    400 connections (docs/resilience.md, bench/RESULTS.md). F_DUPFD takes the lowest free
    descriptor from there up, so none in use is touched."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    size = DESCRIPTOR_TABLE if soft == resource.RLIM_INFINITY else min(soft, DESCRIPTOR_TABLE)
    with contextlib.suppress(OSError):  # every descriptor from there up is taken: nothing to grow
        os.close(fcntl.fcntl(fd, fcntl.F_DUPFD, size - 1))


def main() -> None:
    run(build, name="gateway", service="gateway")
