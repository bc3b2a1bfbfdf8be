"""Run the real gateway in-process, on an ephemeral port, for tests.

    async with running_gateway(settings) as base_url:
        async with httpx.AsyncClient(base_url=base_url) as client:
            ...

The server is real uvicorn on a real socket in the caller's event loop, so tests see
exactly what clients see (status lines, headers, streaming), with no port races.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn

from gateway.app import create_app
from gateway.connections import connection_options
from services.common.settings import Settings


class _InProcessServer(uvicorn.Server):
    """uvicorn without its signal handlers (the test runner owns SIGINT), with a start-up
    failure raised as an error rather than a SystemExit that would stop the loop, and
    stopped by an event instead of a 100 ms poll, so each test's teardown is quick."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.exit_requested = asyncio.Event()

    async def main_loop(self) -> None:
        await self.on_tick(0)  # sets the default response headers, as uvicorn's loop does
        await self.exit_requested.wait()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        except SystemExit:
            raise RuntimeError("the gateway failed to start; uvicorn logged why") from None


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings, host: str = "127.0.0.1", **app_options: Any) -> AsyncIterator[str]:
    """Yields the base URL (`http://127.0.0.1:PORT`) of a started gateway; stops it on exit.

    `app_options` go to create_app (services, backend_of_service, registry).
    """
    app = create_app(settings, **app_options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan="on", log_config=None, access_log=False, log_level="warning", **connection_options(settings)
    )
    server = _InProcessServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the gateway stopped before it started")
            await asyncio.sleep(0.005)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        server.exit_requested.set()
        await task
        sock.close()
