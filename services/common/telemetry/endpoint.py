"""The Prometheus endpoint of a gRPC service: `GET /metrics` on a port of its own.

It is served by the service's own event loop (asyncio streams, no thread), so the
gauges read from live state are brought up to date right before each scrape; in
multiprocess mode also every REFRESH_INTERVAL in every worker, since a scrape reaches
only one of them (docs/observability.md, "Where the metrics are").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from services.common.foundation.background import cancel_and_wait, spawn
from services.common.telemetry.metrics import ServiceMetrics, multiprocess_dir

log = logging.getLogger(__name__)

Refresher = Callable[[], Awaitable[None]]

REFRESH_INTERVAL = 5.0
# A scraper gets this long to send its request; the endpoint is not a web server.
REQUEST_TIMEOUT = 5.0
MAX_REQUEST_BYTES = 16 * 1024


def host_of(address: str) -> str:
    """The host part of a listen address ("0.0.0.0:50051" → "0.0.0.0", "[::]:1" → "::")."""
    return address.rsplit(":", 1)[0].strip("[]")


class MetricsEndpoint:
    def __init__(self, *, metrics: ServiceMetrics, refreshers: Sequence[Refresher] = ()) -> None:
        """Serves `metrics.registry`, after refreshing the gauges of `metrics` and running
        `refreshers` (which read other state into metrics of that registry)."""
        self._metrics = metrics
        self._refreshers = list(refreshers)
        self._multiprocess = multiprocess_dir()
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        # One refresh at a time: two interleaved snapshots could apply out of order.
        self._refreshing = asyncio.Lock()
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int | None:
        """None when the port is taken: metrics are worth a log line, not the service."""
        try:
            self._server = await asyncio.start_server(
                self._serve,
                host or None,
                port,
                # Workers of one service share the port only in multiprocess mode, where
                # any of them gives the whole answer; otherwise a taken port is an error.
                reuse_port=bool(self._multiprocess),
            )
        except OSError as exc:
            log.error(
                "metrics endpoint not started: cannot listen on %s:%d (%s); several workers of a service "
                "share its metrics port only with PROMETHEUS_MULTIPROC_DIR set",
                host, port, exc,
            )
            return None
        self.port = self._server.sockets[0].getsockname()[1]
        await self.refresh()
        if self._multiprocess:
            self._ticker = spawn(self._tick(), name="metrics-refresh", essential=True)
        return self.port

    async def close(self) -> None:
        if self._ticker is not None:
            await cancel_and_wait(self._ticker)
            self._ticker = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def refresh(self) -> None:
        async with self._refreshing:
            self._metrics.refresh()
            for refresher in self._refreshers:
                try:
                    await refresher()
                except Exception:  # noqa: BLE001 - a failed source leaves its last values
                    log.warning("metrics refresh failed", exc_info=True)

    async def render(self) -> bytes:
        await self.refresh()
        if self._multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self._multiprocess)
            return generate_latest(registry)
        return generate_latest(self._metrics.registry)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_INTERVAL)
            await self.refresh()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            method, target, _version = head.split(b"\r\n", 1)[0].split(b" ", 2)
            if target.split(b"?", 1)[0] != b"/metrics":
                status, body, kind = b"404 Not Found", b"only /metrics is served here\n", b"text/plain"
            elif method not in (b"GET", b"HEAD"):
                status, body, kind = b"405 Method Not Allowed", b"GET /metrics\n", b"text/plain"
            else:
                status, body, kind = b"200 OK", await self.render(), CONTENT_TYPE_LATEST.encode()
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind
                + b"\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
                + (b"" if method == b"HEAD" else body)
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ConnectionError) as exc:
            # A client that sent no usable request (or left) gets no answer.
            log.debug("metrics request dropped: %r", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

