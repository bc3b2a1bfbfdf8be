"""The one pass every HTTP request makes around its route (docs/design.md, "A write"), in
one coroutine and one `send` wrapper rather than a middleware each. A REST call goes
straight to the proto-derived router; only the gateway's own endpoints and the lifespan
go through Starlette."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

from opentelemetry import trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import internal_error_response
from gateway.hardening import SECURITY_HEADERS
from gateway.metrics import KNOWN_METHODS, HttpMetrics, route_label
from gateway.request_id import HEADER as REQUEST_ID_HEADER
from gateway.request_id import SCOPE_KEY as REQUEST_ID_SCOPE_KEY
from gateway.request_id import request_id_of
from services.common.telemetry import asgi, context
from services.common.telemetry.profiling import SlowRequestProfiler

log = logging.getLogger(__name__)

class GatewayFront:
    """Pure ASGI (no BaseHTTPMiddleware, which would buffer bodies and break streaming):
    `own` (Starlette: lifespan, error handlers) serves the `own_paths`, `rest` the rest."""

    def __init__(
        self,
        own: ASGIApp,
        own_paths: Collection[str],
        rest: ASGIApp,
        *,
        metrics: HttpMetrics,
        tracer: trace.Tracer | None = None,
        profiler: SlowRequestProfiler | None = None,
    ) -> None:
        self.own = own
        self._own_paths = frozenset(own_paths)
        self.rest = rest
        self._metrics = metrics
        self._tracer = tracer
        self._profiler = profiler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.own(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_of(scope["headers"])
        scope[REQUEST_ID_SCOPE_KEY] = request_id
        token = context.bind_request_id(request_id)
        added = (*SECURITY_HEADERS, (REQUEST_ID_HEADER, request_id.encode("ascii")))
        status = 0

        own = scope["path"] in self._own_paths

        async def send_once_seen(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers", ())
                # A page of the gateway's own may set its own policy (gateway/pages.py).
                names = {name for name, _ in headers} if own else ()
                message["headers"] = [*headers, *(header for header in added if header[0] not in names)]
            await send(message)

        app = self.own if own else self.rest
        method = scope["method"]
        try:
            if self._tracer is None:
                await self._profiled(app, scope, receive, send_once_seen)
            else:
                with asgi.server_span(self._tracer, scope, request_id) as span:
                    try:
                        await self._profiled(app, scope, receive, send_once_seen)
                    finally:
                        asgi.close_span(span, method, route_label(scope), status or 500)
        except Exception:
            if status:
                raise  # the response has begun: only the server can end it now
            log.exception("unhandled error in %s %s", method, scope["path"])
            await internal_error_response()(scope, receive, send_once_seen)
        finally:
            context.unbind(token)
            label = method if method in KNOWN_METHODS else "OTHER"
            self._metrics.observe(label, route_label(scope), status or 500, time.perf_counter() - started)

    async def _profiled(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        if self._profiler is None:
            await app(scope, receive, send)
            return
        profile = self._profiler.begin()
        started = time.perf_counter()
        try:
            await app(scope, receive, send)
        finally:
            self._profiler.end(profile, f"{scope['method']} {route_label(scope)}", time.perf_counter() - started)
