"""Wiring for the cache sidecar: stores, invalidation hub and relay, servicer, gRPC host.

Without REDIS_URL the store is memory only. With it, the store is Redis with a
memory fallback, and a relay brings other sidecars' invalidations to this one's
Watch streams.

Settings read with a default until they exist in Settings (see docs/cache.md):
CACHE_NEGATIVE_TTL, CACHE_FALLBACK_TTL, REDIS_TIMEOUT.
"""

from __future__ import annotations

import dataclasses
import logging

from devops_hub.v1 import cache_pb2_grpc

from services.cache_sidecar.cache_entries import DEFAULT_HEARTBEAT_SECONDS, CacheEntries
from services.cache_sidecar.hub import DEFAULT_WATCH_QUEUE, InvalidationHub
from services.cache_sidecar.metrics import CacheMetrics, CacheStatsRefresher
from services.cache_sidecar.relay import InvalidationRelay
from services.cache_sidecar.servicer import CacheServicer
from services.cache_sidecar.stores import redis as redis_store
from services.cache_sidecar.stores.base import Store
from services.cache_sidecar.stores.fallback import FallbackStore
from services.cache_sidecar.stores.memory import MemoryBackend, MemoryStore
from services.cache_sidecar.stores.redis_layout import KeyLayout
from services.common.auth.rate_limit import RateLimiter
from services.common.auth.verifier import RemoteVerifier
from services.common.auth.wiring import build_guard
from services.common.cache.keys import MAX_VALUE_BYTES, SERVICE_NAMESPACES
from services.common.grpc_host import GrpcHost, run_until_stopped
from services.common.settings import Settings
from services.common.telemetry import Telemetry

log = logging.getLogger(__name__)

SERVICE_NAME = "devops_hub.v1.CacheService"
# Redis must answer well within the clients' deadline (CACHE_TIMEOUT, 250 ms), so a
# failing Redis is replaced by memory inside the very call that found it failing.
MAX_REDIS_TIMEOUT = 0.25


@dataclasses.dataclass
class CacheSidecar:
    """A built sidecar whose stores are running: `await host.start()` serves it."""

    host: GrpcHost
    store: Store
    hub: InvalidationHub
    # The memory store: the whole cache without Redis, the fallback with it.
    memory: MemoryStore
    relay: InvalidationRelay | None = None
    verifier: RemoteVerifier | None = None
    limiter: RateLimiter | None = None

    async def end_streams(self) -> None:
        """Ends the Watch streams (their clients clear and resubscribe elsewhere) and
        refuses new ones: run before the server's grace period, which they would
        otherwise hold open to the end."""
        self.hub.close()

    async def close(self) -> None:
        self.hub.close()
        if self.verifier is not None:
            await self.verifier.close()
        if self.limiter is not None:
            await self.limiter.close()
        if self.relay is not None:
            await self.relay.close()
        await self.store.close()


async def build(
    settings: Settings,
    *,
    watch_queue_size: int = DEFAULT_WATCH_QUEUE,
    heartbeat_interval: float = DEFAULT_HEARTBEAT_SECONDS,
    redis_key_prefix: str | None = None,
    redis_timeout: float | None = None,
) -> CacheSidecar:
    """Builds the sidecar bound to settings.cache_addr (port 0 picks a free one) and
    starts its stores' background work. The keywords override settings (tests and
    benchmarks use a key prefix of their own)."""
    hub = InvalidationHub(watch_queue_size)
    negative_ttl = settings.cache_negative_ttl
    memory = MemoryStore(
        max_entries=settings.cache_max_size,
        max_bytes=settings.cache_max_bytes,
        default_ttl=settings.cache_default_ttl,
        negative_ttl=min(negative_ttl, settings.cache_default_ttl),
    )
    memory_backend = MemoryBackend(memory)
    relay = None
    store: Store
    if settings.redis_url:
        timeout = min(redis_timeout or settings.redis_timeout, MAX_REDIS_TIMEOUT)
        client = redis_store.connect(settings.redis_url, max_connections=settings.redis_max_connections, timeout=timeout)
        primary = redis_store.RedisStore(
            client,
            default_ttl=settings.cache_default_ttl,
            negative_ttl=min(negative_ttl, settings.cache_default_ttl),
            layout=KeyLayout(redis_key_prefix or settings.redis_key_prefix),
            max_value_bytes=min(settings.cache_max_bytes, MAX_VALUE_BYTES),
        )
        fallback = FallbackStore(
            primary, memory_backend, memory_ttl=settings.cache_fallback_ttl
        )
        await fallback.start()
        # A connection of its own: the store's pool is reset after an outage, and
        # that must not cut the subscription (which would end every Watch stream).
        relay_client = redis_store.connect(settings.redis_url, max_connections=1, timeout=timeout)
        relay = InvalidationRelay(relay_client, primary.layout.channel, primary.origin, hub)
        relay.start()
        store = fallback
        log.info("cache store: Redis (pool of %d, %.0f ms timeouts), memory fallback",
                 settings.redis_max_connections, timeout * 1000)
    else:
        memory_backend.start()
        store = memory_backend
    # The sidecar holds no database: keys are checked by the agents service (WhoAmI).
    # No rate limits: its callers are the services, whose clients were limited already.
    verifier = RemoteVerifier(settings.agents_addr, service_key=settings.service_api_key)
    limiter = RateLimiter({})
    host = GrpcHost(
        settings.cache_addr, guard=build_guard(settings, verifier, limiter), reflection=settings.grpc_reflection
    )
    host.add(
        cache_pb2_grpc.add_CacheServiceServicer_to_server,
        CacheServicer(CacheEntries(store, hub, heartbeat_interval=heartbeat_interval)),
        SERVICE_NAME,
    )
    return CacheSidecar(host=host, store=store, hub=hub, memory=memory, relay=relay, verifier=verifier, limiter=limiter)


async def main(settings: Settings | None = None, telemetry: Telemetry | None = None) -> None:
    settings = settings or Settings.from_env()
    telemetry = telemetry or Telemetry.start(settings, "cache")
    sidecar = await build(settings)
    cache_metrics = telemetry.metrics.group(CacheMetrics)
    cache_metrics.declare(SERVICE_NAMESPACES)
    await telemetry.serve_metrics(
        "cache sidecar", settings.cache_addr, settings.cache_metrics_port,
        refreshers=[CacheStatsRefresher(sidecar.store, cache_metrics)],
    )
    await run_until_stopped(
        sidecar.host, "cache sidecar", settings.shutdown_grace, [sidecar.close, telemetry.close],
        pre_stop=[sidecar.end_streams],
    )
