"""create_app: the HTTP gateway as a Starlette app, built entirely at start-up.

Route table, request builders, renderers and the OpenAPI document are derived from
the proto descriptors here, before the first request; the gRPC channels are opened in
the lifespan, on the server's event loop, and closed when it stops.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping

from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route
from starlette.types import Scope

from gateway.backends import BACKEND_OF_SERVICE, ChannelPool, backend_addresses
from gateway.errors import http_exception_handler, unhandled_error_handler
from gateway.hardening import SecurityHeadersMiddleware, cors_options
from gateway.health import HealthChecker
from gateway.metrics import HttpMetrics, MetricsMiddleware, route_label
from gateway.openapi import OpenApiDocument
from gateway.request_id import SCOPE_KEY as REQUEST_ID_SCOPE_KEY
from gateway.request_id import RequestIdMiddleware
from gateway.rest import RestGateway
from gateway.routes import RouteError, build_routes
from services.common.api import discover_services
from services.common.settings import Settings
from services.common.telemetry.asgi import HttpTelemetryMiddleware


def create_app(
    settings: Settings,
    *,
    services: Iterable[ServiceDescriptor] | None = None,
    backend_of_service: Mapping[str, str] | None = None,
    registry: CollectorRegistry | None = None,
) -> Starlette:
    """The gateway for `settings`.

    `services` defaults to every service of the generated devops_hub.v1 package and
    `backend_of_service` to BACKEND_OF_SERVICE; tests pass their own to serve extra
    services. `registry` defaults to a fresh one owned by this app.
    """
    backend_of_service = BACKEND_OF_SERVICE if backend_of_service is None else backend_of_service
    routes = build_routes(discover_services() if services is None else services, backend_of_service)
    # Only the backends some route calls: the gateway neither connects to nor waits on
    # a backend whose protos are not there yet, so it is ready as soon as they are.
    addresses = backend_addresses(settings, (route.backend for route in routes))

    pool = ChannelPool(addresses, settings.grpc_connections)
    rest = RestGateway(
        routes,
        timeout=settings.gateway_timeout,
        max_json_depth=settings.max_json_depth,
        trusted_proxies=settings.gateway_trusted_proxies,
    )
    health = HealthChecker(addresses)
    metrics = HttpMetrics(registry)
    openapi = OpenApiDocument(routes)

    fixed_routes = [
        Route("/health", health.ready, methods=["GET"]),
        Route("/health/live", health.live, methods=["GET"]),
        Route("/health/ready", health.ready, methods=["GET"]),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
        Route("/openapi.json", openapi.endpoint, methods=["GET"]),
    ]
    for route in fixed_routes:
        if rest.router.match("GET", route.path) is not None:
            raise RouteError(f"an http rule in the protos claims {route.path}, which the gateway serves itself")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool.open()
        rest.bind(pool)
        health.bind(pool)
        try:
            yield
        finally:
            await pool.close(grace=settings.shutdown_grace)

    cors = cors_options(settings.cors_origins)
    app = Starlette(
        routes=fixed_routes,
        middleware=[
            Middleware(SecurityHeadersMiddleware),
            *([Middleware(CORSMiddleware, **cors)] if cors else []),
            Middleware(MetricsMiddleware, metrics=metrics),
            Middleware(RequestIdMiddleware),
            # Inside RequestIdMiddleware, so the request's id is known to its logs and span.
            Middleware(HttpTelemetryMiddleware, route_of=route_label, request_id_of=_request_id_of),
        ],
        exception_handlers={HTTPException: http_exception_handler, Exception: unhandled_error_handler},
        lifespan=lifespan,
    )
    # Whatever the fixed routes do not claim is a REST call: the proto-derived router
    # decides between route, 404 and 405 in one pass.
    app.router.default = rest
    # Otherwise every REST request would be matched against the fixed routes twice
    # (once more with its trailing slash toggled) before reaching the router above.
    app.router.redirect_slashes = False
    app.state.routes = routes
    app.state.metrics = metrics
    app.state.openapi = openapi.document
    return app


def _request_id_of(scope: Scope) -> str | None:
    return scope.get(REQUEST_ID_SCOPE_KEY)
