"""Prometheus metrics for the HTTP side, in a registry the app owns, by route template
(docs/observability.md): ids in a label would make one time series per agent."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from services.common.telemetry.metrics import LATENCY_BUCKETS, MemoryLimit, multiprocess_dir

# Set by whatever handled the request to the route template it matched.
ROUTE_SCOPE_KEY = "devops_hub.route"
UNMATCHED_ROUTE = "unmatched"

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

NO_STORE = {"Cache-Control": "no-store"}


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            # A registry of its own (several apps may live in one process, tests' do),
            # so it needs the process_* metrics the default registry would have had.
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            registry.register(MemoryLimit())
        self.registry = registry
        self._requests = Counter(
            "http_requests_total",
            "HTTP requests by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "http_request_duration_seconds",
            "Time from request to the last byte of the response, by method and route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Label children by key: the label sets are few and fixed, and labels() takes a lock.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def declare(self, routes: Iterable[tuple[str, str]], statuses: Iterable[int]) -> None:
        """Exports these (method, route) pairs at zero, with these statuses, before
        their first request: dashboards and alerts have series from the start."""
        statuses = list(statuses)
        for method, route in routes:
            for status in statuses:
                self._labelled(method, route, status)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        requests, latency = self._children.get((method, route, status)) or self._labelled(method, route, status)
        requests.inc()
        latency.observe(seconds)

    def _labelled(self, method: str, route: str, status: int) -> tuple[Counter, Histogram]:
        children = self._children[(method, route, status)] = (
            self._requests.labels(method, route, str(status)),
            self._latency.labels(method, route),
        )
        return children

    def exposition(self) -> bytes:
        """With several gateway processes, every one's files summed."""
        directory = multiprocess_dir()
        if directory:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=directory)
            return generate_latest(registry)
        return generate_latest(self.registry)

    async def endpoint(self, request: Request) -> Response:
        return Response(self.exposition(), media_type=CONTENT_TYPE_LATEST, headers=NO_STORE)


def route_label(scope: Scope) -> str:
    route: str | None = scope.get(ROUTE_SCOPE_KEY)
    return route if route is not None else str(getattr(scope.get("route"), "path", UNMATCHED_ROUTE))
