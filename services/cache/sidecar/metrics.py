"""The cache sidecar's metrics: its store's statistics (CacheService.Stats) in Prometheus.

The sidecar's main() makes one CacheMetrics in the registry its metrics endpoint
serves and hands the endpoint a CacheStatsRefresher, which reads the store right
before each scrape. docs/observability.md lists the metrics.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.cache.sidecar.stores.base import StoreStats


class CacheMetrics:
    """The cache sidecar's statistics (CacheService.Stats) as Prometheus metrics.

    The store counts; this class turns its running totals into counter increments
    each time it is given a snapshot, so counters stay counters in multiprocess mode.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._hits = Counter("devops_hub_cache_hits", "Cache reads that found an entry, by namespace.", ["namespace"], registry=registry)
        self._misses = Counter("devops_hub_cache_misses", "Cache reads that found nothing, by namespace.", ["namespace"], registry=registry)
        self._hit_ratio = Gauge(
            "devops_hub_cache_hit_ratio",
            "Hits / (hits + misses) since the sidecar started, by namespace.",
            ["namespace"],
            registry=registry,
            multiprocess_mode="liveall",
        )
        self._evictions = Counter("devops_hub_cache_evictions", "Entries evicted, by reason (size, bytes, ttl).", ["reason"], registry=registry)
        self._sets = Counter("devops_hub_cache_sets", "Entries stored.", registry=registry)
        self._invalidations = Counter("devops_hub_cache_invalidations", "Delete, Invalidate and Clear calls applied.", registry=registry)
        self._entries = Gauge("devops_hub_cache_entries", "Live entries in the active backend.", registry=registry, multiprocess_mode="liveall")
        self._bytes = Gauge("devops_hub_cache_bytes", "Bytes held by the active backend.", registry=registry, multiprocess_mode="liveall")
        self._backend = Gauge(
            "devops_hub_cache_backend",
            "1 for the backend serving now (memory or redis), 0 for the others.",
            ["backend"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._backend_errors = Counter("devops_hub_cache_backend_errors", "Redis calls that failed and were served from memory.", registry=registry)
        self._backend_switches = Counter("devops_hub_cache_backend_switches", "Switches between Redis and memory, either way.", registry=registry)
        # Last totals seen, by counter and label: what the next snapshot is compared with.
        self._seen: dict[tuple[str, str], int] = {}
        self._backends: set[str] = set()

    def declare(self, namespaces: Iterable[str]) -> None:
        """Exports these namespaces' hits and misses at zero before their first read."""
        for namespace in namespaces:
            self._hits.labels(namespace)
            self._misses.labels(namespace)

    def update(self, stats: StoreStats) -> None:
        """Applies a snapshot of the store's running totals."""
        for namespace, counts in stats.namespaces.items():
            self._advance(self._hits.labels(namespace), ("hits", namespace), counts.hits)
            self._advance(self._misses.labels(namespace), ("misses", namespace), counts.misses)
            self._hit_ratio.labels(namespace).set(counts.hit_rate)
        for reason, count in stats.evictions.items():
            self._advance(self._evictions.labels(reason), ("evictions", reason), count)
        self._advance(self._sets, ("sets", ""), stats.sets)
        self._advance(self._invalidations, ("invalidations", ""), stats.invalidations)
        self._advance(self._backend_errors, ("backend_errors", ""), stats.backend_errors)
        self._advance(self._backend_switches, ("backend_switches", ""), stats.backend_switches)
        self._entries.set(stats.entries)
        self._bytes.set(stats.bytes)
        self._backends.add(stats.backend)
        for backend in self._backends:
            self._backend.labels(backend).set(1 if backend == stats.backend else 0)

    def _advance(self, counter: Counter, key: tuple[str, str], total: int) -> None:
        last = self._seen.get(key, 0)
        if total > last:
            counter.inc(total - last)
            self._seen[key] = total
        elif total < last:
            # The store started counting again (a new store object): what it counted is new.
            counter.inc(total)
            self._seen[key] = total


class CacheStatsSource(Protocol):
    async def stats(self) -> StoreStats: ...


class CacheStatsRefresher:
    """Reads a store's statistics into CacheMetrics; the metrics endpoint awaits it."""

    def __init__(self, store: CacheStatsSource, metrics: CacheMetrics) -> None:
        self._store = store
        self._metrics = metrics

    async def __call__(self) -> None:
        self._metrics.update(await self._store.stats())
