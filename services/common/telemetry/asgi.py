"""The gateway's share of request telemetry, as pure ASGI middleware: the request id
for the logs, and (when on) the SERVER span each trace starts with and the profile
of slow requests.

The span continues a `traceparent` the HTTP client sent, is named after the route
template once routing has chosen one ("GET /api/agents/{id}"), and is current while
the route runs, so the gRPC call it makes becomes its child and carries the trace on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.telemetry import context, profiling, tracing
from services.common.telemetry.profiling import SlowRequestProfiler

_UNSET: Any = object()


class _HeaderGetter(Getter):
    def get(self, carrier: Any, key: str) -> list[str] | None:
        name = key.encode("latin-1")
        values = [value.decode("latin-1") for header, value in carrier if header == name]
        return values or None

    def keys(self, carrier: Any) -> list[str]:
        return [header.decode("latin-1") for header, _ in carrier]


_GETTER = _HeaderGetter()


class HttpTelemetryMiddleware:
    """`route_of(scope)` gives the route template after the app ran and
    `request_id_of(scope)` the request's id; both come from the gateway, which owns
    those scope keys."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        route_of: Callable[[Scope], str],
        request_id_of: Callable[[Scope], str | None],
        tracer: trace.Tracer | None = _UNSET,
        profiler: SlowRequestProfiler | None = _UNSET,
    ) -> None:
        self.app = app
        self._route_of = route_of
        self._request_id_of = request_id_of
        self._tracer = tracing.tracer() if tracer is _UNSET else tracer
        self._profiler = profiling.profiler() if profiler is _UNSET else profiler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = self._request_id_of(scope)
        token = context.bind_request_id(request_id) if request_id else None
        try:
            if self._tracer is None:
                await self._profiled(scope, receive, send)
            else:
                await self._traced(scope, receive, send, self._tracer, request_id)
        finally:
            if token is not None:
                context.unbind(token)

    async def _traced(self, scope: Scope, receive: Receive, send: Send, tracer: trace.Tracer, request_id: str | None) -> None:
        method = scope["method"]
        parent = propagate.extract(scope["headers"], getter=_GETTER)
        with tracer.start_as_current_span(
            method,
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"], "devops_hub.request_id": request_id or ""},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            status = 500

            async def send_observed(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await self._profiled(scope, receive, send_observed)
            finally:
                route = self._route_of(scope)
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR, str(status)))

    async def _profiled(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._profiler is None:
            await self.app(scope, receive, send)
            return
        profile = self._profiler.begin()
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self._profiler.end(profile, f"{scope['method']} {self._route_of(scope)}", time.perf_counter() - started)
