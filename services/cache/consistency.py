"""The cache measuring its own consistency, off the request path.

Every layer that follows the invalidation stream (a service's near-cache, the
gateway's edge cache) samples the invalidations of exact keys it applies, with the
log position of each, and checks 1 s and 10 s later that neither it nor the sidecar
still holds a value of that key read before that position: a value older than an
acknowledged write, which the one-clock rules say no layer may keep. What it finds is
counted on /metrics (`devops_hub_cache_consistency_checked_total{layer}` and
`devops_hub_cache_consistency_stale_total{layer,after}`), drawn on the dashboard and
alerted on (deploy/prometheus), as large caches watch theirs with an observer apart
from the write path.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from devops_hub.v1 import cache_pb2
from prometheus_client import CollectorRegistry, Counter

from services.cache.client.fed_cache import FedCache
from services.cache.client.keys import parse_pattern
from services.cache.client.transport import SidecarTransport
from services.common.background import cancel_and_wait, spawn

# One in this many exact invalidations is sampled; the checks wait this long after it.
SAMPLE_EVERY = 10
DELAYS = (1.0, 10.0)
# Checks waiting at most: a burst of writes never grows the checker's memory.
MAX_PENDING = 1024

# A layer's check: does it hold a value of `key` read before log position `at`?
HoldsOlder = Callable[[str, int], Awaitable[bool]]


class ConsistencyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.checked = Counter(
            "devops_hub_cache_consistency_checked",
            "Invalidations the consistency checker sampled, by cache layer.",
            ["layer"],
            registry=registry,
        )
        self.stale = Counter(
            "devops_hub_cache_consistency_stale",
            "Sampled invalidations after which a cache layer still held an older value, by layer and delay (1s, 10s).",
            ["layer", "after"],
            registry=registry,
        )

    def declare(self, layers: list[str], delays: tuple[float, ...] = DELAYS) -> None:
        """Every series at zero from the start, so alerts and panels see them."""
        for layer in layers:
            self.checked.labels(layer)
            for delay in delays:
                self.stale.labels(layer, f"{delay:g}s")


class ConsistencyChecker:
    def __init__(
        self,
        layers: Mapping[str, HoldsOlder],
        metrics: ConsistencyMetrics,
        *,
        sample_every: int = SAMPLE_EVERY,
        delays: tuple[float, ...] = DELAYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._layers = dict(layers)
        self._metrics = metrics
        self._sample_every = max(1, sample_every)
        self._delays = delays
        self._clock = clock
        self._seen = 0
        self._due: list[tuple[float, int, str, int, float]] = []
        self._order = itertools.count()
        self._woken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        metrics.declare(list(self._layers), delays)

    @classmethod
    def following(
        cls, cache: FedCache[Any, Any], layer: str, transport: SidecarTransport, metrics: ConsistencyMetrics, **options: Any
    ) -> ConsistencyChecker:
        """A checker of `cache` (named `layer`) and the sidecar, sampling what `cache` applies."""

        async def cache_holds_older(key: str, at: int) -> bool:
            return cache.holds_older(key, at)

        async def sidecar_holds_older(key: str, at: int) -> bool:
            response, _ = await transport.call("Get", cache_pb2.CacheGetRequest(key=key), respect_backoff=False)
            return response is not None and bool(response.found) and response.entry.version < at

        checker = cls({layer: cache_holds_older, "sidecar": sidecar_holds_older}, metrics, **options)
        cache.observer = checker.observe
        return checker

    def observe(self, pattern: str, at: int) -> None:
        """An invalidation of log position `at` that a layer applied."""
        if parse_pattern(pattern).kind != "exact":
            return
        self._seen += 1
        if self._seen % self._sample_every or len(self._due) + len(self._delays) > MAX_PENDING:
            return
        now = self._clock()
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
            if not self._due:
                self._woken.clear()
                await self._woken.wait()
                continue
            wait = self._due[0][0] - self._clock()
            if wait > 0:
                self._woken.clear()
                try:
                    await asyncio.wait_for(self._woken.wait(), wait)
                except TimeoutError:
                    pass
                continue
            _, _, key, at, delay = heapq.heappop(self._due)
            for layer, holds_older in self._layers.items():
                if delay == self._delays[0]:
                    self._metrics.checked.labels(layer).inc()
                if await holds_older(key, at):
                    self._metrics.stale.labels(layer, f"{delay:g}s").inc()
