"""`python -m gateway`: serve the gateway with uvicorn (uvloop, httptools) until
SIGTERM or SIGINT, then drain in-flight requests, close the channels and exit 0."""

from __future__ import annotations

import signal
import socket
import sys
from types import FrameType

import uvicorn

from gateway.app import create_app
from gateway.connections import connection_options
from services.common.settings import Settings
from services.common.telemetry import Telemetry


class _AnnouncingServer(uvicorn.Server):
    """Prints the address once the app is started and the socket listens, so scripts
    and the launcher can wait for that line (it also gives the real port for port 0)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"gateway listening on http://{host}:{port}", flush=True)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    # uvicorn handles the signal while it serves (graceful shutdown) and re-raises it
    # afterwards to the previous handler: this one, so the process ends with status 0
    # instead of dying by the signal. Before serving starts it simply exits.
    raise SystemExit(0)


def main() -> int:
    settings = Settings.from_env()
    # Before the app is built: its middleware and channels pick up tracing from here.
    telemetry = Telemetry.start(settings, "gateway")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        loop="uvloop",
        **connection_options(settings),
        lifespan="on",
        access_log=False,
        log_config=None,
        log_level=settings.log_level.lower(),
        # uvicorn annotates an int but hands it to asyncio.timeout(), which takes any seconds.
        timeout_graceful_shutdown=settings.shutdown_grace,  # type: ignore[arg-type]
        server_header=False,
    )
    try:
        _AnnouncingServer(config).run(sockets=[_listening_socket(settings.gateway_host, settings.gateway_port)])
    finally:
        telemetry.shutdown()
    return 0


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
    return sock


if __name__ == "__main__":
    sys.exit(main())
