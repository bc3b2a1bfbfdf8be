"""Redis failing under the sidecar: killed, frozen, restarted, down at start. A private
redis-server per test (its own port, no persistence), started and signalled here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis
from devops_hub.v1 import cache_pb2, cache_pb2_grpc
from google.protobuf import empty_pb2

from services.cache_sidecar.stores.fallback import FallbackStore
from services.cache_sidecar.stores.memory import MemoryBackend, MemoryStore
from services.cache_sidecar.stores.redis import RedisStore, connect
from services.cache_sidecar.stores.redis_layout import KeyLayout
from tests.support.cache import StartSidecar, entry
from tests.support.redis_servers import RedisServer

CALL_TIMEOUT = 5.0
RECOVERY_TIMEOUT = 20.0


async def wait_backend(stub: cache_pb2_grpc.CacheServiceStub, backend: str) -> cache_pb2.CacheStats:
    deadline = asyncio.get_running_loop().time() + RECOVERY_TIMEOUT
    while True:
        stats = await stub.Stats(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
        if stats.backend == backend:
            return stats
        assert asyncio.get_running_loop().time() < deadline, f"backend still {stats.backend}, expected {backend}"
        await asyncio.sleep(0.05)


async def wait_state(store: FallbackStore, state: str) -> None:
    deadline = asyncio.get_running_loop().time() + RECOVERY_TIMEOUT
    while store.state != state:
        assert asyncio.get_running_loop().time() < deadline, f"store still {store.state}, expected {state}"
        await asyncio.sleep(0.05)


class Calls:
    """The gRPC calls of a load test: counted, and failures recorded, not raised."""

    def __init__(self) -> None:
        self.count = 0
        self.failures: list[str] = []

    async def __call__(self, stub: cache_pb2_grpc.CacheServiceStub, method: str, request):
        self.count += 1
        try:
            return await getattr(stub, method)(request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            self.failures.append(f"{method}: {exc.code().name} {exc.details()}")
            return None


@pytest.fixture
async def sidecar_stub(start_sidecar: StartSidecar, redis_server: RedisServer):
    await redis_server.wait_ready()
    sidecar = await start_sidecar(redis_url=redis_server.url)
    async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
        yield sidecar, cache_pb2_grpc.CacheServiceStub(channel)


@pytest.fixture
async def fallback(redis_server: RedisServer):
    """A FallbackStore on the private Redis, for what is easier to drive directly."""
    async with fallback_on(redis_server) as store:
        yield store


@contextlib.asynccontextmanager
async def fallback_on(redis_server: RedisServer) -> AsyncIterator[FallbackStore]:
    """A started FallbackStore on a private Redis, with a position in the log."""
    await redis_server.wait_ready()
    primary = RedisStore(connect(redis_server.url, max_connections=8, timeout=0.25), default_ttl=60,
                         layout=KeyLayout("dh:"))
    store = FallbackStore(
        primary,
        MemoryBackend(MemoryStore(max_entries=1000, max_bytes=1 << 20, default_ttl=60)),
        memory_ttl=5,
        journal_size=3,
        probe_initial=0.05,
        probe_max=0.2,
    )
    await store.start()
    await store.sync(0, 0, (), False)  # a position, so Redis hands out fill tokens
    try:
        yield store
    finally:
        await store.close()


async def test_redis_killed_under_load_fails_no_call_and_serves_nothing_stale(
    sidecar_stub, redis_server: RedisServer
) -> None:
    sidecar, stub = sidecar_stub
    keys = [f"agents:get:{i}" for i in range(20)]
    database = dict.fromkeys(keys, 0)  # the source of truth: a version per key
    call = Calls()
    running = True

    async def reader() -> None:
        while running:
            key = random.choice(keys)
            got = await call(stub, "Get", cache_pb2.CacheGetRequest(key=key))
            if got is not None and not got.found and got.fill_token:  # no token: no fill
                loaded = str(database[key]).encode()  # the loader reads the database
                await asyncio.sleep(0)
                await call(stub, "Set", cache_pb2.CacheSetRequest(entry=entry(key, loaded), fill_token=got.fill_token))

    async def writer() -> None:
        while running:
            key = random.choice(keys)
            database[key] += 1  # the write commits, then invalidates
            if random.random() < 0.2:
                await call(stub, "Invalidate", cache_pb2.CacheInvalidateRequest(pattern="agents:*"))
            else:
                await call(stub, "Delete", cache_pb2.CacheDeleteRequest(key=key))
            await asyncio.sleep(0.005)

    load = [asyncio.create_task(reader()) for _ in range(8)] + [asyncio.create_task(writer()) for _ in range(2)]
    try:
        await asyncio.sleep(0.5)
        redis_server.kill()
        await wait_backend(stub, "memory")
        await asyncio.sleep(0.5)
        redis_server.start()
        await wait_backend(stub, "redis")
        await asyncio.sleep(0.5)
    finally:
        running = False
        await asyncio.gather(*load)

    assert call.failures == [] and call.count > 100
    for key in keys:
        got = await stub.Get(cache_pb2.CacheGetRequest(key=key), timeout=CALL_TIMEOUT)
        assert not got.found or got.entry.value == str(database[key]).encode(), f"{key} is stale"
    stats = await stub.Stats(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
    assert stats.backend == "redis" and stats.backend_switches >= 2 and stats.backend_errors >= 1


async def test_what_was_invalidated_while_redis_was_away_is_never_served(
    sidecar_stub, redis_server: RedisServer
) -> None:
    """SIGSTOP keeps Redis's data: when it answers again it still holds the entries
    invalidated meanwhile, and the sidecar must replay those invalidations first."""
    sidecar, stub = sidecar_stub
    keys = ["agents:get:1", "agents:get:2", "agents:get:3", "agents:get:4", "agents:list:a", "agents:list:b", "workflows:get:1"]
    await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=[entry(key, b"old") for key in keys]), timeout=CALL_TIMEOUT)

    redis_server.freeze()
    try:
        # Every call answers (from memory once Redis times out); none fails.
        await stub.Delete(cache_pb2.CacheDeleteRequest(key="agents:get:1"), timeout=CALL_TIMEOUT)
        await stub.Delete(cache_pb2.CacheDeleteRequest(key="agents:get:?"), timeout=CALL_TIMEOUT)  # a key, not a glob
        await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="agents:list:*"), timeout=CALL_TIMEOUT)
        await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="agents:get:[23]"), timeout=CALL_TIMEOUT)
        during = await stub.Stats(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
        assert (during.backend, during.backend_switches) == ("memory", 1)
        assert sidecar.store.journal == ("agents:get:1", "agents:get:[?]", "agents:list:*", "agents:get:[23]")
        missed = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:4"), timeout=CALL_TIMEOUT)
        assert not missed.found  # memory starts empty: nothing it could serve is stale
    finally:
        redis_server.thaw()

    after = await wait_backend(stub, "redis")
    assert after.backend_switches == 2 and sidecar.store.journal == ()
    found = await stub.GetMany(cache_pb2.CacheGetManyRequest(keys=keys), timeout=CALL_TIMEOUT)
    # Only what was never invalidated is still there: the replay was exact, not a clear.
    assert sorted(e.key for e in found.entries) == ["agents:get:4", "workflows:get:1"]


async def test_the_position_is_memorys_while_away_and_redis_own_after(sidecar_stub, redis_server: RedisServer) -> None:
    """On memory the position starts fresh (memory is empty at the switch) and moves
    with memory; back on Redis it is Redis's own again, which the journal replay does
    not move (the relays send what lies after it again), while the patterns synced
    meanwhile have reached Redis."""
    sidecar, stub = sidecar_stub
    await stub.Sync(cache_pb2.CacheSyncRequest(after=0, through=10), timeout=CALL_TIMEOUT)
    keys = ["agents:get:1", "agents:get:2", "agents:list:a"]
    await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=[entry(key, b"old") for key in keys]), timeout=CALL_TIMEOUT)

    redis_server.freeze()
    try:
        assert not (await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:2"), timeout=CALL_TIMEOUT)).found
        assert (await stub.Stats(empty_pb2.Empty(), timeout=CALL_TIMEOUT)).backend == "memory"
        away = await stub.GetSyncState(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
        assert away.fresh
        assert (await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:3"), timeout=CALL_TIMEOUT)).fill_token == 0
        synced = await stub.Sync(
            cache_pb2.CacheSyncRequest(after=0, through=20, patterns=["agents:list:*"]), timeout=CALL_TIMEOUT
        )
        assert (synced.applied, synced.fresh) == (20, False)
        await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="agents:get:1", sequence=21), timeout=CALL_TIMEOUT)
        assert (await stub.GetSyncState(empty_pb2.Empty(), timeout=CALL_TIMEOUT)).applied == 21
        miss = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:3"), timeout=CALL_TIMEOUT)
        filled = await stub.Set(
            cache_pb2.CacheSetRequest(entry=entry("agents:get:3", b"new"), fill_token=miss.fill_token), timeout=CALL_TIMEOUT
        )
        assert filled.stored  # memory has a position now: it takes fills
    finally:
        redis_server.thaw()

    await wait_backend(stub, "redis")
    back = await stub.GetSyncState(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
    assert (back.applied, list(back.ahead), back.fresh) == (10, [], False)
    found = await stub.GetMany(cache_pb2.CacheGetManyRequest(keys=keys), timeout=CALL_TIMEOUT)
    assert [e.key for e in found.entries] == ["agents:get:2"]


async def test_a_fill_token_from_redis_is_refused_once_memory_serves(fallback: FallbackStore,
                                                                   redis_server: RedisServer) -> None:
    miss = await fallback.get("agents:get:1")
    assert fallback.backend == "redis"
    redis_server.freeze()
    try:
        assert await fallback.set("agents:get:1", b"loaded before", "", fill_token=miss.fill_token) is False
        assert fallback.backend == "memory"
        assert (await fallback.get("agents:get:1")).entry is None
    finally:
        redis_server.thaw()


async def test_too_many_invalidations_while_away_clear_redis_on_return(
    fallback: FallbackStore, redis_server: RedisServer
) -> None:
    await fallback.set("agents:get:1", b"v", "")
    await fallback.set("workflows:get:1", b"v", "")
    redis_server.freeze()
    try:
        for i in range(4):  # the journal holds 3
            await fallback.invalidate(f"other:{i}:*")
        assert fallback.journal == ()
    finally:
        redis_server.thaw()
    await wait_state(fallback, "up")
    # Nothing journaled could be replayed, so everything went, untouched keys included.
    assert await fallback.get_many(["agents:get:1", "workflows:get:1"]) == {}


async def test_a_restarted_redis_is_cleared_before_use(
    fallback: FallbackStore, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.cache_sidecar.stores.fallback")
    await fallback.set("agents:get:1", b"v", "")
    redis_server.kill()
    assert (await fallback.get("agents:get:1")).entry is None  # served by memory, no error
    assert fallback.backend == "memory"
    redis_server.start()
    await wait_state(fallback, "up")
    assert any("restarted" in record.message for record in caplog.records)
    # It lost its position with its data: fresh, so no fills until a Sync.
    assert (await fallback.sync_state()).fresh
    miss = await fallback.get("agents:get:1")
    assert miss.entry is None and miss.fill_token == 0
    await fallback.sync(0, 5, (), False)
    miss = await fallback.get("agents:get:1")
    assert await fallback.set("agents:get:1", b"v2", "", fill_token=miss.fill_token) is True
    assert (await fallback.get("agents:get:1")).entry.value == b"v2"


async def test_a_restarted_redis_that_reloaded_its_data_is_cleared_and_fresh(persistent_redis_server: RedisServer) -> None:
    """A Redis that comes back with its data (here from its append-only file) may hold
    entries invalidated while it was away, and a position that says otherwise: it is
    emptied, and made fresh, so it takes no fill until the relays Sync it again."""
    async with fallback_on(persistent_redis_server) as store:
        await store.sync(0, 10, (), False)
        await store.set("agents:get:1", b"old", "")
        inspector = aioredis.Redis.from_url(persistent_redis_server.url)
        await inspector.set("outside:marker", b"1")  # nobody clears it: shows the reload
        await inspector.aclose()
        persistent_redis_server.kill()
        await store.invalidate("agents:get:1")  # on memory: Redis is away
        assert store.backend == "memory"
        persistent_redis_server.start()
        await persistent_redis_server.wait_ready()
        await wait_state(store, "up")
        inspector = aioredis.Redis.from_url(persistent_redis_server.url)
        try:
            assert await inspector.get("outside:marker") == b"1"
        finally:
            await inspector.aclose()
        assert (await store.sync_state()).fresh
        miss = await store.get("agents:get:1")
        assert miss.entry is None and miss.fill_token == 0


async def test_a_sidecar_started_while_redis_is_down_uses_it_once_it_is_up(
    start_sidecar: StartSidecar, redis_server: RedisServer
) -> None:
    redis_server.kill()
    sidecar = await start_sidecar(redis_url=redis_server.url, wait_for_relay=False)
    assert sidecar.relay is not None and not sidecar.relay.subscribed.is_set()
    async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        assert (await stub.Stats(empty_pb2.Empty(), timeout=CALL_TIMEOUT)).backend == "memory"
        await stub.Set(cache_pb2.CacheSetRequest(entry=entry("agents:get:1", b"in memory")), timeout=CALL_TIMEOUT)
        redis_server.start()
        await wait_backend(stub, "redis")
        await asyncio.wait_for(sidecar.relay.subscribed.wait(), RECOVERY_TIMEOUT)
        got = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"), timeout=CALL_TIMEOUT)
        assert not got.found  # memory was given back on the switch
        await stub.Set(cache_pb2.CacheSetRequest(entry=entry("agents:get:1", b"in redis")), timeout=CALL_TIMEOUT)
        got = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"), timeout=CALL_TIMEOUT)
        assert got.entry.value == b"in redis"


class LogRelay:
    """The services' side, in small: a log of invalidations (seq i+1 is log[i]) and a
    relay that Syncs each sidecar from its position, as the services' relays do."""

    def __init__(self, stubs: list[cache_pb2_grpc.CacheServiceStub]) -> None:
        self.log: list[str] = []
        self._stubs = stubs

    def append(self, pattern: str) -> int:
        self.log.append(pattern)
        return len(self.log)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for stub in self._stubs:
                try:
                    await self._sync(stub)
                except grpc.aio.AioRpcError:
                    pass  # FAILED_PRECONDITION: the position moved; read it again next turn
            await asyncio.sleep(0.05)

    async def _sync(self, stub: cache_pb2_grpc.CacheServiceStub) -> None:
        state = await stub.GetSyncState(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
        head = len(self.log)  # read after the state, as the services' relays do
        if state.fresh:
            await stub.Sync(cache_pb2.CacheSyncRequest(after=0, through=head), timeout=CALL_TIMEOUT)
            return
        through = min(head, state.applied + 500)
        if through <= state.applied:
            return
        ahead = set(state.ahead)
        patterns = [self.log[seq - 1] for seq in range(state.applied + 1, through + 1) if seq not in ahead]
        await stub.Sync(
            cache_pb2.CacheSyncRequest(after=state.applied, through=through, patterns=list(dict.fromkeys(patterns))),
            timeout=CALL_TIMEOUT,
        )


@pytest.mark.parametrize("sidecars", [1, 2])
@pytest.mark.parametrize("fault", ["kill", "freeze"])
async def test_back_on_redis_within_two_seconds_under_continuous_invalidations(
    start_sidecar: StartSidecar, redis_server: RedisServer, fault: str, sidecars: int
) -> None:
    """Writers invalidate without pause through every sidecar while Redis goes away
    and comes back: each sidecar is back on Redis within 2 s of Redis answering, and
    no read returns a value older than a write acknowledged before the read began
    (with one sidecar, at any time; with two, once both are back, since a sidecar on
    memory cannot hear the other). Afterwards the sidecars agree."""
    await redis_server.wait_ready()
    started = [await start_sidecar(redis_url=redis_server.url) for _ in range(sidecars)]
    channels = [grpc.aio.insecure_channel(sidecar.host.bound_address) for sidecar in started]
    stubs = [cache_pb2_grpc.CacheServiceStub(channel) for channel in channels]
    relay = LogRelay(stubs)
    keys = [f"agents:get:{i}" for i in range(30)]
    database = dict.fromkeys(keys, 0)  # the source of truth: a version per key
    acked = dict.fromkeys(keys, 0)  # the version whose invalidation was acknowledged
    stale: list[str] = []
    call = Calls()
    checking = sidecars == 1
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            key = random.choice(keys)
            database[key] += 1  # the write commits, is logged, then invalidates
            version = database[key]
            sequence = relay.append(key)
            request = cache_pb2.CacheInvalidateRequest(pattern=key, sequence=sequence)
            if await call(random.choice(stubs), "Invalidate", request) is not None:
                acked[key] = max(acked[key], version)
            await asyncio.sleep(0.002)

    async def reader() -> None:
        while not stop.is_set():
            key, stub = random.choice(keys), random.choice(stubs)
            before, judged = acked[key], checking
            got = await call(stub, "Get", cache_pb2.CacheGetRequest(key=key))
            if got is None:
                continue
            if got.found:
                if judged and int(got.entry.value) < before:
                    stale.append(f"{key}: {got.entry.value!r} after version {before} was acknowledged")
            elif got.fill_token:
                loaded = str(database[key]).encode()
                await asyncio.sleep(0)
                await call(stub, "Set", cache_pb2.CacheSetRequest(entry=entry(key, loaded), fill_token=got.fill_token))

    load = [asyncio.create_task(task()) for task in [writer] * 4 + [reader] * 6]
    load.append(asyncio.create_task(relay.run(stop)))
    try:
        await asyncio.sleep(0.5)
        redis_server.kill() if fault == "kill" else redis_server.freeze()
        for stub in stubs:
            await wait_backend(stub, "memory")
        await asyncio.sleep(1.0)  # the outage, under load
        if fault == "kill":
            redis_server.start()
        else:
            redis_server.thaw()
        await redis_server.wait_ready()
        answering = asyncio.get_running_loop().time()
        for stub in stubs:
            await wait_backend(stub, "redis")
        recovered_in = asyncio.get_running_loop().time() - answering
        checking = True
        written = len(relay.log)
        await asyncio.sleep(1.0)  # and on Redis again, under the same load
        assert len(relay.log) > written, "the write load did not continue after the recovery"
    finally:
        stop.set()
        await asyncio.gather(*load)

    assert recovered_in <= 2.0, f"back on Redis {recovered_in:.2f}s after it answered"
    assert call.failures == []
    assert stale == []
    for key in keys:
        answers = [await stub.Get(cache_pb2.CacheGetRequest(key=key), timeout=CALL_TIMEOUT) for stub in stubs]
        served = {(got.found, got.entry.value if got.found else None) for got in answers}
        assert len(served) == 1, f"the sidecars disagree on {key}: {served}"
        found, value = served.pop()
        assert not found or value == str(database[key]).encode(), f"{key} is stale: {value!r}"
    for sidecar in started:
        await asyncio.wait_for(sidecar.relay.subscribed.wait(), RECOVERY_TIMEOUT)
    if sidecars == 2:
        # The Pub/Sub relay is back: an invalidation through one reaches the other's streams.
        watch = stubs[0].Watch(cache_pb2.CacheWatchRequest(prefixes=["agents:"]))
        assert (await asyncio.wait_for(watch.read(), CALL_TIMEOUT)).sequence == 1
        await stubs[1].Invalidate(cache_pb2.CacheInvalidateRequest(pattern="agents:list:*"), timeout=CALL_TIMEOUT)
        heard = await asyncio.wait_for(watch.read(), CALL_TIMEOUT)
        assert (heard.pattern, heard.sequence) == ("agents:list:*", 2)
        watch.cancel()
    for channel in channels:
        await channel.close()
