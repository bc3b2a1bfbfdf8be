"""The Redis store against real Redis: the machine's (under a test prefix) for
behaviour, a private redis-server where the test counts the commands Redis ran.

The one clock (docs/cache.md): a value carries the log position it was read at (its
version); a fill of version v is refused once an invalidation of its key was applied
at a position above v. Log invalidations arrive by Sync, as the services' relays send
them; Invalidate/Delete/Clear come from outside the log, at the current position."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis
from devops_hub.v1 import cache_pb2, cache_pb2_grpc
from google.protobuf import empty_pb2, wrappers_pb2

from services.cache.client.client import CacheClient
from services.cache.client.keys import escape_key
from services.cache.client.near_cache import NearCache
from services.cache.sidecar.stores.base import NewEntry
from services.cache.sidecar.stores.redis import RedisStore, connect
from services.cache.sidecar.stores.redis_layout import KeyLayout
from services.common.contract.errors import FailedPrecondition
from tests.support import eventually
from tests.support.cache import STRING_TYPE, CountingLoader, StartSidecar
from tests.support.redis_servers import RedisServer


@pytest.fixture
async def store(redis_url: str, redis_prefix: str):
    client = connect(redis_url, max_connections=8, timeout=0.25)
    redis_store = RedisStore(client, default_ttl=60, negative_ttl=5, layout=KeyLayout(redis_prefix))
    await redis_store.sync(0, 1, (), False)  # a position (1), so it takes fills
    yield redis_store
    await redis_store.close()


@pytest.fixture
async def inspector(redis_url: str):
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def private_store(redis_server: RedisServer):
    """A store on a redis-server nobody else uses, and a plain client to inspect it."""
    await redis_server.wait_ready()
    client = connect(redis_server.url, max_connections=8, timeout=0.25)
    redis_store = RedisStore(client, default_ttl=60, layout=KeyLayout("dh:"))
    await redis_store.sync(0, 1, (), False)
    await redis_store.get("warm:up")  # connected, scripts loaded: not counted below
    inspector = aioredis.Redis.from_url(redis_server.url)
    yield redis_store, inspector
    await inspector.aclose()
    await redis_store.close()


async def command_calls(inspector: aioredis.Redis) -> dict[str, int]:
    stats = await inspector.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(values["calls"]) for name, values in stats.items()}


def calls_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Commands run in between (those run inside scripts included), less the INFO
    that read the counters."""
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


async def fill(store: RedisStore, key: str, value: bytes = b"v", **options) -> bool:
    """A fill as a client makes one: the Get's position is the version."""
    lookup = await store.get(key)
    return await store.set(key, value, "", version=lookup.position, **options)


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


async def test_a_fill_carries_its_version_and_every_record_has_a_ttl(store: RedisStore, inspector) -> None:
    miss = await store.get("agents:get:1")
    assert miss.entry is None and miss.position == 1
    assert await store.set("agents:get:1", b"v1", STRING_TYPE, ttl=100, version=miss.position) is True
    hit = await store.get("agents:get:1")
    assert hit.entry is not None and (hit.entry.value, hit.entry.content_type, hit.entry.version) == (b"v1", STRING_TYPE, 1)
    # A value read later (version 2, a position the client knows committed) replaces it;
    # one read earlier than what the key holds never does.
    assert await store.set("agents:get:1", b"v2", STRING_TYPE, ttl=100, version=2) is True
    assert await store.set("agents:get:1", b"older", STRING_TYPE, ttl=100, version=1) is False
    assert (await store.get("agents:get:1")).entry.value == b"v2"
    assert 90_000 <= await inspector.pttl(store.layout.data_key("agents:get:1")) <= 110_000  # 100 s ± 10 %
    # An overwrite (not a fill) and a tombstone expire too.
    await store.set_many([NewEntry("agents:get:2", b"o", "")], ttl=100)
    assert 90_000 <= await inspector.pttl(store.layout.data_key("agents:get:2")) <= 110_000
    assert await store.remove([escape_key("agents:get:1")]) == 1  # a Delete: an exact pattern
    assert 0 < await inspector.pttl(store.layout.data_key("agents:get:1")) <= 60_000
    # The generation and position hashes alone have no TTL: losing them loses invalidations.
    await store.sync(1, 2, ["agents:list:*"], False)
    assert await inspector.pttl(store.layout.generations_key("agents")) == -1
    assert await inspector.pttl(store.layout.position) == -1


async def test_a_fresh_store_refuses_fills_until_a_sync(redis_url: str, redis_prefix: str) -> None:
    fresh = RedisStore(connect(redis_url, max_connections=2, timeout=0.25), default_ttl=60, layout=KeyLayout(redis_prefix))
    try:
        miss = await fresh.get("agents:get:1")
        assert (miss.entry, miss.position) == (None, 0) and (await fresh.sync_state()).fresh
        assert await fresh.set("agents:get:1", b"v", "", version=0) is False
        await fresh.sync(0, 7, (), False)  # from fresh: cleared, position 7 with floor 7
        assert await fresh.set("agents:get:1", b"v", "", version=6) is False  # read before the floor
        assert await fill(fresh, "agents:get:1") is True
        assert (await fresh.get("agents:get:1")).entry.version == 7
    finally:
        await fresh.close()


async def test_negative_entries_live_at_most_the_negative_ttl(store: RedisStore, inspector) -> None:
    assert await fill(store, "agents:get:gone", b"", ttl=300, negative=True)
    hit = await store.get("agents:get:gone")
    assert hit.entry is not None and hit.entry.negative and hit.entry.value == b""
    assert 0 < await inspector.pttl(store.layout.data_key("agents:get:gone")) <= 5_500


INVALIDATIONS = ["agents:*", "agents:get:*", "agents:get:?", "agents:get:[12]", "*:get:1", "agents:get:1", "*"]


@pytest.mark.parametrize("pattern", INVALIDATIONS)
async def test_a_fill_read_before_a_log_invalidation_is_refused(store: RedisStore, pattern: str) -> None:
    miss = await store.get("agents:get:1")  # read at 1
    assert await fill(store, "workflows:get:0")  # a namespace in use, read at 1 too
    await store.sync(1, 2, [pattern], False)  # a write's invalidation, log entry 2
    assert await store.set("agents:get:1", b"stale", "", version=miss.position) is False
    assert (await store.get("agents:get:1")).entry is None
    # Read after it, the value is taken; an unrelated namespace never noticed.
    assert await store.set("agents:get:1", b"fresh", "", version=2) is True
    # Another namespace is untouched, unless the pattern names none (then it is a clear).
    assert await store.set("workflows:get:1", b"w", "", version=1) is not pattern.startswith("*")


@pytest.mark.parametrize("how", ["clear", "log clear"])
async def test_a_fill_read_before_a_clear_is_refused(store: RedisStore, how: str) -> None:
    miss = await store.get("agents:get:1")
    await store.sync(1, 3, (), False)
    if how == "clear":
        await store.clear()  # from outside the log: at the current position, 3
    else:
        await store.sync(3, 4, (), True)  # the log was pruned: clear at 4
    assert await store.set("agents:get:1", b"stale", "", version=miss.position) is False
    assert await store.set("never:seen:1", b"stale", "", version=miss.position) is False  # the floor, any namespace
    assert await fill(store, "agents:get:1") is True


@pytest.mark.parametrize("pattern", [*INVALIDATIONS, "delete"])
async def test_an_invalidation_from_outside_the_log_removes_at_once_and_refuses_older_fills(
    store: RedisStore, inspector, pattern: str
) -> None:
    for key in ("agents:get:1", "agents:get:2", "workflows:get:1"):
        assert await fill(store, key, b"old")
    await store.sync(1, 2, (), False)  # moves on: an outside invalidation is recorded at 2
    if pattern == "delete":
        assert await store.remove([escape_key("agents:get:1")]) == 1
    else:
        assert await store.remove([pattern]) >= 1
    assert (await store.get("agents:get:1")).entry is None
    # Removed physically (a tombstone where the key was named exactly), not only hidden.
    raw = await inspector.get(store.layout.data_key("agents:get:1"))
    assert raw is None or raw.startswith(b"T")
    assert await store.set("agents:get:1", b"stale", "", version=1) is False
    assert await store.set("agents:get:1", b"new", "", version=2) is True


async def test_a_log_invalidation_keeps_a_value_read_after_it(store: RedisStore) -> None:
    """An exact invalidation at s leaves a record read at s or later in place: it is newer."""
    await store.get("agents:get:1")
    assert await store.set("agents:get:1", b"read at 3", "", version=3) is True
    await store.sync(1, 2, ["agents:get:1"], False)
    assert (await store.get("agents:get:1")).entry.value == b"read at 3"
    await store.sync(2, 4, ["agents:get:1"], False)
    assert (await store.get("agents:get:1")).entry is None


async def test_get_many_checks_every_level(store: RedisStore) -> None:
    await store.set_many([NewEntry(f"agents:list:{i}", b"l", "") for i in range(3)] + [
        NewEntry("agents:get:1", b"g", ""), NewEntry("workflows:get:1", b"w", ""), NewEntry("agents", b"root", "")
    ])
    await store.sync(1, 2, ["agents:list:*"], False)
    found = await store.get_many(["agents:list:0", "agents:list:1", "agents:get:1", "workflows:get:1", "agents", "none:1"])
    assert {key: value.value for key, value in found.items()} == {
        "agents:get:1": b"g", "workflows:get:1": b"w", "agents": b"root"
    }
    assert (store.counts.hits, store.counts.misses) == (3, 3)


async def test_a_lost_generation_hash_never_revives_old_entries(store: RedisStore, inspector) -> None:
    """A generation hash evicted (an allkeys-* maxmemory policy) or deleted takes the
    prefix invalidations it recorded with it: the namespace's records must not become
    current again, and fills read before the loss must not land."""
    for key in ("agents:list:1", "agents:get:1"):
        assert await fill(store, key, b"old")
    await store.sync(1, 2, ["agents:list:*"], False)
    await store.sync(2, 3, (), False)
    await inspector.delete(store.layout.generations_key("agents"))  # as if evicted
    assert await store.get_many(["agents:list:1", "agents:get:1"]) == {}
    assert (await store.get("agents:list:1")).entry is None
    assert await store.set("agents:list:1", b"stale", "", version=1) is False
    # The namespace works again from the position the Get read.
    assert await fill(store, "agents:list:1", b"new") is True
    assert (await store.get("agents:list:1")).entry.value == b"new"


async def test_a_fill_in_a_new_namespace_needs_no_get(store: RedisStore) -> None:
    """A no-cache load fills without a Get, at the position its process knows: in a
    namespace Redis has never seen it lands, unless read before the store's position."""
    assert await store.set("brand:new:1", b"v", "", version=1) is True
    await store.sync(1, 2, (), False)
    assert await store.set("other:new:1", b"v", "", version=1) is False
    assert await store.set("other:new:1", b"v", "", version=2) is True
    assert (await store.get_many(["brand:new:1", "other:new:1"])).keys() == {"brand:new:1", "other:new:1"}


async def test_the_position_is_shared_through_redis_and_never_skips(store: RedisStore, redis_url: str, redis_prefix: str) -> None:
    other = RedisStore(connect(redis_url, max_connections=2, timeout=0.25), default_ttl=60, layout=KeyLayout(redis_prefix))
    try:
        await store.sync(1, 5, ["agents:list:*"], False)
        assert await other.sync_state() == await store.sync_state()
        assert (await other.sync_state()).applied == 5
        with pytest.raises(FailedPrecondition):
            await other.sync(6, 8, ["agents:get:1"], False)  # entry 6 would be skipped
        assert await other.sync(3, 4, ["workflows:*"], False) == await store.sync_state()  # covered already: a no-op
        assert await fill(store, "workflows:get:1") is True
        assert (await other.sync(5, 6, ["agents:get:1"], False)).applied == 6
    finally:
        await other.close()


# --- costs, counted by Redis itself ------------------------------------------------------


@pytest.mark.parametrize("size", [100, 10_000])
async def test_prefix_invalidation_is_a_few_commands_whatever_the_size(private_store, size: int) -> None:
    redis_store, inspector = private_store
    for start in range(0, size, 1000):
        await redis_store.set_many([NewEntry(f"agents:list:{i}", b"x", "") for i in range(start, min(size, start + 1000))])
    await redis_store.set_many([NewEntry("agents:get:1", b"kept", "")])
    before = await command_calls(inspector)
    await redis_store.sync(1, 2, ["agents:list:*"], False)
    ran = calls_between(before, await command_calls(inspector))
    # Read the position, raise the level and the position (scripts: HGET + HSET each),
    # publish. Nothing that walks the records.
    assert ran == {"hmget": 1, "evalsha": 2, "hget": 2, "hset": 2, "publish": 1}
    found = await redis_store.get_many([f"agents:list:{i}" for i in range(0, size, max(1, size // 100))] + ["agents:get:1"])
    assert list(found) == ["agents:get:1"]


def round_trips(client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the client sends from now on: "pipeline" per pipeline, else the command."""
    sent: list[str] = []
    real_pipeline, real_command = client.pipeline, client.execute_command

    def pipeline(*args, **kwargs):
        sent.append("pipeline")
        return real_pipeline(*args, **kwargs)

    async def command(*args, **kwargs):
        sent.append(str(args[0]))
        return await real_command(*args, **kwargs)

    monkeypatch.setattr(client, "pipeline", pipeline)
    monkeypatch.setattr(client, "execute_command", command)
    return sent


async def test_get_many_is_one_round_trip(private_store, monkeypatch: pytest.MonkeyPatch) -> None:
    redis_store, inspector = private_store
    keys = [f"agents:get:{i}" for i in range(100)] + ["workflows:get:1"]
    await redis_store.set_many([NewEntry(key, b"x", "") for key in keys])
    sent = round_trips(redis_store.client, monkeypatch)
    before = await command_calls(inspector)
    assert len(await redis_store.get_many(keys)) == 101
    ran = calls_between(before, await command_calls(inspector))
    assert sent == ["pipeline"]  # one pipeline, nothing else: one round trip
    # One script per key (each a GET and an HMGET of its namespace's levels).
    assert ran == {"evalsha": 101, "get": 101, "hmget": 101}


async def test_stats_count_records_with_a_round_trip_per_thousand(private_store, monkeypatch: pytest.MonkeyPatch) -> None:
    redis_store, inspector = private_store
    for start in range(0, 2500, 1000):
        await redis_store.set_many([NewEntry(f"agents:get:{i}", b"x" * 100, "") for i in range(start, min(2500, start + 1000))])
    sent = round_trips(redis_store.client, monkeypatch)
    stats = await redis_store.stats()
    assert stats.entries == 2500 and stats.bytes >= 2500 * 100
    assert sent.count("pipeline") == 3 and set(sent) == {"pipeline", "SCAN"}  # MEMORY USAGE pipelined


async def test_a_glob_scans_and_unlinks_in_batches_never_keys(private_store) -> None:
    redis_store, inspector = private_store
    for start in range(0, 3000, 1000):
        await redis_store.set_many([NewEntry(f"bulk:{i}:a", b"x", "") for i in range(start, start + 1000)])
    await redis_store.set_many([NewEntry(f"bulk:{i}:b", b"x", "") for i in range(10)])
    before = await command_calls(inspector)
    assert await redis_store.remove(["bulk:*:a"]) == 3000
    ran = calls_between(before, await command_calls(inspector))
    assert "keys" not in ran and ran["scan"] >= 3 and 3 <= ran["unlink"] <= 4  # batches of at most 1000
    assert len(await redis_store.get_many([f"bulk:{i}:b" for i in range(10)])) == 10
    assert await redis_store.get_many(["bulk:0:a", "bulk:2999:a"]) == {}


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
        # Four callers a connection at a time: they wait for one, well within the pool's
        # 0.25 s wait even on a loaded machine (all 300 at once could not, and would
        # rightly fall back to memory).
        for wave in range(10):
            await asyncio.gather(*(stub.Get(cache_pb2.CacheGetRequest(key=f"k:{wave}:{i}")) for i in range(30)))
        stats = await stub.Stats(empty_pb2.Empty())
        clients = (await inspector.info("clients"))["connected_clients"]
    await inspector.aclose()
    assert stats.backend == "redis" and stats.misses == 300 and stats.backend_errors == 0
    assert clients <= 7 + 2  # the pool, the peers' own connection, and the inspector


# --- several sidecars sharing Redis ------------------------------------------------------


async def test_sidecars_sharing_redis_share_entries_and_invalidations(
    start_sidecar: StartSidecar, redis_url: str, redis_prefix: str
) -> None:
    """An invalidation through another sidecar reaches this sidecar's near-caches (Peers)."""
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
