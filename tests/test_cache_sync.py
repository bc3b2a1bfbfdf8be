"""The cache's position in the services' invalidation log, over gRPC on real sidecars:
GetSyncState and Sync, on memory and on Redis (under a test prefix), and the Redis
position shared by every sidecar on that Redis. (The fallback store's position, which
follows the serving store, is in test_cache_fallback.py; the relays that send the
Syncs, in test_log/relay.py.)

The rules (SyncState in services/cache/sidecar/stores/base.py): a Sync(after, through) is
refused when the cache's position is below `after` (it would skip entries), applies
nothing when `through` is not past the position (another relay covered it), clears a
fresh cache (which vouches for nothing) or one asked to clear, and otherwise applies
its patterns at `through`; the position moves to max(applied, through).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import grpc
import pytest
from devops_hub.v1 import cache_pb2, cache_pb2_grpc
from google.protobuf import empty_pb2

from services.cache.sidecar.stores.base import SyncState
from services.cache.sidecar.stores.redis import RedisStore, connect
from services.cache.sidecar.stores.redis_layout import KeyLayout
from tests.support.cache import READ_TIMEOUT, StartSidecar, entry
from tests.support.grpc_errors import failure_of


@pytest.fixture
async def fresh_stub(start_sidecar: StartSidecar, backend: dict) -> AsyncIterator[cache_pb2_grpc.CacheServiceStub]:
    """A stub on a new sidecar that nobody has synced: memory, then Redis."""
    sidecar = await start_sidecar(synced=False, **backend)
    async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
        yield cache_pb2_grpc.CacheServiceStub(channel)


async def state(stub: cache_pb2_grpc.CacheServiceStub) -> tuple[int, bool]:
    got = await stub.GetSyncState(empty_pb2.Empty(), timeout=READ_TIMEOUT)
    return got.applied, got.fresh


async def sync(
    stub: cache_pb2_grpc.CacheServiceStub, after: int, through: int, *patterns: str, clear: bool = False
) -> tuple[int, bool]:
    request = cache_pb2.CacheSyncRequest(after=after, through=through, patterns=patterns, clear=clear)
    got = await stub.Sync(request, timeout=READ_TIMEOUT)
    return got.applied, got.fresh


async def fill(stub: cache_pb2_grpc.CacheServiceStub, key: str, version: int) -> bool:
    request = cache_pb2.CacheSetRequest(entry=cache_pb2.CacheEntry(key=key, value=b"filled", version=version), fill=True)
    return (await stub.Set(request, timeout=READ_TIMEOUT)).stored


async def found(stub: cache_pb2_grpc.CacheServiceStub, *keys: str) -> list[str]:
    got = await stub.GetMany(cache_pb2.CacheGetManyRequest(keys=keys), timeout=READ_TIMEOUT)
    return sorted(e.key for e in got.entries)


KEYS = ("agents:get:1", "agents:list:a", "workflows:get:1")


async def test_a_new_cache_is_fresh_and_takes_no_fills_until_synced(fresh_stub) -> None:
    stub = fresh_stub
    assert await state(stub) == (0, True)
    miss = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))
    assert not miss.found and miss.position == 0
    # No position: it cannot tell what a fill read at any version missed.
    for version in (0, 7, 12345):
        assert not await fill(stub, "agents:get:1", version)
    # Overwrites and invalidations from outside the log are still taken; no position moves.
    await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=[entry(key) for key in KEYS]))
    await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="workflows:*"))
    assert await found(stub, *KEYS) == ["agents:get:1", "agents:list:a"]
    assert await state(stub) == (0, True)

    # A fresh cache takes any Sync (it skips nothing it vouched for), and empties itself:
    # what it held may predate any entry of the log.
    assert await sync(stub, 3, 7, "nothing:*") == (7, False)
    assert await found(stub, *KEYS) == []
    assert (await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))).position == 7
    # The floor is the Sync's `through`: a fill read before it may have missed entries.
    assert not await fill(stub, "agents:get:1", 6)
    assert await fill(stub, "agents:get:1", 7)
    assert await found(stub, *KEYS) == ["agents:get:1"]


async def test_a_sync_applies_its_patterns_and_moves_the_position(fresh_stub) -> None:
    stub = fresh_stub
    assert await sync(stub, 0, 10) == (10, False)
    await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=[entry(key) for key in KEYS]))
    assert await sync(stub, 10, 13, "agents:list:*", "agents:get:1") == (13, False)
    assert await found(stub, *KEYS) == ["workflows:get:1"]
    assert await state(stub) == (13, False)
    # A Sync from before the position that reaches past it (two relays' ranges
    # overlap) applies its patterns and moves on.
    assert await sync(stub, 11, 15, "workflows:get:1") == (15, False)
    assert await found(stub, *KEYS) == []


async def test_a_sync_that_would_skip_entries_is_refused_with_the_position(fresh_stub) -> None:
    stub = fresh_stub
    await sync(stub, 0, 10)
    await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=[entry(key) for key in KEYS]))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await sync(stub, 11, 13, "agents:*")  # entry 11 would be skipped
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = failure_of(error.value)
    assert info.reason == "SYNC_POSITION_BEHIND"
    assert (info.metadata["applied"], info.metadata["after"]) == ("10", "11")
    assert "10" in error.value.details()
    # Nothing applied, nothing moved: the relay reads the state again and resends.
    assert await state(stub) == (10, False)
    assert await found(stub, *KEYS) == sorted(KEYS)
    assert await sync(stub, 10, 13, "agents:*") == (13, False)
    assert await found(stub, *KEYS) == ["workflows:get:1"]


async def test_a_sync_already_covered_is_a_no_op(fresh_stub) -> None:
    stub = fresh_stub
    await sync(stub, 0, 0)  # from fresh: the floor is 0
    await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=[entry(key) for key in KEYS]))
    await sync(stub, 0, 10, "other:*")
    # Another relay's Sync covered these already: neither the patterns, nor a clear,
    # nor the position (which never goes back) are applied again.
    assert await sync(stub, 3, 5, "agents:*") == (10, False)
    assert await sync(stub, 8, 10, clear=True) == (10, False)
    assert await found(stub, *KEYS) == sorted(KEYS)
    # Nor recorded: "agents:*" at 5 would refuse this fill read at 4, a clear at 10 any.
    assert await fill(stub, "agents:get:2", 4)


async def test_a_clear_sync_empties_the_cache_and_raises_the_floor(fresh_stub) -> None:
    stub = fresh_stub
    await sync(stub, 0, 10)
    miss = await stub.Get(cache_pb2.CacheGetRequest(key="workflows:get:9"))
    await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=[entry(key) for key in KEYS]))
    # The log no longer holds the entries after 10 (pruned): the cache cannot be told
    # what they invalidated, so it drops everything.
    assert await sync(stub, 10, 40, clear=True) == (40, False)
    assert await found(stub, *KEYS) == []
    assert not await fill(stub, "workflows:get:9", miss.position)  # read at 10
    assert not await fill(stub, "workflows:get:9", 39)
    assert await fill(stub, "workflows:get:9", 40)


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
        assert await state(other) == (0, True)
        await sync(one, 0, 5)
        assert await state(other) == (5, False)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await sync(other, 6, 7)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert await sync(other, 5, 7, "agents:*") == (7, False)
        assert await state(one) == (7, False)
        assert await sync(one, 5, 6, "agents:*") == (7, False)  # covered by the other's Sync
        # A fill through either is checked against what the other applied.
        await one.Set(cache_pb2.CacheSetRequest(entry=entry("agents:get:1")))
        assert not await fill(other, "agents:get:2", 6)  # read before "agents:*" at 7
        assert await fill(other, "agents:get:2", 7)
        assert await found(one, "agents:get:1", "agents:get:2") == ["agents:get:1", "agents:get:2"]


async def test_concurrent_syncs_never_move_the_redis_position_back(redis_url: str, redis_prefix: str) -> None:
    """Syncs through 1..N sent through two stores (two sidecars' connections) at once
    and in any order: each that lands keeps the larger position, so it ends at N.
    Driven on the stores with long timeouts, so a loaded machine cannot turn a slow
    reply into a switch to memory."""
    stores = [
        RedisStore(connect(redis_url, max_connections=8, timeout=5.0), default_ttl=60, layout=KeyLayout(redis_prefix))
        for _ in range(2)
    ]
    try:
        await stores[0].sync(0, 0, (), False)
        throughs = list(range(1, 201))
        random.Random(7).shuffle(throughs)
        for start in range(0, len(throughs), 40):
            batch = throughs[start : start + 40]
            states = await asyncio.gather(*(stores[t % 2].sync(0, t, [f"seq:{t}"], False) for t in batch))
            assert all(got.applied >= t for got, t in zip(states, batch))
        assert await stores[0].sync_state() == await stores[1].sync_state() == SyncState(200, False)
    finally:
        for store in stores:
            await store.close()
