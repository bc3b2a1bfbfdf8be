"""The cache measures its own consistency: a checker samples the invalidations a layer
applies and, after a delay, counts every layer (this one, the sidecar) that still holds
a value read before the invalidation. A stale entry planted on purpose is seen; a
healthy cache counts none. Real sidecar over gRPC."""

from __future__ import annotations

import grpc
from devops_hub.v1 import cache_pb2, cache_pb2_grpc
from google.protobuf.wrappers_pb2 import StringValue
from prometheus_client import CollectorRegistry

from services.cache.client.client import CacheClient
from services.cache.client.near_cache import NearCache, NearEntry
from services.cache.consistency import ConsistencyChecker, ConsistencyMetrics
from services.cache.sidecar.server import CacheSidecar
from tests.support import eventually
from tests.support.cache import READ_TIMEOUT, STRING_TYPE, CountingLoader


def figure(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_a_planted_stale_entry_is_counted_and_a_healthy_cache_is_not(sidecar: CacheSidecar) -> None:
    registry = CollectorRegistry()
    async with CacheClient(sidecar.host.bound_address, timeout=2.0, near_cache=NearCache()) as client:
        near = client.near
        assert near is not None
        checker = ConsistencyChecker(
            near, "near", client.transport, ConsistencyMetrics(registry), sample_every=1, delays=(0.2, 0.5)
        )
        checker.start()
        try:
            await eventually(lambda: near.live)
            for key in ("agents:get:healthy", "agents:get:planted"):
                await client.get_or_load(key, 60, StringValue, CountingLoader("before the write"))
            assert len(near) == 2

            # Two writes reach the cache by the relay's route: the sidecar and the
            # near-cache drop both keys at log position 1.
            sync = cache_pb2.CacheSyncRequest(after=0, through=1, patterns=["agents:get:healthy", "agents:get:planted"])
            async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
                await cache_pb2_grpc.CacheServiceStub(channel).Sync(sync, timeout=READ_TIMEOUT)
            await eventually(lambda: near.position == 1 and len(near) == 0)
            # A bug that kept the old value, planted past every check the cache makes.
            near._store("agents:get:planted", NearEntry(STRING_TYPE, b"", False, near._clock() + 60, 0))

            await eventually(lambda: figure(registry, "devops_hub_cache_consistency_checked_total", layer="near") == 2)
            await eventually(lambda: figure(registry, "devops_hub_cache_consistency_stale_total", layer="near", after="0.5s") == 1)
            assert figure(registry, "devops_hub_cache_consistency_stale_total", layer="near", after="0.2s") == 1
            assert figure(registry, "devops_hub_cache_consistency_checked_total", layer="sidecar") == 2
            assert figure(registry, "devops_hub_cache_consistency_stale_total", layer="sidecar", after="0.2s") == 0
            assert figure(registry, "devops_hub_cache_consistency_stale_total", layer="sidecar", after="0.5s") == 0
        finally:
            await checker.stop()
