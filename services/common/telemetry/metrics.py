"""Prometheus metrics every gRPC service has: its calls and, with a database, its pools.

Each group is made on a registry it is given and handed to what records into it by
the wiring, so a test can give its own. Worker processes of one service add up
through prometheus_client's multiprocess mode (docs/observability.md, "Several worker
processes"). Hot paths touch only label children bound once and kept: no label
lookup, no string building per call.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar, cast

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
G = TypeVar("G")

# Request latencies: sub-millisecond to seconds, with edges at the performance
# targets (100 ms) and alert thresholds (500 ms) so quantiles near them are exact.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# The codes that mean the server failed (OpenTelemetry's rule for gRPC server spans);
# the others are the caller's mistakes or answers (NOT_FOUND, INVALID_ARGUMENT, ...).
# The error-rate alerts count exactly these.
SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROCESS_ENV) or None


def prepare_multiprocess() -> str | None:
    """In multiprocess mode, retires the live gauges of processes that are gone (a
    restarted worker or container finds its predecessors' files). It only reads the
    directory: prometheus_client writes there when each value is made."""
    directory = multiprocess_dir()
    if directory is None:
        return None
    os.makedirs(directory, exist_ok=True)
    # prometheus_client names its files <kind>[_<mode>]_<pid>.db.
    parts = (name.removesuffix(".db").rpartition("_") for name in os.listdir(directory))
    for pid in {int(pid) for stem, _, pid in parts if stem and pid.isdigit()}:
        if not _alive(pid):
            multiprocess.mark_process_dead(pid, directory)
    return directory


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- gRPC server calls --------------------------------------------------------------

# (request streaming, response streaming) → the grpc_type label.
GRPC_TYPES = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}
# Codes every method exports from start, at zero: success and the server's failures,
# which the error-rate alerts divide. A caller's error code appears when it happens.
CODES_FROM_START = (grpc.StatusCode.OK, *sorted(SERVER_ERROR_CODES, key=lambda code: code.value[0]))


class GrpcServerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._handled = Counter(
            "grpc_server_handled",
            "gRPC calls completed by the server, by service, method, type and status code.",
            ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
            registry=registry,
        )
        self._latency = Histogram(
            "grpc_server_handling_seconds",
            "Time the server took to complete a call (a stream's whole life for streaming types).",
            ["grpc_service", "grpc_method", "grpc_type"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._methods: dict[tuple[str, str, str], MethodMetrics] = {}

    def method(self, service: str, method: str, kind: str) -> MethodMetrics:
        labels = (service, method, kind)
        metrics = self._methods.get(labels)
        if metrics is None:
            metrics = self._methods[labels] = MethodMetrics(self._handled, self._latency.labels(*labels), labels)
        return metrics

    def declare(self, services: Iterable[ServiceDescriptor]) -> None:
        """Exports every method of these services at zero before its first call, so
        dashboards and alerts have series to read from the start."""
        for service in services:
            for method in service.methods:
                self.method(service.full_name, method.name, GRPC_TYPES[(method.client_streaming, method.server_streaming)])


class MethodMetrics:
    """One method's children: the histogram bound up front, a counter child per code."""

    __slots__ = ("_handled", "_latency", "_labels", "_by_code")

    def __init__(self, handled: Counter, latency: Histogram, labels: tuple[str, str, str]) -> None:
        self._handled = handled
        self._latency = latency
        self._labels = labels
        self._by_code: dict[grpc.StatusCode, Counter] = {code: handled.labels(*labels, code.name) for code in CODES_FROM_START}

    def observe(self, code: grpc.StatusCode, seconds: float) -> None:
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = self._handled.labels(*self._labels, code.name)
        counter.inc()
        self._latency.observe(seconds)


# --- database pools -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class PoolStats:
    """A connection pool right now. `waiters` are callers waiting for a connection."""

    size: int
    max: int
    in_use: int
    waiters: int


class HasPool(Protocol):
    def pool_stats(self) -> PoolStats: ...


class PoolMetrics:
    """The database pools open in this process, summed (one per service in production);
    the gauges are set when metrics are collected, never on the query path."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name, text, registry=registry, multiprocess_mode="livesum")

        self._size = gauge("devops_hub_db_pool_size", "Database connections open.")
        self._max = gauge("devops_hub_db_pool_max", "Database connections the pool may open (DATABASE_POOL_SIZE + DATABASE_MAX_OVERFLOW).")
        self._in_use = gauge("devops_hub_db_pool_in_use", "Database connections running a query or transaction.")
        self._idle = gauge("devops_hub_db_pool_idle", "Database connections open and free.")
        self._waiters = gauge("devops_hub_db_pool_waiters", "Queries waiting for a free database connection.")
        self._pools: weakref.WeakSet[HasPool] = weakref.WeakSet()

    def track(self, pool: HasPool) -> None:
        self._pools.add(pool)

    def untrack(self, pool: HasPool) -> None:
        self._pools.discard(pool)

    def refresh(self) -> None:
        stats = [pool.pool_stats() for pool in list(self._pools)]
        size = sum(s.size for s in stats)
        in_use = sum(s.in_use for s in stats)
        self._size.set(size)
        self._max.set(sum(s.max for s in stats))
        self._in_use.set(in_use)
        self._idle.set(max(0, size - in_use))
        self._waiters.set(sum(s.waiters for s in stats))


# --- the process's memory -----------------------------------------------------------------

# cgroup v2, then v1: a container's memory limit (v1 writes a huge number for none).
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


class MemoryLimit(Collector):
    """The guide's "memory usage" is process_resident_memory_bytes over this limit (the
    alerts, the gateway's /status)."""

    def collect(self) -> Iterable[GaugeMetricFamily]:
        text = "Memory this process may use: its cgroup's limit, else the machine's."
        yield GaugeMetricFamily("devops_hub_memory_limit_bytes", text, value=memory_limit())


def memory_limit() -> float:
    machine = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    for path in CGROUP_MEMORY_LIMITS:
        try:
            with open(path) as limit:
                text = limit.read().strip()
        except OSError:
            continue
        if text.isdigit():
            return min(float(text), machine)
    return machine


# --- the process's set ----------------------------------------------------------------------


class ServiceMetrics:
    """A process's metrics, each group created on first use, so a process exports only
    the groups it has (no pool gauges reading 0 in the cache sidecar)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._groups: dict[Callable[[CollectorRegistry], object], object] = {}

    @property
    def grpc(self) -> GrpcServerMetrics:
        return self.group(GrpcServerMetrics)

    @property
    def pools(self) -> PoolMetrics:
        return self.group(PoolMetrics)

    def group(self, make: Callable[[CollectorRegistry], G]) -> G:
        """A group (such as the workflows' or the cache's), made the first time it is asked
        for: a registry takes each metric name once, however often the process builds its service."""
        group = self._groups.get(make)
        if group is None:
            group = self._groups[make] = make(self.registry)
        return cast(G, group)

    def refresh(self) -> None:
        """Sets the gauges that are read from state rather than counted as things happen."""
        if PoolMetrics in self._groups:
            self.pools.refresh()


_process_metrics: ServiceMetrics | None = None


def service_metrics() -> ServiceMetrics:
    """This process's metrics, in the default registry: process-wide because that registry
    is (multiprocess mode writes it, the endpoint serves it, it takes each name once), so
    the services built in one process share one set. Only wiring calls this; a test
    passes a ServiceMetrics of its own registry instead."""
    global _process_metrics
    if _process_metrics is None:
        _process_metrics = ServiceMetrics(REGISTRY)
        REGISTRY.register(MemoryLimit())  # beside the process_* metrics the default registry has
    return _process_metrics

