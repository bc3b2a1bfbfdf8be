"""The one pass every HTTP request makes around its route.

Request id, logging context, metrics, the trace's SERVER span, the slow-request
profile and the security headers used to be five middlewares, each one more
coroutine and one more `send` wrapper per request; here they are one: a request is
entered once, its response start is seen once (status, added headers), and the
figures are recorded once when it ends.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.hardening import SECURITY_HEADERS
from gateway.metrics import KNOWN_METHODS, HttpMetrics, route_label
from gateway.request_id import HEADER as REQUEST_ID_HEADER
from gateway.request_id import SCOPE_KEY as REQUEST_ID_SCOPE_KEY
from gateway.request_id import request_id_of
from services.common.telemetry import asgi, context, profiling, tracing
from services.common.telemetry.profiling import SlowRequestProfiler

_UNSET: Any = object()


class GatewayFront:
    """Pure ASGI (no BaseHTTPMiddleware): it must not buffer bodies or break streaming.
    Tracer and profiler default to the process's (None when off)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: HttpMetrics,
        tracer: trace.Tracer | None = _UNSET,
        profiler: SlowRequestProfiler | None = _UNSET,
    ) -> None:
        self.app = app
        self._metrics = metrics
        self._tracer = tracing.tracer() if tracer is _UNSET else tracer
        self._profiler = profiling.profiler() if profiler is _UNSET else profiler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_of(scope["headers"])
        scope[REQUEST_ID_SCOPE_KEY] = request_id
        token = context.bind_request_id(request_id)
        added = (*SECURITY_HEADERS, (REQUEST_ID_HEADER, request_id.encode("ascii")))
        status = 500

        async def send_once_seen(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *added]
            await send(message)

        method = scope["method"]
        try:
            if self._tracer is None:
                await self._profiled(scope, receive, send_once_seen)
            else:
                with asgi.server_span(self._tracer, scope, request_id) as span:
                    try:
                        await self._profiled(scope, receive, send_once_seen)
                    finally:
                        asgi.close_span(span, method, route_label(scope), status)
        finally:
            context.unbind(token)
            label = method if method in KNOWN_METHODS else "OTHER"
            self._metrics.observe(label, route_label(scope), status, time.perf_counter() - started)

    async def _profiled(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._profiler is None:
            await self.app(scope, receive, send)
            return
        profile = self._profiler.begin()
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self._profiler.end(profile, f"{scope['method']} {route_label(scope)}", time.perf_counter() - started)
