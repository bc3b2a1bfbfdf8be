"""GET /status.json: the performance guide's "Metrics to Monitor" table, live, from the
metrics of the gateway and each backend as deploy/prometheus/alerts.yml computes it
(docs/observability.md). Rates are over the last WINDOW seconds of polls."""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import math
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import JSONResponse

from gateway.metrics import NO_STORE, HttpMetrics
from services.common.foundation.settings import Settings
from services.common.telemetry.endpoint import host_of

WINDOW = 60.0
# Fewer cache reads than this say nothing of a hit rate (a just-started cache misses
# every first read): the row has no data, as the alert fires only with traffic.
MIN_CACHE_READS = 60
SCRAPE_TIMEOUT = 1.0
Samples = dict[str, list[tuple[dict[str, str], float]]]


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One line of the guide's table: what is measured, its target and alert threshold."""

    metric: str
    unit: str
    target: float
    alert: float
    higher_is_better: bool = False

    def state(self, value: float | None) -> str:
        if value is None:
            return "no data"
        sign = -1 if self.higher_is_better else 1
        if sign * value > sign * self.alert:
            return "alert"
        return "ok" if sign * value < sign * self.target else "warning"

    def shown(self, value: float | None, source: str) -> dict[str, object]:
        better, worse = (">", "<") if self.higher_is_better else ("<", ">")
        return {
            "metric": self.metric,
            "unit": self.unit,
            "value": None if value is None else round(value, 3),
            "source": source,
            "target": f"{better} {self.target:g} {self.unit}",
            "alert": f"{worse} {self.alert:g} {self.unit}",
            "state": self.state(value),
        }


# The performance guide's table (docs/observability.md, the alerts use the same numbers).
GUIDE = (
    Row("p95 latency", "ms", 100, 500),
    Row("error rate", "%", 0.1, 1),
    Row("memory usage", "%", 70, 85),
    Row("CPU usage", "%", 60, 80),
    Row("cache hit rate", "%", 80, 50, higher_is_better=True),
    Row("connection pool usage", "%", 70, 90),
)


@dataclasses.dataclass(slots=True)
class _Poll:
    at: float
    processes: dict[str, Samples]


class StatusBoard:
    """`metrics` is the gateway's; `sources` names each backend's metrics URL;
    `streaming` the route templates whose duration is a stream's life, not a latency."""

    def __init__(self, metrics: HttpMetrics, sources: Mapping[str, str], streaming: Iterable[str]) -> None:
        self._metrics = metrics
        self._sources = dict(sources)
        self._streaming = frozenset(streaming)
        self._polls: deque[_Poll] = deque()

    async def endpoint(self, request: Request) -> JSONResponse:
        texts = await asyncio.gather(*(asyncio.to_thread(_scrape, url) for url in self._sources.values()))
        processes = {"gateway": _parse(self._metrics.exposition().decode())}
        processes.update((name, _parse(text)) for name, text in zip(self._sources, texts) if text is not None)
        now = time.time()
        while self._polls and self._polls[0].at < now - WINDOW:
            self._polls.popleft()
        base = self._polls[0] if self._polls else None
        self._polls.append(_Poll(now, processes))
        values = self._values(processes, base, now)
        if base is not None:
            # Nothing happened in the window (no cache read, say): since start, and said so.
            since_start = self._values(processes, None, now)
            for metric, (value, _) in values.items():
                if value is None and since_start[metric][0] is not None:
                    values[metric] = (since_start[metric][0], f"{since_start[metric][1]}, since start")
        rows = [row.shown(*values[row.metric]) for row in GUIDE]
        unreachable = sorted(name for name, text in zip(self._sources, texts) if text is None)
        window = f"last {now - base.at:.0f} s" if base is not None else "since each process started"
        return JSONResponse({"window": window, "rows": rows, "unreachable": unreachable}, headers=NO_STORE)

    def _values(self, now_: dict[str, Samples], base: _Poll | None, now: float) -> dict[str, tuple[float | None, str]]:
        before = base.processes if base is not None else {}

        def delta(process: str, name: str, keep: Callable[[dict[str, str]], bool] | None = None) -> float:
            # A process restarted within the window starts its counters again.
            now_sum, before_sum = _sum(now_.get(process, {}), name, keep), _sum(before.get(process, {}), name, keep)
            return now_sum - before_sum if now_sum >= before_sum else now_sum

        gateway_buckets = _subtract(self._buckets(now_["gateway"]), self._buckets(before.get("gateway", {})))
        requests = delta("gateway", "http_requests_total")
        failed = delta("gateway", "http_requests_total", lambda labels: labels.get("status", "").startswith("5"))
        hits, misses = delta("cache", "devops_hub_cache_hits_total"), delta("cache", "devops_hub_cache_misses_total")
        in_use = sum(_sum(samples, "devops_hub_db_pool_in_use") for samples in now_.values())
        most = sum(_sum(samples, "devops_hub_db_pool_max") for samples in now_.values())

        memory = {
            name: 100 * _sum(s, "process_resident_memory_bytes") / _sum(s, "devops_hub_memory_limit_bytes")
            for name, s in now_.items()
            if _sum(s, "devops_hub_memory_limit_bytes")
        }
        cpu = {}
        for name, samples in now_.items():
            if "process_cpu_seconds_total" not in samples:
                continue
            spent, started = _sum(samples, "process_cpu_seconds_total"), _sum(samples, "process_start_time_seconds")
            previous = before.get(name, {})
            if base is not None and base.at > started and "process_cpu_seconds_total" in previous and now > base.at:
                cpu[name] = 100 * (spent - _sum(previous, "process_cpu_seconds_total")) / (now - base.at)
            elif now > started:
                cpu[name] = 100 * spent / (now - started)
        return {
            "p95 latency": (_quantile(0.95, gateway_buckets), "gateway HTTP requests (streams excluded)"),
            "error rate": (100 * failed / requests if requests else None, "gateway HTTP requests answered 5xx"),
            "memory usage": _highest(memory, "resident memory of the memory limit"),
            "CPU usage": _highest(cpu, "CPU time of one core (one event loop)"),
            "cache hit rate": (100 * hits / (hits + misses) if hits + misses >= MIN_CACHE_READS else None, "cache sidecar reads"),
            "connection pool usage": (100 * in_use / most if most else None, "database connections in use"),
        }

    def _buckets(self, samples: Samples) -> dict[float, float]:
        buckets: dict[float, float] = {}
        for labels, value in samples.get("http_request_duration_seconds_bucket", []):
            if labels.get("route") not in self._streaming:
                le = float(labels["le"])
                buckets[le] = buckets.get(le, 0.0) + value
        return buckets


def metrics_urls(settings: Settings, addresses: Mapping[str, str]) -> dict[str, str]:
    """Each backend's metrics endpoint: its `<backend>_metrics_port` on its address's
    host (one replica's, where several serve one address); none where the port is 0."""
    urls = {}
    for backend, address in addresses.items():
        port = getattr(settings, f"{backend}_metrics_port", 0)
        host = host_of(address)
        if port:
            urls[backend] = f"http://{'127.0.0.1' if host in ('', '0.0.0.0', '::') else host}:{port}/metrics"
    return urls


def _scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as answer:  # noqa: S310 - our own backends' metrics URLs
            return str(answer.read().decode())
    except OSError:
        return None


def _parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _sum(samples: Samples, name: str, keep: Callable[[dict[str, str]], bool] | None = None) -> float:
    return sum(value for labels, value in samples.get(name, []) if keep is None or keep(labels))


def _subtract(now: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    if any(count < before.get(le, 0.0) for le, count in now.items()):
        return now  # restarted: counted from zero again
    return {le: count - before.get(le, 0.0) for le, count in now.items()}


def _quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile over cumulative buckets, in milliseconds."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    counts = [buckets[b] for b in bounds]
    rank = q * counts[-1]
    i = bisect.bisect_left(counts, rank)
    if math.isinf(bounds[i]):
        return 1000 * bounds[i - 1] if i else None
    lower, below = (bounds[i - 1], counts[i - 1]) if i else (0.0, 0.0)
    inside = counts[i] - below
    return 1000 * (lower + (bounds[i] - lower) * ((rank - below) / inside if inside else 1.0))


def _highest(by_process: dict[str, float], what: str) -> tuple[float | None, str]:
    if not by_process:
        return None, what
    name = max(by_process, key=lambda n: by_process[n])
    return by_process[name], f"{what}, highest: {name}"
