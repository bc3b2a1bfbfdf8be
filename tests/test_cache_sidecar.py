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

from devstack.ports import free_port
from services.cache.client.client import CacheClient
from services.cache.client.codecs import protobuf_content_type
from services.cache.sidecar.server import CacheSidecar
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
    assert not miss.found and miss.position == 0  # synced to the empty log: position 0
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

    async def short_gone() -> bool:
        return not (await stub.Get(cache_pb2.CacheGetRequest(key="t:short"))).found

    await eventually(short_gone, "the 0.05 s entry expires")
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


async def test_prefix_and_glob_invalidation(either_stub: cache_pb2_grpc.CacheServiceStub) -> None:
    stub = either_stub
    keys = ["agents:list:p1", "agents:list:p2", "agents:get:a1", "agents:get:b1", "agents:get:a12", "workflows:list:p1"]
    await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=[entry(key) for key in keys]))

    removed = await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="agents:list:*"))
    # From outside the log, Redis removes the matches themselves (SCAN + UNLINK), so it
    # can count them; memory detaches the prefix in O(1) (test_cache_memory_store.py).
    assert removed.removed == 2
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
        assert removed.removed == 10_000
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
    assert list((await asyncio.wait_for(watch.read(), READ_TIMEOUT)).patterns) == []  # subscribed
    patterns = ["agents:get:0", "agents:get:1", "agents:list:*"]
    await stub.Invalidate(cache_pb2.CacheInvalidateRequest(patterns=patterns))
    streamed = await asyncio.wait_for(watch.read(), READ_TIMEOUT)
    assert list(streamed.patterns) == patterns  # one message for the lot
    assert streamed.after == streamed.through == 0  # from outside the log: at the position
    watch.cancel()
    left = await stub.GetMany(cache_pb2.CacheGetManyRequest(keys=keys))
    assert sorted(e.key for e in left.entries) == ["agents:get:2", "agents:get:3", "agents:get:4", "workflows:get:1"]


async def test_stats_count_what_happened(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    # The fixture's first Sync emptied the new store (a clear): counted before this.
    before = await stub.Stats(empty_pb2.Empty())
    await stub.Set(cache_pb2.CacheSetRequest(entry=entry("agents:get:1", b"12345", "ct")))
    await stub.Set(cache_pb2.CacheSetRequest(entry=entry("workflows:get:1", b"1")))
    for _ in range(3):
        await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))
    await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:2"))
    await stub.Get(cache_pb2.CacheGetRequest(key="workflows:get:2"))
    await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="nothing:*"))
    await stub.Delete(cache_pb2.CacheDeleteRequest(key="nothing:1"))

    stats = await stub.Stats(empty_pb2.Empty())
    assert (stats.hits, stats.misses, stats.sets, stats.invalidations - before.invalidations) == (3, 2, 2, 2)
    assert stats.hit_rate == pytest.approx(0.6)
    assert stats.entries == 2
    assert stats.bytes == (5 + len("agents:get:1") + 2) + (1 + len("workflows:get:1"))
    assert stats.backend == "memory"
    assert dict(stats.evictions) == {"size": 0, "bytes": 0, "ttl": 0}
    agents, workflows = stats.namespaces["agents"], stats.namespaces["workflows"]
    assert (agents.hits, agents.misses, agents.hit_rate) == (3, 1, pytest.approx(0.75))
    assert (workflows.hits, workflows.misses, workflows.hit_rate) == (0, 1, 0.0)


async def sync(stub: cache_pb2_grpc.CacheServiceStub, after: int, through: int, *patterns: str, clear: bool = False):
    """What a services' relay sends: the log's entries in (after, through]."""
    request = cache_pb2.CacheSyncRequest(after=after, through=through, patterns=patterns, clear=clear)
    return await stub.Sync(request, timeout=READ_TIMEOUT)


def fill(key: str, value: bytes, version: int) -> cache_pb2.CacheSetRequest:
    """A client's fill of a miss, read at `version` (the position the Get answered)."""
    return cache_pb2.CacheSetRequest(entry=cache_pb2.CacheEntry(key=key, value=value, version=version), fill=True)


@pytest.mark.parametrize(
    ("patterns", "clear"),
    [(["agents:*"], False), (["agents:get:?"], False), (["agents:get:1"], False), (["*:get:1"], False), ([], True)],
    ids=["prefix", "glob", "exact", "glob-without-namespace", "clear"],
)
async def test_a_fill_read_before_a_write_in_the_log_is_refused(
    either_stub: cache_pb2_grpc.CacheServiceStub, patterns: list[str], clear: bool
) -> None:
    """The stale-fill race, on both stores: miss at position p → (load old) → the
    write's invalidation reaches the cache at p + 1 → the fill, read at p, is refused."""
    stub = either_stub
    miss = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))
    assert not miss.found
    await sync(stub, miss.position, miss.position + 1, *patterns, clear=clear)
    assert not (await stub.Set(fill("agents:get:1", b"stale", miss.position))).stored
    assert not (await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))).found
    # A load that began after the write (read at the new position) lands.
    again = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))
    assert again.position == miss.position + 1
    assert (await stub.Set(fill("agents:get:1", b"new", again.position))).stored
    hit = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))
    assert (hit.entry.value, hit.entry.version) == (b"new", again.position)


@pytest.mark.parametrize(
    "outside_write",
    [
        lambda stub: stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="agents:*")),
        lambda stub: stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="agents:get:?")),
        lambda stub: stub.Delete(cache_pb2.CacheDeleteRequest(key="agents:get:1")),
        lambda stub: stub.Clear(empty_pb2.Empty()),
    ],
    ids=["prefix", "glob", "delete", "clear"],
)
async def test_a_fill_read_before_an_invalidation_from_outside_the_log_is_refused(
    either_stub: cache_pb2_grpc.CacheServiceStub, outside_write
) -> None:
    """An operator's invalidation is recorded at the cache's current position: a fill
    read before that position is refused."""
    stub = either_stub
    miss = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))
    await sync(stub, miss.position, miss.position + 2, "workflows:*")  # the log moves on
    await outside_write(stub)  # recorded at miss.position + 2
    assert not (await stub.Set(fill("agents:get:1", b"stale", miss.position))).stored
    assert not (await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))).found


async def test_a_fill_after_unrelated_invalidations_lands(either_stub: cache_pb2_grpc.CacheServiceStub) -> None:
    stub = either_stub
    await stub.Set(cache_pb2.CacheSetRequest(entry=entry("agents:get:0")))  # the namespace is in use
    miss = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))
    await sync(stub, miss.position, miss.position + 1, "workflows:*", "agents:get:2", "agents:list:*")
    await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="workflows:*"))
    await stub.Delete(cache_pb2.CacheDeleteRequest(key="agents:get:2"))
    assert (await stub.Set(fill("agents:get:1", b"fresh", miss.position))).stored
    assert (await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))).entry.value == b"fresh"


async def test_a_fill_is_refused_when_the_key_holds_a_newer_version(either_stub: cache_pb2_grpc.CacheServiceStub) -> None:
    stub = either_stub
    await sync(stub, 0, 8, "workflows:*")
    assert (await stub.Set(fill("agents:get:1", b"read at 8", 8))).stored
    assert not (await stub.Set(fill("agents:get:1", b"read at 5", 5))).stored  # a slower load of older data
    hit = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))
    assert (hit.entry.value, hit.entry.version) == (b"read at 8", 8)
    # An overwrite (not a fill) is stored at the position, whatever the key holds.
    assert (await stub.Set(cache_pb2.CacheSetRequest(entry=entry("agents:get:1", b"overwritten")))).stored
    hit = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))
    assert (hit.entry.value, hit.entry.version) == (b"overwritten", 8)


async def test_a_fresh_cache_refuses_fills_but_stores_overwrites(start_sidecar: StartSidecar, backend: dict) -> None:
    sidecar = await start_sidecar(synced=False, **backend)
    async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        miss = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))
        assert not miss.found and miss.position == 0
        for version in (0, 1, 12345):  # no position: it cannot tell what any version missed
            assert not (await stub.Set(fill("agents:get:1", b"v", version))).stored
        assert (await stub.Set(cache_pb2.CacheSetRequest(entry=entry("agents:get:2")))).stored
        assert (await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=[entry("agents:get:3")]))).stored == 1
        assert len((await stub.GetMany(cache_pb2.CacheGetManyRequest(keys=["agents:get:2", "agents:get:3"]))).entries) == 2


async def test_overwrites_are_stored_whatever_the_position(either_stub: cache_pb2_grpc.CacheServiceStub) -> None:
    """Set and SetMany without fill store unconditionally, at the cache's position:
    also once a clear raised the floor above 0."""
    stub = either_stub
    await sync(stub, 0, 7, clear=True)
    assert (await stub.Set(cache_pb2.CacheSetRequest(entry=entry("agents:get:1")))).stored
    many = await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=[entry("agents:get:2"), entry("agents:get:3")]))
    assert many.stored == 2
    found = await stub.GetMany(cache_pb2.CacheGetManyRequest(keys=["agents:get:1", "agents:get:2", "agents:get:3"]))
    assert [(e.key, e.version) for e in found.entries] == [("agents:get:1", 7), ("agents:get:2", 7), ("agents:get:3", 7)]


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
    ("Set", lambda: cache_pb2.CacheSetRequest(entry=cache_pb2.CacheEntry(key="k:1", version=2**53), fill=True),
     ["entry.version"]),
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


def span(message: cache_pb2.CacheInvalidation) -> tuple[int, int, list[str]]:
    return message.after, message.through, list(message.patterns)


async def changes(call, count: int) -> list[tuple[int, int, list[str]]]:
    """The next `count` messages with patterns, skipping heartbeats (a slow machine may
    let one in between any two)."""
    received: list[tuple[int, int, list[str]]] = []
    while len(received) < count:
        message = await asyncio.wait_for(call.read(), READ_TIMEOUT)
        if message.patterns:
            received.append(span(message))
    return received


async def test_watch_streams_matching_invalidations_in_order(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    await sync(stub, 0, 2, "workflows:*")
    call = stub.Watch(cache_pb2.CacheWatchRequest(prefixes=["agents:"]))
    subscribed = await asyncio.wait_for(call.read(), READ_TIMEOUT)
    assert span(subscribed) == (2, 2, [])  # the stream opens with a heartbeat at the position

    await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="agents:list:*"))
    await stub.Delete(cache_pb2.CacheDeleteRequest(key="workflows:get:1"))  # filtered out
    # A span of the log reaches every stream, even one whose prefixes it does not
    # touch: the follower must learn the new position, or it would see a gap later.
    await sync(stub, 2, 5, "workflows:*")
    await stub.Delete(cache_pb2.CacheDeleteRequest(key="agents:get:7"))
    await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="workflows:*"))  # filtered out
    await sync(stub, 5, 6, "agents:get:1", "agents:list:*")
    await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="*:get:*"))  # may touch agents:
    await stub.Clear(empty_pb2.Empty())

    assert await changes(call, 6) == [
        (2, 2, ["agents:list:*"]),  # from outside the log: after == through == the position
        (2, 5, ["workflows:*"]),
        (5, 5, ["agents:get:7"]),
        (5, 6, ["agents:get:1", "agents:list:*"]),
        (6, 6, ["*:get:*"]),
        (6, 6, ["*"]),
    ]
    call.cancel()


async def test_a_sync_that_moves_nothing_streams_nothing(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    await sync(stub, 0, 4, "agents:*")
    call = stub.Watch(cache_pb2.CacheWatchRequest())
    assert span(await asyncio.wait_for(call.read(), READ_TIMEOUT)) == (4, 4, [])
    await sync(stub, 2, 3, "agents:get:1")  # another relay's Sync covered it already
    await stub.Delete(cache_pb2.CacheDeleteRequest(key="agents:get:9"))  # a marker after it
    assert await changes(call, 1) == [(4, 4, ["agents:get:9"])]
    call.cancel()


async def test_a_sync_of_a_fresh_cache_streams_a_clear(start_sidecar: StartSidecar, backend: dict) -> None:
    """A fresh cache vouched for nothing: its followers must drop everything too."""
    sidecar = await start_sidecar(synced=False, **backend)
    async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        call = stub.Watch(cache_pb2.CacheWatchRequest(prefixes=["agents:"]))
        assert span(await asyncio.wait_for(call.read(), READ_TIMEOUT)) == (0, 0, [])
        await sync(stub, 3, 9, "workflows:get:1")
        await sync(stub, 9, 12, clear=True)  # the log was pruned past the position
        assert await changes(call, 2) == [(3, 9, ["*"]), (9, 12, ["*"])]
        call.cancel()


def watchers(sidecar: CacheSidecar) -> int:
    return len(sidecar.hub._watchers)


async def test_watch_sends_heartbeats_at_the_position_when_idle(start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("services.cache.sidecar.servicer.HEARTBEAT_SECONDS", 0.05)
    sidecar = await start_sidecar()
    async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        await sync(stub, 0, 5)
        call = stub.Watch(cache_pb2.CacheWatchRequest())
        first = await asyncio.wait_for(call.read(), READ_TIMEOUT)
        second = await asyncio.wait_for(call.read(), READ_TIMEOUT)
        assert (span(first), span(second)) == ((5, 5, []), (5, 5, []))
        await sync(stub, 5, 9, "agents:*")
        assert await changes(call, 1) == [(5, 9, ["agents:*"])]
        assert span(await asyncio.wait_for(call.read(), READ_TIMEOUT)) == (9, 9, [])  # at the new position
        call.cancel()
    await eventually(lambda: watchers(sidecar) == 0)  # the cancelled watcher unsubscribed


async def test_slow_watcher_is_cut_off_without_blocking_writers(start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("services.cache.sidecar.hub.WATCH_QUEUE", 8)
    sidecar = await start_sidecar()
    async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        call = stub.Watch(cache_pb2.CacheWatchRequest())
        await asyncio.wait_for(call.read(), READ_TIMEOUT)
        assert watchers(sidecar) == 1
        # Writes arriving faster than the stream can send: without yielding to the
        # loop the stream cannot drain, and the writers must still not wait.
        for i in range(50):
            sidecar.hub.publish(i, i + 1, [f"burst:{i}:*"])
        assert watchers(sidecar) == 0

        received = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                received.append(await asyncio.wait_for(call.read(), READ_TIMEOUT))
        assert ended.value.code() == grpc.StatusCode.ABORTED
        assert len(received) < 50
        # What it did get is in order, without a gap: the cut is the stream's end.
        spans = [(message.after, message.through) for message in received if message.patterns]
        assert spans == [(i, i + 1) for i in range(len(spans))]
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
    before = await client.stats()
    assert before is not None
    await client.get_or_load("demo:1", 60, wrappers_pb2.StringValue, CountingLoader("v1"))
    await client.get_or_load("demo:2", 60, wrappers_pb2.StringValue, CountingLoader("v1"))
    assert await client.invalidate("demo:1") is True
    assert await client.delete("demo:2") is True
    reload_1, reload_2 = CountingLoader("v2"), CountingLoader("v2")
    assert (await client.get_or_load("demo:1", 60, wrappers_pb2.StringValue, reload_1)).value == "v2"
    assert (await client.get_or_load("demo:2", 60, wrappers_pb2.StringValue, reload_2)).value == "v2"
    assert reload_1.calls == reload_2.calls == 1
    stats = await client.stats()
    assert stats is not None and stats.invalidations - before.invalidations == 2 and stats.sets == 4


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
    await asyncio.wait({callers[0]})
    assert callers[0].cancelled()
    assert not callers[1].done() and not callers[2].done()
    loader.release.set()
    assert [(await caller).value for caller in callers[1:]] == ["shared", "shared"]
    assert loader.calls == 1 and loader.finished
    # The load also completed its fill for later readers.
    assert (await stub.Get(cache_pb2.CacheGetRequest(key="hot:1"))).found


async def test_loader_errors_reach_every_waiter_and_are_not_cached(client: CacheClient) -> None:
    attempts = 0
    started, gate = asyncio.Event(), asyncio.Event()

    async def failing() -> wrappers_pb2.StringValue:
        nonlocal attempts
        attempts += 1
        started.set()
        await gate.wait()
        raise LookupError("agent 1 not found")

    callers = [
        asyncio.create_task(client.get_or_load("agents:get:1", 60, wrappers_pb2.StringValue, failing)) for _ in range(5)
    ]
    # Every caller joined before the load began: they all ran up to their first wait
    # in the loop step that started them, and the load starts after a Get round trip.
    await asyncio.wait_for(started.wait(), READ_TIMEOUT)
    gate.set()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert attempts == 1
    assert all(isinstance(outcome, LookupError) for outcome in outcomes)
    value = await client.get_or_load("agents:get:1", 60, wrappers_pb2.StringValue, CountingLoader("found"))
    assert value.value == "found"


async def test_client_serves_from_the_loader_when_the_sidecar_is_down(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="services.cache.client.client")
    async with CacheClient(f"127.0.0.1:{free_port()}", timeout=0.5, retry_after=0.0) as down:
        loader = CountingLoader("from the database")
        results = [await down.get_or_load("agents:get:1", 60, wrappers_pb2.StringValue, loader) for _ in range(5)]
        assert [result.value for result in results] == ["from the database"] * 5
        assert loader.calls == 5
        assert await down.stats() is None
        # Invalidations from outside the log are best effort, said so by False (a
        # write's own go through the log, which the relays deliver once it is back).
        assert await down.delete("agents:get:1") is False
        assert await down.invalidate("agents:*") is False
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING and "failed" in record.message]
    assert len(warnings) == 1  # rate-limited: one report, not one per request


async def test_this_process_never_serves_what_its_own_write_made_stale(
    sidecar: CacheSidecar, client: CacheClient, stub: cache_pb2_grpc.CacheServiceStub
) -> None:
    """Read-your-writes in the writing process before the sidecar has heard of the
    write: the outbox calls committed(), and no layer's value older than it is served."""
    stale = wrappers_pb2.StringValue(value="stale").SerializeToString()
    sidecar.store.memory.set("agents:get:1", stale, STRING_TYPE)  # version 0, as the sidecar's position
    sidecar.store.memory.set("workflows:get:1", stale, STRING_TYPE)
    client.committed(1, ["agents:*"])  # the write's log entry 1; no relay has synced it yet

    loader = CountingLoader("fresh")
    assert (await client.get_or_load("agents:get:1", 60, wrappers_pb2.StringValue, loader)).value == "fresh"
    assert loader.calls == 1
    # Its fill carries version 1 (what this process knew committed when it loaded).
    held = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))
    assert (wrappers_pb2.StringValue.FromString(held.entry.value).value, held.entry.version) == ("fresh", 1)
    # Keys the write did not touch are still served from the cache.
    unrelated = await client.get_or_load("workflows:get:1", 60, wrappers_pb2.StringValue, CountingLoader())
    assert unrelated.value == "stale"

    # The relay's Sync then reaches the sidecar: the entry goes (it may have been read
    # before the write, for all the store can tell) and the next read loads again.
    await sync(stub, 0, 1, "agents:*")
    assert not (await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"))).found
    again = CountingLoader("fresh")
    assert (await client.get_or_load("agents:get:1", 60, wrappers_pb2.StringValue, again)).value == "fresh"
    assert again.calls == 1


@pytest.mark.fast
async def test_client_rejects_programming_errors() -> None:
    client = CacheClient("127.0.0.1:1", timeout=0.1)
    with pytest.raises(ValueError):
        await client.get_or_load("k:1", -1, wrappers_pb2.StringValue, CountingLoader())
    with pytest.raises(ValueError):
        await client.invalidate("")
    await client.close()
