"""The cache's position in the services' invalidation log, over gRPC on real sidecars:
GetSyncState, Sync and Invalidate.sequence, on memory and on Redis (under a test
prefix), and the Redis position shared by every sidecar on that Redis. (The fallback
store's position, which follows the serving store, is in test_cache_fallback.py.)"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import grpc
import pytest
from devops_hub.v1 import cache_pb2, cache_pb2_grpc
from google.protobuf import empty_pb2

from services.cache_sidecar.stores.position import MAX_AHEAD, SyncState
from services.cache_sidecar.stores.redis import RedisStore, connect
from services.cache_sidecar.stores.redis_layout import KeyLayout
from tests.support.cache import StartSidecar, entry


@pytest.fixture
async def fresh_stub(start_sidecar: StartSidecar, backend: dict) -> AsyncIterator[cache_pb2_grpc.CacheServiceStub]:
    """A stub on a new sidecar that nobody has synced: memory, then Redis."""
    sidecar = await start_sidecar(synced=False, **backend)
    async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
        yield cache_pb2_grpc.CacheServiceStub(channel)


async def state(stub: cache_pb2_grpc.CacheServiceStub) -> tuple[int, list[int], bool]:
    got = await stub.GetSyncState(empty_pb2.Empty())
    return got.applied, list(got.ahead), got.fresh


async def invalidate(stub: cache_pb2_grpc.CacheServiceStub, sequence: int, *patterns: str) -> None:
    await stub.Invalidate(cache_pb2.CacheInvalidateRequest(patterns=patterns or ["seq:*"], sequence=sequence))


async def found(stub: cache_pb2_grpc.CacheServiceStub, *keys: str) -> list[str]:
    got = await stub.GetMany(cache_pb2.CacheGetManyRequest(keys=keys))
    return sorted(e.key for e in got.entries)


async def test_a_new_cache_is_fresh_and_takes_no_fills_until_synced(fresh_stub) -> None:
    stub = fresh_stub
    assert await state(stub) == (0, [], True)
    miss = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))
    assert not miss.found and miss.fill_token == 0  # no token: nothing to fill with
    # A token from anywhere else is refused; an unconditional Set is still stored.
    for token in (12345, (1 << 63) | 12345):
        refused = await stub.Set(cache_pb2.CacheSetRequest(entry=entry("agents:get:1"), fill_token=token))
        assert not refused.stored
    assert (await stub.Set(cache_pb2.CacheSetRequest(entry=entry("agents:get:2")))).stored
    # Sequenced invalidations are applied but move no position while fresh.
    await invalidate(stub, 3, "agents:get:2")
    assert await found(stub, "agents:get:2") == []
    assert await state(stub) == (0, [], True)

    synced = await stub.Sync(cache_pb2.CacheSyncRequest(after=0, through=7))
    assert (synced.applied, list(synced.ahead), synced.fresh) == (7, [], False)
    miss = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))
    assert miss.fill_token
    filled = await stub.Set(cache_pb2.CacheSetRequest(entry=entry("agents:get:1", b"v"), fill_token=miss.fill_token))
    assert filled.stored


async def test_sequenced_invalidations_move_the_position_in_order(fresh_stub) -> None:
    stub = fresh_stub
    await stub.Sync(cache_pb2.CacheSyncRequest(after=0, through=10))
    await invalidate(stub, 11)
    assert await state(stub) == (11, [], False)
    await invalidate(stub, 14)
    await invalidate(stub, 13)
    assert await state(stub) == (11, [13, 14], False)  # out of order: remembered ahead
    await invalidate(stub, 12)
    assert await state(stub) == (14, [], False)  # the gap closed: the ahead entries absorbed
    await invalidate(stub, 5)  # already applied: nothing moves
    await invalidate(stub, 20)
    assert await state(stub) == (14, [20], False)

    # The patterns are applied as well as recorded.
    await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=[entry("agents:get:1"), entry("agents:get:2")]))
    await invalidate(stub, 15, "agents:get:1")
    assert await found(stub, "agents:get:1", "agents:get:2") == ["agents:get:2"]
    assert await state(stub) == (15, [20], False)


async def test_sync_applies_its_patterns_and_refuses_to_skip_entries(fresh_stub) -> None:
    stub = fresh_stub
    await stub.Sync(cache_pb2.CacheSyncRequest(after=0, through=10))
    for sequence in (12, 14, 16):
        await invalidate(stub, sequence)
    keys = ["agents:get:1", "agents:list:a", "workflows:get:1"]
    await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=[entry(key) for key in keys]))

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Sync(cache_pb2.CacheSyncRequest(after=11, through=13, patterns=["agents:*"]))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await state(stub) == (10, [12, 14, 16], False)

    synced = await stub.Sync(cache_pb2.CacheSyncRequest(after=10, through=13, patterns=["agents:list:*", "agents:get:1"]))
    # 12 is covered by the range, and 14 continues it: absorbed.
    assert (synced.applied, list(synced.ahead), synced.fresh) == (14, [16], False)
    assert await found(stub, *keys) == ["workflows:get:1"]

    # A Sync behind the position moves nothing back, but its patterns still apply.
    await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=[entry("agents:get:1")]))
    behind = await stub.Sync(cache_pb2.CacheSyncRequest(after=3, through=5, patterns=["agents:get:1"]))
    assert (behind.applied, list(behind.ahead)) == (14, [16])
    assert await found(stub, *keys) == ["workflows:get:1"]

    # The log was pruned past the position: the cache empties itself instead.
    cleared = await stub.Sync(cache_pb2.CacheSyncRequest(after=14, through=40, clear=True))
    assert (cleared.applied, list(cleared.ahead), cleared.fresh) == (40, [], False)
    assert await found(stub, *keys) == []


async def test_entries_ahead_are_bounded_lowest_dropped(fresh_stub) -> None:
    stub = fresh_stub
    await stub.Sync(cache_pb2.CacheSyncRequest(after=0, through=1))
    sequences = list(range(3, 3 + MAX_AHEAD + 2))
    random.Random(9).shuffle(sequences)
    for sequence in sequences:  # one at a time: the order is what matters here
        await invalidate(stub, sequence)
    applied, ahead, fresh = await state(stub)
    assert (applied, fresh) == (1, False)
    assert ahead == list(range(5, 3 + MAX_AHEAD + 2))  # the two lowest were forgotten
    await invalidate(stub, 2)  # 3 and 4 were forgotten: the relay must send them again
    assert (await state(stub))[:2] == (2, ahead)


async def test_sidecars_on_one_redis_share_one_position(
    start_sidecar: StartSidecar, redis_url: str, redis_prefix: str
) -> None:
    options = dict(redis_url=redis_url, redis_key_prefix=redis_prefix, synced=False)
    sidecars = [await start_sidecar(**options), await start_sidecar(**options)]
    async with (
        grpc.aio.insecure_channel(sidecars[0].host.bound_address) as first,
        grpc.aio.insecure_channel(sidecars[1].host.bound_address) as second,
    ):
        one, other = cache_pb2_grpc.CacheServiceStub(first), cache_pb2_grpc.CacheServiceStub(second)
        assert await state(other) == (0, [], True)
        await one.Sync(cache_pb2.CacheSyncRequest(after=0, through=5))
        assert await state(other) == (5, [], False)
        await invalidate(other, 7)
        assert await state(one) == (5, [7], False)
        await invalidate(one, 6)
        assert await state(other) == (7, [], False)


async def test_concurrent_updates_of_the_redis_position_are_never_lost(redis_url: str, redis_prefix: str) -> None:
    """Sequences 1..N recorded through two stores (two sidecars' connections) at once
    and out of order: the position, changed by one script per update, ends at N.
    Driven on the stores with long timeouts, so a loaded machine cannot turn a slow
    reply into a switch to memory."""
    stores = [
        RedisStore(connect(redis_url, max_connections=8, timeout=5.0), default_ttl=60, layout=KeyLayout(redis_prefix))
        for _ in range(2)
    ]
    try:
        await stores[0].sync(0, 0, (), False)
        sequences = list(range(1, 601))
        random.Random(7).shuffle(sequences)
        for start in range(0, len(sequences), 40):
            batch = sequences[start : start + 40]
            await asyncio.gather(*(stores[s % 2].invalidate_many([f"seq:{s}"], s) for s in batch))
        assert await stores[0].sync_state() == await stores[1].sync_state() == SyncState(600, (), False)
    finally:
        for store in stores:
            await store.close()
