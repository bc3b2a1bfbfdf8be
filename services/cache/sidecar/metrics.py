"""The cache sidecar's store statistics (CacheService.Stats) as Prometheus metrics,
read from the store right before each scrape; docs/observability.md lists them."""

from __future__ import annotations

from collections.abc import Iterable

from devops_hub.v1 import cache_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.cache.sidecar.stores.fallback import FallbackStore

# The counters, each following one of the store's running totals: name, help, label.
_COUNTERS = (
    ("hits", "Cache reads that found an entry, by namespace.", "namespace"),
    ("misses", "Cache reads that found nothing, by namespace.", "namespace"),
    ("evictions", "Entries evicted, by reason (size, bytes, ttl).", "reason"),
    ("sets", "Entries stored.", None),
    ("invalidations", "Delete, Invalidate and Clear calls applied.", None),
    ("backend_errors", "Redis calls that failed and were served from memory.", None),
    ("backend_switches", "Switches between Redis and memory, either way.", None),
)


class CacheMetrics:
    """The store counts; this class turns its running totals into counter increments
    each time it is given a snapshot, so counters stay counters in multiprocess mode."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counters = {
            name: Counter(f"devops_hub_cache_{name}", text, [label] if label else [], registry=registry)
            for name, text, label in _COUNTERS
        }
        self._hit_ratio = Gauge(
            "devops_hub_cache_hit_ratio", "Hits / (hits + misses) since the sidecar started, by namespace.",
            ["namespace"], registry=registry, multiprocess_mode="liveall",
        )
        self._entries = Gauge("devops_hub_cache_entries", "Live entries in the active backend.", registry=registry, multiprocess_mode="liveall")
        self._bytes = Gauge("devops_hub_cache_bytes", "Bytes held by the active backend.", registry=registry, multiprocess_mode="liveall")
        self._backend = Gauge(
            "devops_hub_cache_backend", "1 for the backend serving now (memory or redis), 0 for the others.",
            ["backend"], registry=registry, multiprocess_mode="livesum",
        )
        # Last totals seen, by counter and label: what the next snapshot is compared with.
        self._seen: dict[tuple[str, str], int] = {}
        self._backends: set[str] = set()

    def declare(self, namespaces: Iterable[str]) -> None:
        """Exports these namespaces' hits and misses at zero before their first read."""
        for namespace in namespaces:
            self._counters["hits"].labels(namespace)
            self._counters["misses"].labels(namespace)

    def update(self, stats: cache_pb2.CacheStats) -> None:
        for namespace, counts in stats.namespaces.items():
            self._advance("hits", counts.hits, namespace)
            self._advance("misses", counts.misses, namespace)
            self._hit_ratio.labels(namespace).set(counts.hit_rate)
        for reason, count in stats.evictions.items():
            self._advance("evictions", count, reason)
        for name in ("sets", "invalidations", "backend_errors", "backend_switches"):
            self._advance(name, getattr(stats, name))
        self._entries.set(stats.entries)
        self._bytes.set(stats.bytes)
        self._backends.add(stats.backend)
        for backend in self._backends:
            self._backend.labels(backend).set(1 if backend == stats.backend else 0)

    def _advance(self, name: str, total: int, label: str | None = None) -> None:
        counter = self._counters[name] if label is None else self._counters[name].labels(label)
        last = self._seen.get((name, label or ""), 0)
        # Below the last total: the store started counting again (a new store object).
        counter.inc(total - last if total >= last else total)
        self._seen[(name, label or "")] = total


class CacheStatsRefresher:
    def __init__(self, store: FallbackStore, metrics: CacheMetrics) -> None:
        self._store = store
        self._metrics = metrics

    async def __call__(self) -> None:
        self._metrics.update(await self._store.stats())
