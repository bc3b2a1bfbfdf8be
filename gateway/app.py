"""create_app: the HTTP gateway as one ASGI app, all derived from the proto descriptors
before the first request."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from opentelemetry import trace
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from gateway.backends import ChannelPool, backend_addresses
from gateway.edge import Edge, gateway_limits
from gateway.errors import HTTP_STATUS, http_exception_handler, unhandled_error_handler
from gateway.front import GatewayFront
from gateway.hardening import cors_options
from gateway.health import HealthChecker
from gateway.metrics import HttpMetrics
from gateway.openapi import OpenApiDocument
from gateway.pages import page_routes
from gateway.rest import RestGateway
from gateway.routes import RouteError, build_routes
from gateway.status import StatusBoard, metrics_urls
from services.cache.consistency import ConsistencyMetrics
from services.common.auth.verifier import RemoteVerifier
from services.common.auth.wiring import Access
from services.common.contract.api import discover_services
from services.common.foundation.settings import Settings
from services.common.telemetry.metrics import SERVER_ERROR_CODES
from services.common.telemetry.profiling import SlowRequestProfiler


def create_app(
    settings: Settings,
    *,
    services: Iterable[ServiceDescriptor] | None = None,
    backend_of_service: Mapping[str, str] | None = None,
    registry: CollectorRegistry | None = None,
    tracer: trace.Tracer | None = None,
    profiler: SlowRequestProfiler | None = None,
) -> GatewayFront:
    """Tests pass `services` (default: the generated package's), `backend_of_service`
    (default: each proto's `option (backend)`) and `registry` (default: the app's own)."""
    routes = build_routes(discover_services() if services is None else services, backend_of_service)
    # Only the backends some route calls: the gateway neither connects to nor waits on
    # a backend whose protos are not there yet, so it is ready as soon as they are.
    addresses = backend_addresses(settings, (route.backend for route in routes))

    pool = ChannelPool(addresses, settings.grpc_connections, tracer=tracer)
    metrics = HttpMetrics(registry)
    edge = Edge.from_settings(settings, ConsistencyMetrics(metrics.registry), tracer=tracer)
    limiting = gateway_limits(settings)
    rest = RestGateway(
        routes,
        timeout=settings.gateway_timeout,
        max_json_depth=settings.max_json_depth,
        trusted_proxies=settings.gateway_trusted_proxies,
        service_key=settings.service_api_key,
        limiting=limiting,
        edge=edge,
    )
    health = HealthChecker(addresses)
    # Success and the statuses of the server's failures, which the error-rate alerts divide.
    metrics.declare(
        ((route.http_method, route.template.text) for route in routes),
        sorted({HTTP_STATUS[code] for code in (grpc.StatusCode.OK, *SERVER_ERROR_CODES)}),
    )
    status = StatusBoard(
        metrics,
        metrics_urls(settings, addresses),
        streaming=(route.template.text for route in routes if route.server_streaming),
    )
    openapi = OpenApiDocument(routes, auth_enabled=settings.auth_enabled, anonymous_reads=settings.allow_anonymous_read)

    fixed_routes = [
        Route("/health", health.ready, methods=["GET"]),
        Route("/health/live", health.live, methods=["GET"]),
        Route("/health/ready", health.ready, methods=["GET"]),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
        Route("/openapi.json", openapi.endpoint, methods=["GET"]),
        *page_routes(status),
    ]
    for route in fixed_routes:
        if rest.router.match("GET", route.path) is not None:
            raise RouteError(f"an http rule in the protos claims {route.path}, which the gateway serves itself")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool.open()
        rest.bind(pool)
        health.bind(pool)
        # The services' own guard, for the edge's hits and, when the gateway limits, for every call.
        access = None
        if edge is not None or limiting:
            access = Access.build(settings, RemoteVerifier.from_settings(settings, tracer=tracer), rate_limited=limiting)
            rest.guard = access.guard
        if edge is not None:
            edge.open()
        try:
            yield
        finally:
            if edge is not None:
                await edge.close()
            if access is not None:
                await access.close()
            await pool.close(grace=settings.shutdown_grace)

    cors = cors_options(settings.cors_origins)
    own = Starlette(
        routes=fixed_routes,
        middleware=[Middleware(CORSMiddleware, **cors)] if cors else [],
        exception_handlers={HTTPException: http_exception_handler, Exception: unhandled_error_handler},
        lifespan=lifespan,
    )
    own.router.redirect_slashes = False
    return GatewayFront(
        own,
        [route.path for route in fixed_routes],
        CORSMiddleware(rest, **cors) if cors else rest,
        metrics=metrics,
        tracer=tracer,
        profiler=profiler,
    )
