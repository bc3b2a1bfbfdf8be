"""The cache sidecar over gRPC, end to end: real sidecars on ephemeral ports (memory,
and Redis under a test prefix where the behaviour is the stores' common contract),
real grpc.aio channels, and the CacheClient other services use."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator

import grpc
import pytest
from devops_hub.v1 import cache_pb2, cache_pb2_grpc
from google.protobuf import empty_pb2, wrappers_pb2

from bench.run import free_port
from services.cache_sidecar.server import CacheSidecar
from services.common.cache.client import CacheClient, protobuf_content_type
from tests.support import eventually
from tests.support.cache import (
    READ_TIMEOUT,
    STRING_TYPE,
    CountingLoader,
    StartSidecar,
    bad_fields,
    entry,
)


@pytest.fixture
async def stub(sidecar: CacheSidecar) -> AsyncIterator[cache_pb2_grpc.CacheServiceStub]:
    async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
        yield cache_pb2_grpc.CacheServiceStub(channel)


@pytest.fixture
async def either_stub(start_sidecar: StartSidecar, backend: dict) -> AsyncIterator[cache_pb2_grpc.CacheServiceStub]:
    """A stub on a memory sidecar, then on a Redis one."""
    sidecar = await start_sidecar(**backend)
    async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
        yield cache_pb2_grpc.CacheServiceStub(channel)


@pytest.fixture
async def client(sidecar: CacheSidecar) -> AsyncIterator[CacheClient]:
    async with CacheClient(sidecar.host.bound_address, timeout=2.0) as cache_client:
        yield cache_client


# --- the sidecar over gRPC --------------------------------------------------------------


async def test_get_set_round_trip(either_stub: cache_pb2_grpc.CacheServiceStub) -> None:
    stub = either_stub
    miss = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))
    assert not miss.found and miss.fill_token > 0
    stored = await stub.Set(cache_pb2.CacheSetRequest(entry=entry("agents:get:1", b"payload", STRING_TYPE)))
    assert stored.stored
    hit = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))
    assert hit.found
    assert (hit.entry.key, hit.entry.value, hit.entry.content_type) == ("agents:get:1", b"payload", STRING_TYPE)

    await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=[entry("m:1", b"1"), entry("m:2", b"2")]))
    many = await stub.GetMany(cache_pb2.CacheGetManyRequest(keys=["m:1", "m:missing", "m:2"]))
    assert {e.key: e.value for e in many.entries} == {"m:1": b"1", "m:2": b"2"}

    deleted = await stub.Delete(cache_pb2.CacheDeleteRequest(key="m:1"))
    assert deleted.deleted
    assert not (await stub.Delete(cache_pb2.CacheDeleteRequest(key="m:1"))).deleted
    cleared = await stub.Clear(empty_pb2.Empty())
    assert cleared.removed == 2
    assert not (await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))).found


async def test_short_ttl_expires_over_grpc(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    await stub.Set(cache_pb2.CacheSetRequest(entry=entry("t:short"), ttl_seconds=0.05))
    await stub.Set(cache_pb2.CacheSetRequest(entry=entry("t:long"), ttl_seconds=60))
    await asyncio.sleep(0.2)
    assert not (await stub.Get(cache_pb2.CacheGetRequest(key="t:short"))).found
    assert (await stub.Get(cache_pb2.CacheGetRequest(key="t:long"))).found
    stats = await stub.Stats(empty_pb2.Empty())
    assert stats.evictions["ttl"] == 1


async def test_lru_eviction_by_entry_count(start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar(cache_max_size=3)
    async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        for key in ("a:1", "a:2", "a:3"):
            await stub.Set(cache_pb2.CacheSetRequest(entry=entry(key)))
        assert (await stub.Get(cache_pb2.CacheGetRequest(key="a:1"))).found  # a:1 is now most recent
        await stub.Set(cache_pb2.CacheSetRequest(entry=entry("a:4")))
        found = await stub.GetMany(cache_pb2.CacheGetManyRequest(keys=["a:1", "a:2", "a:3", "a:4"]))
        assert sorted(e.key for e in found.entries) == ["a:1", "a:3", "a:4"]
        stats = await stub.Stats(empty_pb2.Empty())
        assert stats.entries == 3
        assert stats.evictions["size"] == 1 and stats.evictions["bytes"] == 0


async def test_lru_eviction_by_bytes(start_sidecar: StartSidecar) -> None:
    # Each entry costs 100 bytes (97 of value + the 3-byte key), so 3 fit in 300.
    sidecar = await start_sidecar(cache_max_bytes=300)
    async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        for key in ("b:1", "b:2", "b:3"):
            await stub.Set(cache_pb2.CacheSetRequest(entry=entry(key, b"x" * 97)))
        await stub.Get(cache_pb2.CacheGetRequest(key="b:1"))
        await stub.Set(cache_pb2.CacheSetRequest(entry=entry("b:4", b"x" * 197)))  # needs two slots
        found = await stub.GetMany(cache_pb2.CacheGetManyRequest(keys=["b:1", "b:2", "b:3", "b:4"]))
        assert sorted(e.key for e in found.entries) == ["b:1", "b:4"]
        stats = await stub.Stats(empty_pb2.Empty())
        assert stats.bytes == 300
        assert stats.evictions["bytes"] == 2 and stats.evictions["size"] == 0

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Set(cache_pb2.CacheSetRequest(entry=entry("b:5", b"x" * 301)))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(refused.value) == ["entry.value"]
        assert (await stub.Stats(empty_pb2.Empty())).entries == 2  # nothing was evicted for it


async def test_prefix_and_glob_invalidation(either_stub: cache_pb2_grpc.CacheServiceStub, backend: dict) -> None:
    stub = either_stub
    keys = ["agents:list:p1", "agents:list:p2", "agents:get:a1", "agents:get:b1", "agents:get:a12", "workflows:list:p1"]
    await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=[entry(key) for key in keys]))

    removed = await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="agents:list:*"))
    # O(1) in both stores; Redis (generation counters) cannot tell how many went.
    assert removed.removed == (-1 if backend else 2)
    removed = await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="agents:get:a?"))
    assert removed.removed == 1

    left = await stub.GetMany(cache_pb2.CacheGetManyRequest(keys=keys))
    assert sorted(e.key for e in left.entries) == ["agents:get:a12", "agents:get:b1", "workflows:list:p1"]

    removed = await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="*:*:[ab]1*"))
    assert removed.removed == 2
    left = await stub.GetMany(cache_pb2.CacheGetManyRequest(keys=keys))
    assert [e.key for e in left.entries] == ["workflows:list:p1"]


async def test_ten_thousand_keys_invalidated_by_one_glob(start_sidecar: StartSidecar, backend: dict) -> None:
    sidecar = await start_sidecar(cache_max_size=30_000, **backend)
    async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        doomed = [f"bulk:{i}:a" for i in range(10_000)]
        kept = [f"bulk:{i}:b" for i in range(10_000)]
        for start in range(0, 10_000, 1000):
            batch = [entry(key) for key in doomed[start : start + 1000] + kept[start : start + 1000]]
            for half in (batch[:1000], batch[1000:]):
                response = await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=half))
                assert response.stored == 1000

        removed = await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="bulk:*:a"))
        assert removed.removed == 10_000

        async def found(keys: list[str]) -> int:
            total = 0
            for start in range(0, len(keys), 1000):
                response = await stub.GetMany(cache_pb2.CacheGetManyRequest(keys=keys[start : start + 1000]))
                total += len(response.entries)
            return total

        assert await found(doomed) == 0
        assert await found(kept) == 10_000

        removed = await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="bulk:*"))
        assert removed.removed == (-1 if backend else 10_000)
        assert await found(kept) == 0
        if not backend:
            stats = await stub.Stats(empty_pb2.Empty())
            assert stats.entries == 0 and stats.bytes == 0


async def test_one_call_invalidates_many_patterns(either_stub: cache_pb2_grpc.CacheServiceStub) -> None:
    """What one write made stale travels in one call, and each pattern is streamed."""
    stub = either_stub
    keys = [f"agents:get:{i}" for i in range(5)] + ["agents:list:p1", "workflows:get:1"]
    await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=[entry(key) for key in keys]))
    watch = stub.Watch(cache_pb2.CacheWatchRequest(prefixes=["agents:"]))
    assert (await asyncio.wait_for(watch.read(), READ_TIMEOUT)).pattern == ""
    patterns = ["agents:get:0", "agents:get:1", "agents:list:*"]
    await stub.Invalidate(cache_pb2.CacheInvalidateRequest(patterns=patterns))
    streamed = await asyncio.wait_for(watch.read(), READ_TIMEOUT)
    assert [streamed.pattern, *streamed.patterns] == patterns  # one message for the lot
    watch.cancel()
    left = await stub.GetMany(cache_pb2.CacheGetManyRequest(keys=keys))
    assert sorted(e.key for e in left.entries) == ["agents:get:2", "agents:get:3", "agents:get:4", "workflows:get:1"]


async def test_stats_count_what_happened(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    await stub.Set(cache_pb2.CacheSetRequest(entry=entry("agents:get:1", b"12345", "ct")))
    await stub.Set(cache_pb2.CacheSetRequest(entry=entry("workflows:get:1", b"1")))
    for _ in range(3):
        await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))
    await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:2"))
    await stub.Get(cache_pb2.CacheGetRequest(key="workflows:get:2"))
    await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="nothing:*"))
    await stub.Delete(cache_pb2.CacheDeleteRequest(key="nothing:1"))

    stats = await stub.Stats(empty_pb2.Empty())
    assert (stats.hits, stats.misses, stats.sets, stats.invalidations) == (3, 2, 2, 2)
    assert stats.hit_rate == pytest.approx(0.6)
    assert stats.entries == 2
    assert stats.bytes == (5 + len("agents:get:1") + 2) + (1 + len("workflows:get:1"))
    assert stats.backend == "memory"
    assert dict(stats.evictions) == {"size": 0, "bytes": 0, "ttl": 0}
    agents, workflows = stats.namespaces["agents"], stats.namespaces["workflows"]
    assert (agents.hits, agents.misses, agents.hit_rate) == (3, 1, pytest.approx(0.75))
    assert (workflows.hits, workflows.misses, workflows.hit_rate) == (0, 1, 0.0)


@pytest.mark.parametrize(
    "racing_write",
    [
        lambda stub: stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="agents:*")),
        lambda stub: stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="agents:get:?")),
        lambda stub: stub.Delete(cache_pb2.CacheDeleteRequest(key="agents:get:1")),
        lambda stub: stub.Clear(empty_pb2.Empty()),
    ],
    ids=["prefix", "glob", "delete", "clear"],
)
async def test_fill_that_raced_an_invalidation_is_dropped(either_stub: cache_pb2_grpc.CacheServiceStub, racing_write) -> None:
    """The stale-fill race, on both stores: miss → (load old) → write + invalidate → fill."""
    stub = either_stub
    miss = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))
    assert not miss.found
    await racing_write(stub)  # the write that made the loaded value stale
    fill = await stub.Set(cache_pb2.CacheSetRequest(entry=entry("agents:get:1", b"stale"), fill_token=miss.fill_token))
    assert not fill.stored
    assert not (await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))).found


async def test_fill_after_an_unrelated_invalidation_lands(either_stub: cache_pb2_grpc.CacheServiceStub) -> None:
    stub = either_stub
    miss = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))
    await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="workflows:*"))
    await stub.Delete(cache_pb2.CacheDeleteRequest(key="agents:get:2"))
    fill = await stub.Set(cache_pb2.CacheSetRequest(entry=entry("agents:get:1", b"fresh"), fill_token=miss.fill_token))
    assert fill.stored
    assert (await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))).entry.value == b"fresh"


BAD_REQUESTS = [
    ("Get", lambda: cache_pb2.CacheGetRequest(key=""), ["key"]),
    ("Get", lambda: cache_pb2.CacheGetRequest(key="k" * 1025), ["key"]),
    ("GetMany", lambda: cache_pb2.CacheGetManyRequest(keys=[f"k:{i}" for i in range(1001)]), ["keys"]),
    ("GetMany", lambda: cache_pb2.CacheGetManyRequest(keys=["k:1", ""]), ["keys[1]"]),
    ("Set", lambda: cache_pb2.CacheSetRequest(entry=entry("k:1"), ttl_seconds=-1), ["ttl_seconds"]),
    ("Set", lambda: cache_pb2.CacheSetRequest(entry=entry("k:1"), ttl_seconds=math.nan), ["ttl_seconds"]),
    ("Set", lambda: cache_pb2.CacheSetRequest(), ["entry"]),
    ("Set", lambda: cache_pb2.CacheSetRequest(entry=entry("")), ["entry.key"]),
    ("Set", lambda: cache_pb2.CacheSetRequest(entry=entry("k:1", b"x" * (4 * 1024 * 1024 + 1))), ["entry.value"]),
    ("Set", lambda: cache_pb2.CacheSetRequest(entry=entry("", content_type="t" * 300), ttl_seconds=-2),
     ["ttl_seconds", "entry.key", "entry.content_type"]),
    ("SetMany", lambda: cache_pb2.CacheSetManyRequest(entries=[entry(f"k:{i}") for i in range(1001)]), ["entries"]),
    ("SetMany", lambda: cache_pb2.CacheSetManyRequest(entries=[entry("k:1"), entry("")]), ["entries[1].key"]),
    ("Delete", lambda: cache_pb2.CacheDeleteRequest(key=""), ["key"]),
    ("Invalidate", lambda: cache_pb2.CacheInvalidateRequest(pattern=""), ["pattern"]),
    ("Invalidate", lambda: cache_pb2.CacheInvalidateRequest(patterns=["a:*", "", ":x"]), ["patterns[1]", "patterns[2]"]),
    ("Invalidate", lambda: cache_pb2.CacheInvalidateRequest(patterns=[f"p:{i}" for i in range(1001)]), ["patterns"]),
    ("Invalidate", lambda: cache_pb2.CacheInvalidateRequest(pattern="a:*", sequence=2**53), ["sequence"]),
    ("Sync", lambda: cache_pb2.CacheSyncRequest(after=5, through=4), ["through"]),
    ("Sync", lambda: cache_pb2.CacheSyncRequest(through=1, patterns=["a:*", ""]), ["patterns[1]"]),
    ("Sync", lambda: cache_pb2.CacheSyncRequest(through=1, patterns=[f"p:{i}" for i in range(1001)]), ["patterns"]),
    ("Sync", lambda: cache_pb2.CacheSyncRequest(after=2**60, through=2**60), ["after", "through"]),
]


@pytest.mark.parametrize(("method", "make_request", "fields"), BAD_REQUESTS)
async def test_bad_input_is_invalid_argument_naming_the_field(
    stub: cache_pb2_grpc.CacheServiceStub, method: str, make_request, fields: list[str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await getattr(stub, method)(make_request())
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(error.value) == fields


async def test_bad_batches_store_nothing(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=[entry("k:1"), entry("")]))
    assert (await stub.Stats(empty_pb2.Empty())).entries == 0


async def test_watch_with_too_many_prefixes_is_refused(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    call = stub.Watch(cache_pb2.CacheWatchRequest(prefixes=[f"p{i}:" for i in range(101)]))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await asyncio.wait_for(call.read(), READ_TIMEOUT)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(error.value) == ["prefixes"]


# --- Watch -------------------------------------------------------------------------------


async def test_watch_streams_matching_invalidations_in_order(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    call = stub.Watch(cache_pb2.CacheWatchRequest(prefixes=["agents:"]))
    subscribed = await asyncio.wait_for(call.read(), READ_TIMEOUT)
    assert subscribed.pattern == ""  # the stream opens with a heartbeat

    await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="agents:list:*"))
    await stub.Delete(cache_pb2.CacheDeleteRequest(key="workflows:get:1"))  # filtered out
    await stub.Delete(cache_pb2.CacheDeleteRequest(key="agents:get:7"))
    await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="workflows:*"))  # filtered out
    await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="*:get:*"))  # may touch agents:
    await stub.Clear(empty_pb2.Empty())

    received = [await asyncio.wait_for(call.read(), READ_TIMEOUT) for _ in range(4)]
    assert [message.pattern for message in received] == ["agents:list:*", "agents:get:7", "*:get:*", "*"]
    # The stream's own message count: the filtered-out invalidations leave no gap.
    assert [subscribed.sequence] + [message.sequence for message in received] == [1, 2, 3, 4, 5]
    call.cancel()


async def test_watch_sends_heartbeats_when_idle(start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar(heartbeat_interval=0.05)
    async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
        call = cache_pb2_grpc.CacheServiceStub(channel).Watch(cache_pb2.CacheWatchRequest())
        first = await asyncio.wait_for(call.read(), READ_TIMEOUT)
        second = await asyncio.wait_for(call.read(), READ_TIMEOUT)
        assert (first.pattern, second.pattern) == ("", "")
        assert (first.sequence, second.sequence) == (1, 2)
        call.cancel()
    await eventually(lambda: len(sidecar.hub) == 0)  # the cancelled watcher unsubscribed


async def test_slow_watcher_is_cut_off_without_blocking_writers(start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar(watch_queue_size=8)
    async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        call = stub.Watch(cache_pb2.CacheWatchRequest())
        await asyncio.wait_for(call.read(), READ_TIMEOUT)
        assert len(sidecar.hub) == 1
        # Writes arriving faster than the stream can send: without yielding to the
        # loop the stream cannot drain, and the writers must still not wait.
        for i in range(50):
            sidecar.hub.publish(f"burst:{i}:*")
        assert len(sidecar.hub) == 0

        received = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                received.append(await asyncio.wait_for(call.read(), READ_TIMEOUT))
        assert ended.value.code() == grpc.StatusCode.ABORTED
        assert len(received) < 50
        # The sidecar keeps serving everyone else.
        assert (await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="burst:*"))).removed == 0


async def test_shutdown_ends_watch_streams(sidecar: CacheSidecar, stub: cache_pb2_grpc.CacheServiceStub) -> None:
    call = stub.Watch(cache_pb2.CacheWatchRequest())
    await asyncio.wait_for(call.read(), READ_TIMEOUT)
    await sidecar.close()
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(call.read(), READ_TIMEOUT)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE


# --- CacheClient -------------------------------------------------------------------------


async def test_client_loads_on_miss_and_reads_the_sidecar_on_hit(
    client: CacheClient, stub: cache_pb2_grpc.CacheServiceStub, sidecar: CacheSidecar
) -> None:
    loader = CountingLoader("v1")
    first = await client.get_or_load("demo:1", 60, wrappers_pb2.StringValue, loader)
    second = await client.get_or_load("demo:1", 60, wrappers_pb2.StringValue, loader)
    assert first.value == second.value == "v1"
    assert loader.calls == 1

    stored = await stub.Get(cache_pb2.CacheGetRequest(key="demo:1"))
    assert stored.entry.content_type == STRING_TYPE
    assert wrappers_pb2.StringValue.FromString(stored.entry.value).value == "v1"

    # Another process (another client) sees the same entry.
    async with CacheClient(sidecar.host.bound_address, timeout=2.0) as other:
        shared = await other.get_or_load("demo:1", 60, wrappers_pb2.StringValue, CountingLoader("other"))
    assert shared.value == "v1"


async def test_client_invalidate_and_delete_force_a_reload(client: CacheClient) -> None:
    await client.get_or_load("demo:1", 60, wrappers_pb2.StringValue, CountingLoader("v1"))
    await client.get_or_load("demo:2", 60, wrappers_pb2.StringValue, CountingLoader("v1"))
    assert await client.invalidate("demo:1") is True
    assert await client.delete("demo:2") is True
    reload_1, reload_2 = CountingLoader("v2"), CountingLoader("v2")
    assert (await client.get_or_load("demo:1", 60, wrappers_pb2.StringValue, reload_1)).value == "v2"
    assert (await client.get_or_load("demo:2", 60, wrappers_pb2.StringValue, reload_2)).value == "v2"
    assert reload_1.calls == reload_2.calls == 1
    stats = await client.stats()
    assert stats is not None and stats.invalidations == 2 and stats.sets == 4


async def test_client_treats_another_message_type_as_a_miss(
    client: CacheClient, stub: cache_pb2_grpc.CacheServiceStub
) -> None:
    other = wrappers_pb2.Int64Value(value=7).SerializeToString()
    await stub.Set(cache_pb2.CacheSetRequest(entry=entry("demo:1", other, protobuf_content_type("google.protobuf.Int64Value"))))
    loader = CountingLoader("text")
    value = await client.get_or_load("demo:1", 60, wrappers_pb2.StringValue, loader)
    assert value.value == "text" and loader.calls == 1
    replaced = await stub.Get(cache_pb2.CacheGetRequest(key="demo:1"))
    assert replaced.entry.content_type == STRING_TYPE


async def test_thousand_concurrent_misses_load_once(client: CacheClient) -> None:
    loader = CountingLoader("shared", hold=True)
    callers = [
        asyncio.create_task(client.get_or_load("hot:1", 60, wrappers_pb2.StringValue, loader)) for _ in range(1000)
    ]
    await asyncio.wait_for(loader.started.wait(), READ_TIMEOUT)
    loader.release.set()
    results = await asyncio.gather(*callers)
    assert loader.calls == 1
    assert {result.value for result in results} == {"shared"}
    stats = await client.stats()
    assert stats is not None and (stats.misses, stats.sets) == (1, 1)


async def test_cancelled_caller_does_not_cancel_the_shared_load(
    client: CacheClient, stub: cache_pb2_grpc.CacheServiceStub
) -> None:
    loader = CountingLoader("shared", hold=True)
    callers = [
        asyncio.create_task(client.get_or_load("hot:1", 60, wrappers_pb2.StringValue, loader)) for _ in range(3)
    ]
    await asyncio.wait_for(loader.started.wait(), READ_TIMEOUT)
    callers[0].cancel()
    await asyncio.sleep(0.01)
    assert callers[0].cancelled()
    assert not callers[1].done() and not callers[2].done()
    loader.release.set()
    assert [(await caller).value for caller in callers[1:]] == ["shared", "shared"]
    assert loader.calls == 1 and loader.finished
    # The load also completed its fill for later readers.
    assert (await stub.Get(cache_pb2.CacheGetRequest(key="hot:1"))).found


async def test_loader_errors_reach_every_waiter_and_are_not_cached(client: CacheClient) -> None:
    attempts = 0
    gate = asyncio.Event()

    async def failing() -> wrappers_pb2.StringValue:
        nonlocal attempts
        attempts += 1
        await gate.wait()
        raise LookupError("agent 1 not found")

    callers = [
        asyncio.create_task(client.get_or_load("agents:get:1", 60, wrappers_pb2.StringValue, failing)) for _ in range(5)
    ]
    await asyncio.sleep(0.05)
    gate.set()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert attempts == 1
    assert all(isinstance(outcome, LookupError) for outcome in outcomes)
    value = await client.get_or_load("agents:get:1", 60, wrappers_pb2.StringValue, CountingLoader("found"))
    assert value.value == "found"


async def test_client_serves_from_the_loader_when_the_sidecar_is_down(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="services.common.cache.client")
    async with CacheClient(f"127.0.0.1:{free_port()}", timeout=0.5, retry_after=0.0) as down:
        loader = CountingLoader("from the database")
        results = [await down.get_or_load("agents:get:1", 60, wrappers_pb2.StringValue, loader) for _ in range(5)]
        assert [result.value for result in results] == ["from the database"] * 5
        assert loader.calls == 5
        assert await down.stats() is None
        assert await down.delete("agents:get:1") is False
        assert down.pending_invalidations == {"agents:get:1"}
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING and "failed" in record.message]
    assert len(warnings) == 1  # rate-limited: one report, not one per request


async def test_failed_invalidation_is_retried_once_the_sidecar_is_reachable(start_sidecar: StartSidecar) -> None:
    port = free_port()
    async with CacheClient(f"127.0.0.1:{port}", timeout=0.5, retry_after=0.05) as client:
        assert await client.invalidate("agents:*") is False
        assert client.pending_invalidations == {"agents:*"}

        # The sidecar was alive all along (say, behind a network blip) and holds stale data.
        sidecar = await start_sidecar(cache_addr=f"127.0.0.1:{port}")
        sidecar.memory.set("agents:get:1", b"stale", STRING_TYPE)

        await eventually(lambda: not client.pending_invalidations)
        assert sidecar.memory.get("agents:get:1") is None
        assert sidecar.memory.stats().invalidations == 1


async def test_keys_with_a_pending_invalidation_bypass_the_cache(
    sidecar: CacheSidecar, client: CacheClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = wrappers_pb2.StringValue(value="stale").SerializeToString()
    sidecar.memory.set("agents:get:1", stale, STRING_TYPE)
    sidecar.memory.set("workflows:get:1", stale, STRING_TYPE)
    apply_invalidation = sidecar.store.invalidate_many

    async def broken(patterns: list[str], sequence: int = 0) -> int:
        raise RuntimeError("store failure")

    monkeypatch.setattr(sidecar.store, "invalidate_many", broken)
    assert await client.invalidate("agents:*") is False  # INTERNAL: queued for retry

    # The sidecar still answers reads and still holds the stale entry, but this
    # process neither reads nor fills keys that its pending invalidation covers.
    loader = CountingLoader("fresh")
    assert (await client.get_or_load("agents:get:1", 60, wrappers_pb2.StringValue, loader)).value == "fresh"
    assert loader.calls == 1
    assert sidecar.memory.get("agents:get:1").value == stale
    # Other keys are still served from the cache.
    unrelated = await client.get_or_load("workflows:get:1", 60, wrappers_pb2.StringValue, CountingLoader())
    assert unrelated.value == "stale"

    monkeypatch.setattr(sidecar.store, "invalidate_many", apply_invalidation)
    await eventually(lambda: not client.pending_invalidations)
    assert sidecar.memory.get("agents:get:1") is None


@pytest.mark.fast
async def test_client_rejects_programming_errors() -> None:
    client = CacheClient("127.0.0.1:1", timeout=0.1)
    with pytest.raises(ValueError):
        await client.get_or_load("k:1", -1, wrappers_pb2.StringValue, CountingLoader())
    with pytest.raises(ValueError):
        await client.invalidate("")
    await client.close()
