"""The cache measuring its own consistency, off the request path (docs/cache.md, point
12; the metrics in docs/observability.md): a following layer samples the exact-key
invalidations it applies and checks 1 s and 10 s later that neither it nor the sidecar
still holds a value read before them, which the one-clock rules say no layer may keep.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Any

from devops_hub.v1 import cache_pb2
from prometheus_client import CollectorRegistry, Counter

from services.cache.client.keys import parse_pattern
from services.cache.client.near_cache import FedCache
from services.cache.client.transport import SidecarTransport
from services.common.foundation.background import cancel_and_wait, spawn, wait_set

# One in this many exact invalidations is sampled; the checks wait this long after it.
SAMPLE_EVERY = 10
DELAYS = (1.0, 10.0)
# Checks waiting at most: a burst of writes never grows the checker's memory.
MAX_PENDING = 1024


class ConsistencyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.checked = Counter(
            "devops_hub_cache_consistency_checked", "Invalidations the consistency checker sampled, by cache layer.", ["layer"], registry=registry
        )
        self.stale = Counter(
            "devops_hub_cache_consistency_stale",
            "Sampled invalidations after which a cache layer still held an older value, by layer and delay (1s, 10s).",
            ["layer", "after"], registry=registry,
        )


class ConsistencyChecker:
    def __init__(
        self, cache: FedCache[Any, Any], layer: str, transport: SidecarTransport, metrics: ConsistencyMetrics,
        *, sample_every: int = SAMPLE_EVERY, delays: tuple[float, ...] = DELAYS,
    ) -> None:
        self._cache = cache
        self._layer = layer
        self._transport = transport
        self._metrics = metrics
        self._sample_every = max(1, sample_every)
        self._delays = delays
        self._seen = 0
        self._due: list[tuple[float, int, str, int, float]] = []
        self._order = itertools.count()
        self._woken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        for name in (layer, "sidecar"):  # every series at zero from the start, for alerts and panels
            metrics.checked.labels(name)
            for delay in delays:
                metrics.stale.labels(name, f"{delay:g}s")
        cache.observer = self.observe

    def observe(self, pattern: str, at: int) -> None:
        if parse_pattern(pattern).kind != "exact":
            return
        self._seen += 1
        if self._seen % self._sample_every or len(self._due) + len(self._delays) > MAX_PENDING:
            return
        now = time.monotonic()
        for delay in self._delays:
            heapq.heappush(self._due, (now + delay, next(self._order), pattern, at, delay))
        self._woken.set()

    def start(self) -> None:
        if self._task is None:
            self._task = spawn(self._run(), name="cache-consistency-checker")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def _run(self) -> None:
        while True:
            wait = self._due[0][0] - time.monotonic() if self._due else None
            if wait is None or wait > 0:
                self._woken.clear()
                await wait_set(self._woken, wait)
                continue
            _, _, key, at, delay = heapq.heappop(self._due)
            for layer in (self._layer, "sidecar"):
                if delay == self._delays[0]:
                    self._metrics.checked.labels(layer).inc()
                if await self._holds_older(layer, key, at):
                    self._metrics.stale.labels(layer, f"{delay:g}s").inc()

    async def _holds_older(self, layer: str, key: str, at: int) -> bool:
        if layer != "sidecar":
            return self._cache.holds_older(key, at)
        response, _ = await self._transport.call("Get", cache_pb2.CacheGetRequest(key=key), respect_backoff=False)
        return response is not None and bool(response.found) and response.entry.version < at
