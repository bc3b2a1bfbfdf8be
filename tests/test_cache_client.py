"""The client library services import: the near-cache fed by Watch, negative entries,
the decorator API and its keys, the manager registry, reconnection and shutdown.
Everything runs against real sidecars on ephemeral ports."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import os
import signal
import uuid

import grpc
import pytest
from devops_hub.v1 import cache_pb2, cache_pb2_grpc
from google.protobuf import empty_pb2, wrappers_pb2

from devstack.ports import free_port
from services.cache.client.client import CacheClient
from services.cache.client.codecs import JSON, TEXT, protobuf_codec
from services.cache.client.decorators import cached, invalidate_cache, stale
from services.cache.client.key_builder import KeyBuilder, encode_part
from services.cache.client.manager import (
    CacheManager,
    configure,
    get_cache_manager,
    set_cache_manager,
    use_cache_manager,
)
from services.cache.client.near_cache import NearCache
from services.cache.sidecar.server import CacheSidecar
from services.common.foundation.settings import Settings
from tests.support import ROOT, eventually
from tests.support.cache import (
    READ_TIMEOUT,
    CountingLoader,
    Database,
    FakeClock,
    StartSidecar,
)
from tests.support.processes import spawned

StringValue = wrappers_pb2.StringValue


def near_client(sidecar: CacheSidecar, **options) -> CacheClient:
    return CacheClient(sidecar.host.bound_address, timeout=2.0, near_cache=NearCache(**options))


async def sidecar_hits(sidecar: CacheSidecar) -> int:
    return (await sidecar.store.stats()).hits


# --- the near-cache ----------------------------------------------------------------------


async def test_a_hot_key_is_served_without_leaving_the_process(sidecar: CacheSidecar) -> None:
    async with near_client(sidecar) as client:
        await eventually(lambda: client.near.live)
        loader = CountingLoader("hot")
        assert (await client.get_or_load("agents:get:1", 60, StringValue, loader)).value == "hot"
        hits = await sidecar_hits(sidecar)
        values = [(await client.get_or_load("agents:get:1", 60, StringValue, loader)).value for _ in range(100)]
        assert values == ["hot"] * 100 and loader.calls == 1
        assert await sidecar_hits(sidecar) == hits  # not one of them reached the sidecar
        assert (client.hits, client.misses) == (100, 1)
        # Callers get their own copies: changing one does not change the cache.
        values_seen = await client.get_or_load("agents:get:1", 60, StringValue, loader)
        values_seen.value = "mutated"
        assert (await client.get_or_load("agents:get:1", 60, StringValue, loader)).value == "hot"


async def test_a_write_through_another_client_reaches_the_near_cache(
    start_sidecar: StartSidecar, backend: dict
) -> None:
    sidecar = await start_sidecar(**backend)
    database = Database()
    database.values["agents:get:1"] = "v1"
    async with near_client(sidecar) as reader, CacheClient(sidecar.host.bound_address, timeout=2.0) as writer:
        await eventually(lambda: reader.near.live)
        load = database.loader("agents:get:1")
        assert (await reader.get_or_load("agents:get:1", 60, StringValue, load)).value == "v1"
        assert len(reader.near) == 1

        database.values["agents:get:1"] = "v2"
        assert await writer.invalidate("agents:*") is True
        await eventually(lambda: len(reader.near) == 0)
        assert (await reader.get_or_load("agents:get:1", 60, StringValue, load)).value == "v2"

        # An overwrite (a Set without a fill token) reaches it too.
        assert await writer.set("agents:get:1", StringValue(value="v3"), protobuf_codec(StringValue)) is True
        await eventually(lambda: len(reader.near) == 0)
        assert (await reader.get_or_load("agents:get:1", 60, StringValue, load)).value == "v3"


async def test_the_near_cache_is_cleared_when_the_stream_drops(start_sidecar: StartSidecar) -> None:
    port = free_port()
    sidecar = await start_sidecar(cache_addr=f"127.0.0.1:{port}")
    # retry_after=0: no pause before trying the sidecar again after a failure.
    client = CacheClient(sidecar.host.bound_address, timeout=2.0, near_cache=NearCache(), retry_after=0.0)
    async with client:
        await eventually(lambda: client.near.live)
        await client.get_or_load("agents:get:1", 60, StringValue, CountingLoader("v1"))
        assert len(client.near) == 1
        await sidecar.stop(0)
        await eventually(lambda: not client.near.live)
        assert len(client.near) == 0
        # With the sidecar gone, reads go to the loader and nothing is kept near.
        loader = CountingLoader("from the database")
        assert (await client.get_or_load("agents:get:1", 60, StringValue, loader)).value == "from the database"
        assert loader.calls == 1 and len(client.near) == 0

        # A new sidecar on the same address: the client finds it by itself.
        await start_sidecar(cache_addr=f"127.0.0.1:{port}")
        await eventually(lambda: client.near.live, timeout=20)
        again = CountingLoader("again")
        await client.get_or_load("agents:get:1", 60, StringValue, again)
        await client.get_or_load("agents:get:1", 60, StringValue, again)
        assert again.calls == 1


async def test_the_near_cache_stops_reads_when_heartbeats_stop(start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("services.cache.sidecar.servicer.HEARTBEAT_SECONDS", 30.0)
    sidecar = await start_sidecar()
    client = CacheClient(sidecar.host.bound_address, timeout=2.0, near_cache=NearCache(), watch_liveness=0.3)
    async with client:
        await eventually(lambda: client.near.live)
        # The sidecar sends nothing for 30 s; after 0.3 s of silence the client stops
        # trusting the stream, clears and resubscribes.
        await eventually(lambda: not client.near.live)
        await eventually(lambda: client.near.live)


async def test_no_layer_keeps_a_value_loaded_before_a_write(start_sidecar: StartSidecar, backend: dict) -> None:
    """miss → load old value → write (log entry 1) reaches the cache → fill with the old
    value, read at position 0: the fill must land neither in the sidecar nor in any
    near-cache."""
    sidecar = await start_sidecar(**backend)
    database = Database()
    database.values["agents:get:1"] = "old"
    async with near_client(sidecar) as reader, near_client(sidecar) as writer:
        await eventually(lambda: reader.near.live and writer.near.live)
        slow = CountingLoader("old", hold=True)
        read = asyncio.create_task(reader.get_or_load("agents:get:1", 60, StringValue, slow))
        await asyncio.wait_for(slow.started.wait(), READ_TIMEOUT)  # missed; loading "old"

        database.values["agents:get:1"] = "new"
        writer.committed(1, ["agents:get:1"])  # what the outbox does after the commit
        async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
            sync = cache_pb2.CacheSyncRequest(after=0, through=1, patterns=["agents:get:1"])
            assert (await cache_pb2_grpc.CacheServiceStub(channel).Sync(sync)).applied == 1  # the relay's route
        await eventually(lambda: reader.near.position == 1)
        slow.release.set()
        assert (await read).value == "old"  # it started before the write: fine to return

        fresh = database.loader("agents:get:1")
        for client in (reader, writer):
            assert (await client.get_or_load("agents:get:1", 60, StringValue, fresh)).value == "new"
        async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
            got = await cache_pb2_grpc.CacheServiceStub(channel).Get(cache_pb2.CacheGetRequest(key="agents:get:1"))
        assert StringValue.FromString(got.entry.value).value == "new"


@pytest.mark.fast
def test_near_fills_that_raced_an_invalidation_are_refused() -> None:
    """Values carry the log position they were read at: one read before an
    invalidation of its key (or before the stream went live) never lands."""
    clock = FakeClock()
    near = NearCache(max_entries=10, max_ttl=5, clock=clock)
    near.go_live(3)
    assert near.put("agents:get:1", "ct", b"v", False, 60, 2) is False  # read before the stream's position
    near.invalidate("agents:list:*", 4)
    assert near.put("agents:get:1", "ct", b"v", False, 60, 3) is True  # unrelated
    assert near.put("agents:list:a", "ct", b"v", False, 60, 3) is False  # raced
    assert near.put("agents:list:a", "ct", b"v", False, 60, 4) is True  # read after it
    near.invalidate("agents:list:a", None)  # from outside the log: dropped, not recorded
    assert near.get("agents:list:a") is None and near.put("agents:list:a", "ct", b"v", False, 60, 4) is True
    clock.now += 5.01  # TTL capped at max_ttl
    assert near.get("agents:get:1") is None
    near.go_dark()
    assert len(near) == 0 and near.put("agents:get:2", "ct", b"v", False, 60, 9) is False


@pytest.mark.fast
def test_a_span_of_this_process_s_own_writes_is_not_applied_again() -> None:
    """Its writes applied their patterns at commit, and entries read after them were
    kept since: a span of the stream that holds only those writes (the relay sends
    writes that commit together in one Sync) is skipped; one with another's is not."""
    near = NearCache()
    near.go_live(0)
    near.applied_own(1, ["agents:get:1"])
    near.applied_own(2, ["agents:get:2"])
    assert near.took_own(0, 2) is True
    near.applied_own(3, ["agents:get:3"])
    assert near.took_own(2, 4) is False, "entry 4 is another process's"
    assert near.took_own(4, 4) is False, "a span from outside the log"
    assert near._own == set(), "entries the stream has passed are forgotten"


@pytest.mark.fast
def test_the_near_cache_is_bounded() -> None:
    near = NearCache(max_entries=3, max_bytes=1600)
    near.go_live(0)
    for i in range(10):
        near.put(f"k:{i}", "ct", b"x" * 10, False, 60, 0)
    assert len(near) == 3 and near.get("k:9") is not None and near.get("k:0") is None
    assert near.put("big:1", "ct", b"x" * 200, False, 60, 0) is False  # over a sixteenth of the budget


# --- negative entries --------------------------------------------------------------------


async def test_not_found_is_cached_as_a_negative_entry(start_sidecar: StartSidecar, backend: dict) -> None:
    sidecar = await start_sidecar(**backend)
    calls = 0

    async def missing() -> StringValue | None:
        nonlocal calls
        calls += 1
        return None

    async with near_client(sidecar) as client:
        await eventually(lambda: client.near.live)
        for _ in range(3):
            assert await client.load("agents:get:gone", 60, protobuf_codec(StringValue), missing, cache_none=True) is None
        assert calls == 1
        # A plain get_or_load does not take a negative entry for a value.
        found = await client.get_or_load("agents:get:gone", 60, StringValue, CountingLoader("now here"))
        assert found.value == "now here"
        # Creating it invalidates the negative entry like any other.
        await client.invalidate("agents:get:gone")
        assert await client.load("agents:get:gone", 60, protobuf_codec(StringValue), missing, cache_none=True) is None
        assert calls == 2


# --- keys ----------------------------------------------------------------------------------


class Color(enum.Enum):
    RED = 1


@dataclasses.dataclass
class Filter:
    domain: str
    tags: list[str]


def key_of(function, *args, **kwargs) -> str:
    import inspect

    return KeyBuilder("t:f", inspect.signature(function)).key(args, kwargs)


@pytest.mark.fast
def test_keys_are_readable_for_scalars_and_distinguish_types() -> None:
    def f(a, b=None):
        return a

    assert key_of(f, "py-linter") == "t:f:py-linter:n="
    assert key_of(f, a="py-linter") == key_of(f, "py-linter", None)  # defaults applied
    assert key_of(f, "a:b*") == "t:f:a%3Ab%2A:n="  # separators and globs never appear raw
    parts = {key_of(f, value) for value in (1, "1", True, 1.0, None, "", Color.RED)}
    assert len(parts) == 7
    assert encode_part(uuid.UUID(int=1)) == "u=00000000-0000-0000-0000-000000000001"
    assert encode_part(dt.date(2024, 1, 2)) == "t=2024-01-02"


@pytest.mark.fast
def test_keys_of_structured_arguments_are_deterministic() -> None:
    def f(request):
        return request

    message = cache_pb2.CacheWatchRequest(prefixes=["a:", "b:"])
    assert key_of(f, message) == key_of(f, cache_pb2.CacheWatchRequest(prefixes=["a:", "b:"]))
    assert key_of(f, message) != key_of(f, cache_pb2.CacheWatchRequest(prefixes=["b:", "a:"]))
    assert key_of(f, {"x": 1, "y": [1, 2]}) == key_of(f, {"y": [1, 2], "x": 1})
    assert key_of(f, {1, 2, 3}) == key_of(f, {3, 2, 1})
    assert key_of(f, Filter("ci", ["a"])) == key_of(f, Filter("ci", ["a"]))
    assert key_of(f, Filter("ci", ["a"])) != key_of(f, Filter("ci", ["b"]))
    assert key_of(f, b"\x00\x01").startswith("t:f:h=")
    assert len(key_of(f, "x" * 5000)) < 100  # too long to be readable: hashed


@pytest.mark.fast
def test_keys_refuse_types_they_cannot_encode_faithfully() -> None:
    def f(thing):
        return thing

    with pytest.raises(TypeError, match="__cache_key__"):
        key_of(f, object())

    class Tenant:
        def __init__(self, name: str) -> None:
            self.name = name

        def __cache_key__(self) -> str:
            return self.name

    assert key_of(f, Tenant("a")) == key_of(f, Tenant("a")) != key_of(f, Tenant("b"))


@pytest.mark.fast
def test_methods_are_keyed_without_self() -> None:
    class Service:
        def get(self, agent_id: str) -> str:
            return agent_id

    import inspect

    builder = KeyBuilder("agents:get", inspect.signature(Service.get))
    assert builder.key((Service(), "a1"), {}) == builder.key((Service(), "a1"), {}) == "agents:get:a1"


# --- the decorators and the manager --------------------------------------------------------


@pytest.fixture
async def manager(sidecar: CacheSidecar):
    async with CacheManager(near_client(sidecar), default_ttl=60) as cache_manager:
        await eventually(lambda: cache_manager.client.near.live)
        with use_cache_manager(cache_manager):
            yield cache_manager


async def test_cached_and_invalidate_cache_agree_on_keys(manager: CacheManager, sidecar: CacheSidecar) -> None:
    database = {"a1": "first"}
    reads = 0

    @cached(ttl=300, key_prefix="agents:get")
    async def get_agent(agent_id: str) -> StringValue | None:
        nonlocal reads
        reads += 1
        return StringValue(value=database[agent_id]) if agent_id in database else None

    @invalidate_cache(key_pattern=["agents:get:{agent_id}", "agents:list:*"])
    async def update_agent(agent_id: str, value: str) -> None:
        database[agent_id] = value

    assert stale(get_agent, "a1") == "agents:get:a1"  # the key it fills, as a write names it
    assert (await get_agent("a1")).value == "first"
    assert (await get_agent(agent_id="a1")).value == "first"
    assert reads == 1
    assert await get_agent("missing") is None and await get_agent("missing") is None
    assert reads == 2  # the "not found" was cached too

    await update_agent("a1", "second")
    assert (await get_agent("a1")).value == "second"
    assert reads == 3
    stored = sidecar.store.memory.get("agents:get:a1")
    assert stored is not None and stored.content_type == "application/x-protobuf; type=google.protobuf.StringValue"


async def test_invalidate_cache_runs_when_the_write_fails(manager: CacheManager) -> None:
    await manager.set("agents:get:a1", {"v": 1})

    @invalidate_cache(key_pattern="agents:get:{agent_id}")
    async def failing_update(agent_id: str) -> None:
        raise RuntimeError("failed half-way")

    with pytest.raises(RuntimeError):
        await failing_update("a1")
    assert await manager.get("agents:get:a1") is None


async def test_the_manager_api(manager: CacheManager) -> None:
    assert await manager.get("reports:today", default="miss") == "miss"
    assert await manager.set("reports:today", {"ok": 3, "names": ["a"]}, ttl=30) is True
    assert await manager.get("reports:today") == {"ok": 3, "names": ["a"]}
    assert await manager.set("reports:title", "text", codec=TEXT) is True
    assert await manager.get("reports:title", codec=TEXT) == "text"
    assert await manager.get("reports:title", codec=JSON, default="other type") == "other type"
    assert await manager.delete("reports:today") is True
    assert await manager.get("reports:today") is None
    stats = await manager.sidecar_stats()
    assert stats is not None and stats.sets == 2
    assert await manager.clear() is True
    assert await manager.get("reports:title", codec=TEXT) is None


@pytest.mark.fast
def test_cached_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(TypeError, match="codec"):

        @cached(ttl=1, key_prefix="x:y")
        async def returns_an_object() -> object:
            return object()

    with pytest.raises(ValueError, match="key_prefix"):

        @cached(ttl=1, key_prefix="{bad}")
        async def bad_prefix() -> str:
            return ""

    with pytest.raises(ValueError, match="nope"):

        @invalidate_cache(key_pattern="x:{nope}")
        async def unknown_argument(agent_id: str) -> None:
            return None


async def test_get_cache_manager_prefers_the_context_then_the_process_default(sidecar: CacheSidecar) -> None:
    previous = set_cache_manager(None)
    try:
        settings = Settings(cache_addr=sidecar.host.bound_address, cache_default_ttl=42, auth_enabled=False)
        default = configure(settings)
        assert get_cache_manager() is default and default.default_ttl == 42
        mine = CacheManager(CacheClient(sidecar.host.bound_address, timeout=1.0))
        with use_cache_manager(mine):
            assert get_cache_manager() is mine
            inside = await asyncio.create_task(asyncio.sleep(0, result=get_cache_manager()))
            assert inside is mine
        assert get_cache_manager() is default
        assert set_cache_manager(mine) is default and get_cache_manager() is mine
        await default.close()
        await mine.close()
    finally:
        set_cache_manager(previous)


# --- an unreachable sidecar, and shutdown --------------------------------------------------


async def test_an_unreachable_sidecar_never_fails_a_decorated_call() -> None:
    unreachable = CacheManager(CacheClient(f"127.0.0.1:{free_port()}", timeout=0.2, retry_after=0.0,
                                           near_cache=NearCache()))
    calls = 0

    @cached(ttl=60, key_prefix="agents:get", manager=unreachable)
    async def get_agent(agent_id: str) -> StringValue:
        nonlocal calls
        calls += 1
        return StringValue(value=agent_id)

    @invalidate_cache(key_pattern="agents:get:{agent_id}", manager=unreachable)
    async def update_agent(agent_id: str) -> str:
        return agent_id

    async with unreachable:
        assert [(await get_agent("a")).value for _ in range(3)] == ["a"] * 3
        assert calls == 3
        assert await update_agent("a") == "a"
        assert await unreachable.sidecar_stats() is None
        assert await unreachable.set("reports:today", {"ok": 1}) is False
        assert not unreachable.client.near.live


async def test_sigterm_ends_watch_streams_at_once_instead_of_holding_the_grace_period() -> None:
    port = free_port()
    env = dict(os.environ, CACHE_ADDR=f"127.0.0.1:{port}", SHUTDOWN_GRACE="60", LOG_LEVEL="WARNING",
               AUTH_ENABLED="false", CACHE_METRICS_PORT="0")
    env.pop("REDIS_URL", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python"), env.get("PYTHONPATH", "")])
    with spawned("services.cache.sidecar", env) as process:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                try:
                    await stub.Stats(empty_pb2.Empty(), timeout=1)
                    break
                except grpc.aio.AioRpcError:
                    assert asyncio.get_running_loop().time() < deadline, "the sidecar did not start"
                    await asyncio.sleep(0.1)
            call = stub.Watch(cache_pb2.CacheWatchRequest())
            assert not (await asyncio.wait_for(call.read(), READ_TIMEOUT)).patterns  # the opening heartbeat
            process.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(call.read(), READ_TIMEOUT)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        # With a 60 s grace, exiting within 20 s means the stream did not hold it.
        code = await asyncio.to_thread(process.wait, 20)
        assert code == 0
