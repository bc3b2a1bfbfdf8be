"""The Redis store against real Redis: the machine's (under a test prefix) for
behaviour, a private redis-server where the test counts the commands Redis ran."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis
from devops_hub.v1 import cache_pb2, cache_pb2_grpc
from google.protobuf import empty_pb2, wrappers_pb2

from services.cache_sidecar.stores.base import NewEntry
from services.cache_sidecar.stores.redis import RedisStore, connect
from services.cache_sidecar.stores.redis_layout import KeyLayout
from services.common.cache.client import CacheClient
from services.common.cache.near_cache import NearCache
from tests.support import eventually
from tests.support.cache import STRING_TYPE, CountingLoader, StartSidecar
from tests.support.redis_servers import RedisServer


@pytest.fixture
async def store(redis_url: str, redis_prefix: str):
    client = connect(redis_url, max_connections=8, timeout=0.25)
    redis_store = RedisStore(client, default_ttl=60, negative_ttl=5, layout=KeyLayout(redis_prefix))
    await redis_store.sync(0, 0, (), False)  # a position, so it hands out fill tokens
    yield redis_store
    await redis_store.close()


@pytest.fixture
async def private_store(redis_server: RedisServer):
    """A store on a redis-server nobody else uses, and a plain client to inspect it."""
    await redis_server.wait_ready()
    client = connect(redis_server.url, max_connections=8, timeout=0.25)
    redis_store = RedisStore(client, default_ttl=60, layout=KeyLayout("dh:"))
    inspector = aioredis.Redis.from_url(redis_server.url)
    yield redis_store, inspector
    await inspector.aclose()
    await redis_store.close()


async def command_calls(inspector: aioredis.Redis) -> dict[str, int]:
    stats = await inspector.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(values["calls"]) for name, values in stats.items()}


def calls_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Commands run in between, less the INFO that read the counters."""
    ran = {name: count - before.get(name, 0) for name, count in after.items() if count != before.get(name, 0)}
    ran.pop("info", None)
    return ran


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the function Redis Cluster maps keys to slots with."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def cluster_slot(key: str) -> int:
    """HASH_SLOT as the Redis Cluster specification defines it, hash tags included."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc16(key.encode()) % 16384


# --- layout ------------------------------------------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize("key", ["agents:get:42", "agents", "agents:list:{json}:x", "ns:[*?]:\\"])
def test_an_entry_and_its_generation_hash_share_a_cluster_slot(key: str) -> None:
    layout = KeyLayout("dh:")
    namespace = key.split(":", 1)[0]
    data, generations = layout.data_key(key), layout.generations_key(namespace)
    assert cluster_slot(data) == cluster_slot(generations)
    assert layout.logical_key(data) == key


@pytest.mark.fast
def test_namespaces_spread_over_slots() -> None:
    layout = KeyLayout("dh:")
    slots = {cluster_slot(layout.data_key(f"ns{i}:get:1")) for i in range(100)}
    assert len(slots) > 90  # one namespace is one slot; many namespaces use many


@pytest.mark.fast
def test_the_key_prefix_cannot_break_hash_tags() -> None:
    with pytest.raises(ValueError):
        KeyLayout("dh:{x}:")


# --- behaviour ---------------------------------------------------------------------------


async def test_get_set_and_every_record_has_a_ttl(store: RedisStore, redis_url: str) -> None:
    miss = await store.get("agents:get:1")
    assert miss.entry is None and miss.fill_token
    assert await store.set("agents:get:1", b"v1", STRING_TYPE, ttl=100, fill_token=miss.fill_token) is True
    hit = await store.get("agents:get:1")
    assert hit.entry is not None and (hit.entry.value, hit.entry.content_type) == (b"v1", STRING_TYPE)
    # A fill carrying a hit's token is refused: only a miss's lease can be filled.
    assert await store.set("agents:get:1", b"v0", STRING_TYPE, fill_token=hit.fill_token) is False
    await store.get("agents:get:2")  # leaves a lease behind
    inspector = aioredis.Redis.from_url(redis_url)
    try:
        ttl_value = await inspector.pttl(store.layout.data_key("agents:get:1"))
        ttl_lease = await inspector.pttl(store.layout.data_key("agents:get:2"))
    finally:
        await inspector.aclose()
    assert 90_000 <= ttl_value <= 110_000  # 100 s ± 10 % jitter
    assert 0 < ttl_lease <= 30_000


async def test_concurrent_misses_share_one_lease(store: RedisStore) -> None:
    first, second = await store.get("agents:get:1"), await store.get("agents:get:1")
    assert first.fill_token == second.fill_token
    assert await store.set("agents:get:1", b"a", "", fill_token=first.fill_token) is True
    assert await store.set("agents:get:1", b"b", "", fill_token=second.fill_token) is False
    assert (await store.get("agents:get:1")).entry.value == b"a"


async def test_negative_entries_live_at_most_the_negative_ttl(store: RedisStore, redis_url: str) -> None:
    miss = await store.get("agents:get:gone")
    assert await store.set("agents:get:gone", b"", "ct", ttl=300, fill_token=miss.fill_token, negative=True)
    hit = await store.get("agents:get:gone")
    assert hit.entry is not None and hit.entry.negative and hit.entry.value == b""
    inspector = aioredis.Redis.from_url(redis_url)
    try:
        assert 0 < await inspector.pttl(store.layout.data_key("agents:get:gone")) <= 5_500
    finally:
        await inspector.aclose()


@pytest.mark.parametrize(
    "invalidation",
    ["agents:*", "agents:get:*", "agents:get:?", "agents:get:1", "*", "delete"],
)
async def test_stale_fill_is_refused_after_any_invalidation(store: RedisStore, invalidation: str) -> None:
    miss = await store.get("agents:get:1")
    if invalidation == "delete":
        await store.delete("agents:get:1")
    else:
        await store.invalidate(invalidation)
    assert await store.set("agents:get:1", b"stale", "", fill_token=miss.fill_token) is False
    assert (await store.get("agents:get:1")).entry is None


async def test_get_many_checks_every_stamp(store: RedisStore) -> None:
    await store.set_many([NewEntry(f"agents:list:{i}", b"l", "") for i in range(3)] + [
        NewEntry("agents:get:1", b"g", ""), NewEntry("workflows:get:1", b"w", ""), NewEntry("agents", b"root", "")
    ])
    await store.invalidate("agents:list:*")
    found = await store.get_many(["agents:list:0", "agents:list:1", "agents:get:1", "workflows:get:1", "agents", "none:1"])
    assert {key: value.value for key, value in found.items()} == {
        "agents:get:1": b"g", "workflows:get:1": b"w", "agents": b"root"
    }
    stats = store.local_stats()
    assert (stats.hits, stats.misses) == (3, 3)


async def test_a_lost_generation_hash_never_revives_old_entries(store: RedisStore, redis_url: str) -> None:
    """The generation hash may expire (a day after its namespace's last write) or be
    evicted: counters restarting from zero would make entries invalidated before valid
    again. The hash's incarnation id, part of every stamp, is what prevents it."""
    await store.set("agents:list:1", b"old", "")
    await store.invalidate("agents:list:*")  # generation 1: the entry is stale
    inspector = aioredis.Redis.from_url(redis_url)
    try:
        await inspector.delete(store.layout.generations_key("agents"))  # as if evicted
    finally:
        await inspector.aclose()
    assert (await store.get("agents:list:1")).entry is None
    assert await store.get_many(["agents:list:1"]) == {}


# --- costs, counted by Redis itself ------------------------------------------------------


@pytest.mark.parametrize("size", [100, 10_000])
async def test_prefix_invalidation_is_three_commands_whatever_the_size(private_store, size: int) -> None:
    redis_store, inspector = private_store
    for start in range(0, size, 1000):
        await redis_store.set_many([NewEntry(f"agents:list:{i}", b"x", "") for i in range(start, min(size, start + 1000))])
    await redis_store.set("agents:get:1", b"kept", "")
    before = await command_calls(inspector)
    assert await redis_store.invalidate("agents:list:*") == -1
    after = await command_calls(inspector)
    assert calls_between(before, after) == {"hincrby": 1, "pexpire": 1, "publish": 1}
    found = await redis_store.get_many([f"agents:list:{i}" for i in range(0, size, max(1, size // 100))] + ["agents:get:1"])
    assert list(found) == ["agents:get:1"]


async def test_get_many_is_one_mget_and_set_many_one_script_per_namespace(private_store) -> None:
    redis_store, inspector = private_store
    await redis_store.set("warm:up", b"x", "")  # connect and load the scripts first
    before = await command_calls(inspector)
    entries = [NewEntry(f"agents:get:{i}", b"x", "") for i in range(100)] + [NewEntry("workflows:get:1", b"w", "")]
    assert await redis_store.set_many(entries) == 101
    between = await command_calls(inspector)
    ran = calls_between(before, between)
    # Commands run inside the scripts count too: one HMGET and one SET per entry.
    assert (ran["evalsha"], ran["publish"], ran["set"]) == (2, 1, 101)
    found = await redis_store.get_many([f"agents:get:{i}" for i in range(100)])
    assert len(found) == 100
    after = await command_calls(inspector)
    assert calls_between(between, after) == {"mget": 1, "hmget": 1}  # one namespace, one HMGET


async def test_a_glob_scans_and_unlinks_in_batches_never_keys(private_store) -> None:
    redis_store, inspector = private_store
    for start in range(0, 3000, 1000):
        await redis_store.set_many([NewEntry(f"bulk:{i}:a", b"x", "") for i in range(start, start + 1000)])
    before = await command_calls(inspector)
    assert await redis_store.invalidate("bulk:*:a") == 3000
    ran = calls_between(before, await command_calls(inspector))
    assert "keys" not in ran and ran["scan"] >= 1 and 3 <= ran["unlink"] <= ran["scan"] + 3


async def test_connections_are_pooled_and_bounded_with_short_timeouts(
    start_sidecar: StartSidecar, redis_server: RedisServer
) -> None:
    await redis_server.wait_ready()
    sidecar = await start_sidecar(redis_url=redis_server.url, redis_max_connections=7)
    pool = sidecar.store.primary.client.connection_pool
    assert pool.connection_kwargs["socket_timeout"] <= 0.25
    assert pool.connection_kwargs["socket_connect_timeout"] <= 0.25
    inspector = aioredis.Redis.from_url(redis_server.url)
    async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        await asyncio.gather(*(stub.Get(cache_pb2.CacheGetRequest(key=f"k:{i}")) for i in range(300)))
        stats = await stub.Stats(empty_pb2.Empty())
        clients = (await inspector.info("clients"))["connected_clients"]
    await inspector.aclose()
    assert stats.backend == "redis" and stats.misses == 300 and stats.backend_errors == 0
    assert clients <= 7 + 2  # the pool, the relay's own connection, and the inspector


# --- several sidecars sharing Redis ------------------------------------------------------


async def test_sidecars_sharing_redis_share_entries_and_invalidations(
    start_sidecar: StartSidecar, redis_url: str, redis_prefix: str
) -> None:
    """A write through another sidecar reaches this sidecar's near-caches (the relay)."""
    here = await start_sidecar(redis_url=redis_url, redis_key_prefix=redis_prefix)
    there = await start_sidecar(redis_url=redis_url, redis_key_prefix=redis_prefix)
    reader = CacheClient(here.host.bound_address, timeout=2.0, near_cache=NearCache())
    writer = CacheClient(there.host.bound_address, timeout=2.0)
    async with reader, writer:
        await eventually(lambda: reader.near.live)
        first = CountingLoader("v1")
        assert (await reader.get_or_load("agents:get:1", 60, wrappers_pb2.StringValue, first)).value == "v1"
        # The entry is in Redis: the other sidecar serves it without loading.
        other = CountingLoader("other")
        assert (await writer.get_or_load("agents:get:1", 60, wrappers_pb2.StringValue, other)).value == "v1"
        assert other.calls == 0
        assert len(reader.near) == 1

        assert await writer.invalidate("agents:get:1") is True
        await eventually(lambda: len(reader.near) == 0)
        second = CountingLoader("v2")
        assert (await reader.get_or_load("agents:get:1", 60, wrappers_pb2.StringValue, second)).value == "v2"
        assert second.calls == 1
