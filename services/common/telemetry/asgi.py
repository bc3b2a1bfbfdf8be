"""The gateway's share of request tracing: the SERVER span each trace starts with.

The span continues a `traceparent` the HTTP client sent, is named after the route
template once routing has chosen one ("GET /api/agents/{id}"), and is current while
the route runs, so the gRPC call it makes becomes its child and carries the trace on.
The gateway's one pass over every request (gateway/front.py) opens and closes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager

from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Status, StatusCode
from starlette.types import Scope

# An ASGI scope's headers: (name, value) pairs of bytes.
Headers = Iterable[tuple[bytes, bytes]]


class _HeaderGetter(Getter[Headers]):
    def get(self, carrier: Headers, key: str) -> list[str] | None:
        name = key.encode("latin-1")
        values = [value.decode("latin-1") for header, value in carrier if header == name]
        return values or None

    def keys(self, carrier: Headers) -> list[str]:
        return [header.decode("latin-1") for header, _ in carrier]


_GETTER = _HeaderGetter()


def server_span(tracer: trace.Tracer, scope: Scope, request_id: str) -> AbstractContextManager[trace.Span]:
    method = scope["method"]
    return tracer.start_as_current_span(
        method,
        context=propagate.extract(scope["headers"], getter=_GETTER),
        kind=trace.SpanKind.SERVER,
        attributes={"http.request.method": method, "url.path": scope["path"], "devops_hub.request_id": request_id},
        record_exception=False,
        set_status_on_exception=False,
    )


def close_span(span: trace.Span, method: str, route: str, status: int) -> None:
    span.update_name(f"{method} {route}")
    span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR, str(status)))
