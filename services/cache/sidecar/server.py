"""Wiring for the cache sidecar: stores, Watch hub, peers (with REDIS_URL), servicer, gRPC host."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from devops_hub.v1 import cache_pb2, cache_pb2_grpc
from opentelemetry import trace

from services.cache.client.keys import SERVICE_NAMESPACES
from services.cache.sidecar.hub import InvalidationHub
from services.cache.sidecar.metrics import CacheMetrics, CacheStatsRefresher
from services.cache.sidecar.peers import Peers
from services.cache.sidecar.servicer import CacheServicer
from services.cache.sidecar.stores import redis as redis_store
from services.cache.sidecar.stores.fallback import FallbackStore
from services.cache.sidecar.stores.memory import MemoryStore
from services.cache.sidecar.stores.redis_layout import KeyLayout
from services.common.auth.verifier import RemoteVerifier
from services.common.auth.wiring import Access
from services.common.foundation.dependencies import redis_node_url
from services.common.foundation.settings import Settings
from services.common.runtime.grpc_host import GrpcHost
from services.common.runtime.process import GrpcProcess, run
from services.common.telemetry.endpoint import Refresher
from services.common.telemetry.metrics import ServiceMetrics, service_metrics
from services.common.telemetry.profiling import SlowRequestProfiler

log = logging.getLogger(__name__)

SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name
# Redis must answer well within the clients' deadline (CACHE_TIMEOUT, 250 ms), so a
# failing Redis is replaced by memory inside the very call that found it failing.
MAX_REDIS_TIMEOUT = 0.25


@dataclasses.dataclass
class CacheSidecar(GrpcProcess):
    host: GrpcHost
    metrics_port: int
    store: FallbackStore
    hub: InvalidationHub
    access: Access
    cache_metrics: CacheMetrics
    peers: Peers | None = None

    async def start_work(self) -> None:
        await self.store.start()
        self.hub.position = (await self.store.sync_state()).applied
        if self.peers is not None:
            self.peers.start()

    async def end_streams(self) -> None:
        self.hub.close()  # the followers clear and resubscribe elsewhere

    async def close(self) -> None:
        self.hub.close()
        await self.access.close()
        if self.peers is not None:
            await self.peers.close()
        await self.store.close()

    def refreshers(self) -> Sequence[Refresher]:
        return [CacheStatsRefresher(self.store, self.cache_metrics)]


async def build(
    settings: Settings,
    metrics: ServiceMetrics | None = None,
    *,
    tracer: trace.Tracer | None = None,
    profiler: SlowRequestProfiler | None = None,
) -> CacheSidecar:
    """Builds the sidecar bound to settings.cache_addr (port 0 picks a free one); `metrics`
    default to the process's, in the default registry."""
    metrics = metrics or service_metrics()
    hub = InvalidationHub()
    negative_ttl = min(settings.cache_negative_ttl, settings.cache_default_ttl)
    memory = MemoryStore(
        max_entries=settings.cache_max_size,
        max_bytes=settings.cache_max_bytes,
        default_ttl=settings.cache_default_ttl,
        negative_ttl=negative_ttl,
    )
    primary: redis_store.RedisStore | None = None
    peers: Peers | None = None
    if settings.redis_url:
        timeout = min(settings.redis_timeout, MAX_REDIS_TIMEOUT)
        client = redis_store.connect(settings.redis_url, max_connections=settings.redis_max_connections, timeout=timeout)
        layout = KeyLayout(settings.redis_key_prefix)
        primary = redis_store.RedisStore(client, default_ttl=settings.cache_default_ttl, negative_ttl=negative_ttl, layout=layout)
        # A connection of its own: the store's pool is reset after an outage, and
        # that must not cut the subscription (which would end every Watch stream). In
        # a Redis Cluster any node hears every PUBLISH: the first one named will do.
        peers_client = redis_store.connect(redis_node_url(settings.redis_url), max_connections=1, timeout=timeout)
        peers = Peers(peers_client, primary.layout.channel, primary.origin, hub)
        log.info("cache store: Redis (pool of %d, %.0f ms timeouts), memory fallback",
                 settings.redis_max_connections, timeout * 1000)
    store = FallbackStore(primary, memory, memory_ttl=settings.cache_fallback_ttl)
    # The sidecar holds no database: keys are checked by the agents service (WhoAmI).
    # No rate limits: its callers are the services, whose clients were limited already.
    access = Access.build(settings, RemoteVerifier.from_settings(settings, tracer=tracer), rate_limited=False)
    host = GrpcHost(
        settings.cache_addr,
        metrics=metrics.grpc,
        guard=access.guard,
        reflection=settings.grpc_reflection,
        tracer=tracer,
        profiler=profiler,
    )
    host.add(cache_pb2_grpc.add_CacheServiceServicer_to_server, CacheServicer(store, hub), SERVICE_NAME)
    cache_metrics = metrics.group(CacheMetrics)
    cache_metrics.declare(SERVICE_NAMESPACES)
    return CacheSidecar(
        host=host,
        metrics_port=settings.cache_metrics_port,
        store=store,
        hub=hub,
        access=access,
        cache_metrics=cache_metrics,
        peers=peers,
    )


def main() -> None:
    run(build, name="cache sidecar", service="cache")
