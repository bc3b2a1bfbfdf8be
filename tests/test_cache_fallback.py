"""Redis failing under the sidecar: killed, frozen, restarted (empty or from its
append-only file), down at start. A private redis-server per test (its own port),
started and signalled here, never the machine's shared one.

What Redis missed while away is in the invalidation log: the tests play the services'
relays, reading GetSyncState and sending Sync from that position, as they do."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from devops_hub.v1 import cache_pb2, cache_pb2_grpc
from google.protobuf import empty_pb2

from services.cache.sidecar.stores.fallback import FallbackStore
from services.cache.sidecar.stores.memory import MemoryStore
from services.cache.sidecar.stores.redis import RedisStore, connect
from services.cache.sidecar.stores.redis_layout import KeyLayout
from tests.support.cache import StartSidecar, entry
from tests.support.redis_servers import RedisServer

CALL_TIMEOUT = 5.0
RECOVERY_TIMEOUT = 20.0
REDIS_TIMEOUT = 0.25


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
        await asyncio.sleep(0.02)


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


class Log:
    """The services' side, in small: an invalidation log (entry i is patterns[i - 1])
    and a relay that Syncs a store from the position it reports, as the relays do."""

    def __init__(self, entries: int = 0) -> None:
        self.patterns: list[str] = ["unused:seed"] * entries

    def append(self, pattern: str) -> int:
        self.patterns.append(pattern)
        return len(self.patterns)

    def span(self, applied: int, through: int) -> list[str]:
        return list(dict.fromkeys(self.patterns[applied:through]))

    async def relay(self, store: FallbackStore) -> None:
        """GetSyncState, then Sync what lies after it (everything, from fresh)."""
        state = await store.sync_state()
        head = len(self.patterns)
        if state.fresh:
            await store.sync(0, head, (), False)
        elif head > state.applied:
            await store.sync(state.applied, head, self.span(state.applied, head), False)

    async def relay_stub(self, stub: cache_pb2_grpc.CacheServiceStub) -> cache_pb2.CacheSyncState:
        state = await stub.GetSyncState(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
        head = len(self.patterns)  # read after the state, as the relays do
        if state.fresh:
            return await stub.Sync(cache_pb2.CacheSyncRequest(after=0, through=head), timeout=CALL_TIMEOUT)
        through = min(head, state.applied + 500)
        if through <= state.applied:
            return state
        request = cache_pb2.CacheSyncRequest(after=state.applied, through=through, patterns=self.span(state.applied, through))
        return await stub.Sync(request, timeout=CALL_TIMEOUT)


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
async def fallback_on(redis_server: RedisServer, position: int = 10) -> AsyncIterator[FallbackStore]:
    """A started FallbackStore on a private Redis, at `position` in the log."""
    await redis_server.wait_ready()
    primary = RedisStore(connect(redis_server.url, max_connections=8, timeout=REDIS_TIMEOUT), default_ttl=60,
                         layout=KeyLayout("dh:"))
    store = FallbackStore(primary, MemoryStore(max_entries=1000, max_bytes=1 << 20, default_ttl=60), memory_ttl=5)
    with pytest.MonkeyPatch.context() as patch:
        # Probes quicker than production's, for the tests' patience.
        patch.setattr("services.cache.sidecar.stores.fallback.PROBE_INITIAL", 0.05)
        patch.setattr("services.cache.sidecar.stores.fallback.PROBE_MAX", 0.2)
        await store.start()
        await store.sync(0, position, (), False)
        try:
            yield store
        finally:
            await store.close()


async def fill(store: FallbackStore, key: str, value: bytes = b"v") -> bool:
    lookup = await store.get(key)
    return await store.set(key, value, "", version=lookup.position)


async def test_a_frozen_redis_keeps_no_caller_waiting(sidecar_stub, redis_server: RedisServer) -> None:
    """SIGSTOP: connections stay open and nothing answers. The calls in flight are
    answered from memory within the Redis timeout, and no later call waits on Redis."""
    sidecar, stub = sidecar_stub
    await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=[entry("agents:get:1", b"v")]), timeout=CALL_TIMEOUT)
    redis_server.freeze()
    try:
        async def timed_get(key: str) -> float:
            started = time.monotonic()
            got = await stub.Get(cache_pb2.CacheGetRequest(key=key), timeout=CALL_TIMEOUT)
            assert not got.found  # memory starts empty
            return time.monotonic() - started

        first = await asyncio.gather(*(timed_get(f"agents:get:{i}") for i in range(20)))
        later = [await timed_get(f"agents:get:{i}") for i in range(20)]
        stats = await stub.Stats(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
    finally:
        redis_server.thaw()
    # The Redis timeout, plus a margin for a shared test machine.
    assert max(first) < REDIS_TIMEOUT + 0.35, first
    assert max(later) < 0.1, later  # on memory: Redis is not asked
    assert (stats.backend, stats.backend_switches) == ("memory", 1)


async def test_what_was_invalidated_while_redis_was_away_is_never_served(
    sidecar_stub, redis_server: RedisServer
) -> None:
    """SIGSTOP keeps Redis's data: when it answers again it still holds entries that
    log entries invalidated meanwhile. It is told its own position (the relays send it
    what it missed), reads stay on memory until it has caught up, then it serves."""
    sidecar, stub = sidecar_stub
    log = Log(10)
    await log.relay_stub(stub)
    keys = ["agents:get:1", "agents:get:2", "agents:get:3", "agents:get:4", "agents:list:a", "agents:list:b", "workflows:get:1"]
    for key in keys:  # filled at 10
        miss = await stub.Get(cache_pb2.CacheGetRequest(key=key), timeout=CALL_TIMEOUT)
        assert miss.position == 10
        filled = await stub.Set(cache_pb2.CacheSetRequest(entry=entry(key, b"old"), fill=True), timeout=CALL_TIMEOUT)
        assert not filled.stored  # version 0: read before the position, refused
        request = cache_pb2.CacheSetRequest(entry=cache_pb2.CacheEntry(key=key, value=b"old", version=10), fill=True)
        assert (await stub.Set(request, timeout=CALL_TIMEOUT)).stored

    redis_server.freeze()
    try:
        assert not (await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:4"), timeout=CALL_TIMEOUT)).found
        away = await stub.GetSyncState(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
        assert away.fresh  # memory, empty since the switch
        for pattern in ("agents:get:1", "agents:list:*", "agents:get:2"):
            log.append(pattern)
        synced = await log.relay_stub(stub)  # from fresh: memory takes the head, 13
        assert (synced.applied, synced.fresh) == (13, False)
        log.append("agents:get:3")
        assert (await log.relay_stub(stub)).applied == 14
        during = await stub.Stats(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
        assert (during.backend, during.backend_switches) == ("memory", 1)
    finally:
        redis_server.thaw()

    await wait_state(sidecar.store, "recovering")
    behind = await stub.GetSyncState(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
    assert (behind.applied, behind.fresh) == (10, False)  # Redis's own position
    assert (await stub.Stats(empty_pb2.Empty(), timeout=CALL_TIMEOUT)).backend == "memory"
    assert not (await stub.Get(cache_pb2.CacheGetRequest(key="workflows:get:1"), timeout=CALL_TIMEOUT)).found
    assert (await log.relay_stub(stub)).applied == 14  # the entries 11..14 reach Redis
    after = await wait_backend(stub, "redis")
    assert after.backend_switches == 2
    found = await stub.GetMany(cache_pb2.CacheGetManyRequest(keys=keys), timeout=CALL_TIMEOUT)
    # Only what was never invalidated is still there: the catch-up was exact, not a clear.
    assert sorted(e.key for e in found.entries) == ["agents:get:4", "workflows:get:1"]


async def test_a_fill_read_on_redis_is_refused_once_memory_serves(fallback: FallbackStore,
                                                                 redis_server: RedisServer) -> None:
    miss = await fallback.get("agents:get:1")
    assert fallback.backend == "redis" and miss.position == 10
    redis_server.freeze()
    try:
        assert await fallback.set("agents:get:1", b"loaded before", "", version=miss.position) is False
        assert fallback.backend == "memory" and (await fallback.sync_state()).fresh
        await Log(11).relay(fallback)  # memory takes the head, 11, as its floor
        assert await fallback.set("agents:get:1", b"loaded before", "", version=miss.position) is False
        assert (await fallback.get("agents:get:1")).entry is None
        assert await fill(fallback, "agents:get:1", b"read at 11") is True
        assert (await fallback.get("agents:get:1")).entry.value == b"read at 11"
    finally:
        redis_server.thaw()


async def test_invalidations_outside_the_log_while_away_clear_redis_before_use(
    fallback: FallbackStore, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.cache.sidecar.stores.fallback")
    assert await fill(fallback, "agents:get:1")
    assert await fill(fallback, "workflows:get:1")
    redis_server.freeze()
    try:
        await fallback.remove(["other:*"])  # an operator's: the log cannot send it again
        assert fallback.backend == "memory"
    finally:
        redis_server.thaw()
    await wait_state(fallback, "up")
    assert any("clearing it" in record.message for record in caplog.records)
    # Redis cannot be told what it missed: everything went, untouched keys included.
    assert await fallback.get_many(["agents:get:1", "workflows:get:1"]) == {}
    assert (await fallback.sync_state()).applied == 10  # a clear keeps the position


async def test_a_redis_restarted_empty_is_fresh_and_cleared_by_its_first_sync(
    fallback: FallbackStore, redis_server: RedisServer
) -> None:
    assert await fill(fallback, "agents:get:1")
    redis_server.kill()
    assert (await fallback.get("agents:get:1")).entry is None  # served by memory, no error
    assert fallback.backend == "memory"
    log = Log(10)
    log.append("agents:get:2")
    await log.relay(fallback)  # memory takes 11
    redis_server.start()
    await redis_server.wait_ready()
    await wait_state(fallback, "recovering")
    # It lost its position with its data: the relays see it fresh and Sync it from 0.
    assert (await fallback.sync_state()).fresh
    assert fallback.backend == "memory"
    await log.relay(fallback)
    await wait_state(fallback, "up")
    assert (await fallback.sync_state()).applied == 11
    assert (await fallback.get("agents:get:1")).entry is None
    assert await fill(fallback, "agents:get:1", b"v2") is True
    assert (await fallback.get("agents:get:1")).entry.value == b"v2"


async def test_a_redis_restarted_from_its_snapshot_is_sent_what_it_missed(persistent_redis_server: RedisServer) -> None:
    """A Redis that comes back with its data (here from its append-only file) has the
    position it had then: the relays send it the entries after it, and what those
    invalidated is never served; what they did not name stays."""
    async with fallback_on(persistent_redis_server) as store:
        for key in ("agents:get:1", "agents:get:2"):
            assert await fill(store, key, b"old")
        persistent_redis_server.kill()
        log = Log(10)
        log.append("agents:get:1")
        await store.get("agents:get:1")  # on memory now
        assert store.backend == "memory"
        await log.relay(store)
        log.append("workflows:*")
        await log.relay(store)
        persistent_redis_server.start()
        await persistent_redis_server.wait_ready()
        await wait_state(store, "recovering")
        assert await store.sync_state() == (await store.primary.sync_state())
        assert (await store.sync_state()).applied == 10
        await log.relay(store)
        await wait_state(store, "up")
        assert (await store.get("agents:get:1")).entry is None
        assert (await store.get("agents:get:2")).entry.value == b"old"


async def test_a_sidecar_started_while_redis_is_down_uses_it_once_it_is_synced(
    start_sidecar: StartSidecar, redis_server: RedisServer
) -> None:
    redis_server.kill()
    sidecar = await start_sidecar(redis_url=redis_server.url, wait_for_relay=False)  # synced to 0: memory
    assert sidecar.peers is not None and not sidecar.peers.subscribed.is_set()
    async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        assert (await stub.Stats(empty_pb2.Empty(), timeout=CALL_TIMEOUT)).backend == "memory"
        await stub.Set(cache_pb2.CacheSetRequest(entry=entry("agents:get:1", b"in memory")), timeout=CALL_TIMEOUT)
        redis_server.start()
        await redis_server.wait_ready()
        await wait_state(sidecar.store, "recovering")
        assert (await stub.GetSyncState(empty_pb2.Empty(), timeout=CALL_TIMEOUT)).fresh  # Redis's
        await Log().relay_stub(stub)
        await wait_backend(stub, "redis")
        await asyncio.wait_for(sidecar.peers.subscribed.wait(), RECOVERY_TIMEOUT)
        got = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"), timeout=CALL_TIMEOUT)
        assert not got.found  # memory was given back on the switch (and its Set was outside the log)
        await stub.Set(cache_pb2.CacheSetRequest(entry=entry("agents:get:1", b"in redis")), timeout=CALL_TIMEOUT)
        got = await stub.Get(cache_pb2.CacheGetRequest(key="agents:get:1"), timeout=CALL_TIMEOUT)
        assert got.entry.value == b"in redis"


@pytest.mark.parametrize("sidecars", [1, 2])
@pytest.mark.parametrize("fault", ["kill", "freeze"])
async def test_back_on_redis_within_two_seconds_under_continuous_invalidations(
    start_sidecar: StartSidecar, redis_server: RedisServer, fault: str, sidecars: int
) -> None:
    """Writers write without pause (a log entry each, Synced to the sidecar they use
    before the write counts as acknowledged) while Redis goes away and comes back:
    each sidecar is back on Redis within 2 s of Redis answering, and no read returns
    a value older than a write acknowledged before the read began (with one sidecar,
    at any time; with two, once both are back, since a sidecar on memory cannot hear
    the other). Afterwards the sidecars agree."""
    await redis_server.wait_ready()
    started = [await start_sidecar(redis_url=redis_server.url) for _ in range(sidecars)]
    channels = [grpc.aio.insecure_channel(sidecar.host.bound_address) for sidecar in started]
    stubs = [cache_pb2_grpc.CacheServiceStub(channel) for channel in channels]
    log = Log()
    keys = [f"agents:get:{i}" for i in range(30)]
    database = dict.fromkeys(keys, 0)  # the source of truth: a version per key
    acked = dict.fromkeys(keys, 0)  # the newest version whose invalidation a sidecar applied
    stale: list[str] = []
    call = Calls()
    checking = sidecars == 1
    stop = asyncio.Event()

    async def relay(stub: cache_pb2_grpc.CacheServiceStub, seq: int) -> bool:
        """Syncs until the sidecar has applied `seq` (another relay's Sync may move the
        position between our GetSyncState and Sync: that is a retry, not a failure)."""
        for _ in range(50):
            try:
                if (await log.relay_stub(stub)).applied >= seq:
                    return True
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    call.failures.append(f"Sync: {exc.code().name} {exc.details()}")
                    return False
        return False

    async def writer() -> None:
        while not stop.is_set():
            key = random.choice(keys)
            database[key] += 1  # the write commits and appends its log entry
            version = database[key]
            seq = log.append(key)
            if await relay(random.choice(stubs), seq):
                acked[key] = max(acked[key], version)
            await asyncio.sleep(0.002)

    async def background_relay() -> None:
        """The relays' periodic round: every sidecar, every 50 ms."""
        while not stop.is_set():
            for stub in stubs:
                await relay(stub, 0)
            await asyncio.sleep(0.05)

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
            else:
                loaded = str(database[key]).encode()  # read after the Get: at its position or later
                await asyncio.sleep(0)
                filled = cache_pb2.CacheEntry(key=key, value=loaded, version=got.position)
                await call(stub, "Set", cache_pb2.CacheSetRequest(entry=filled, fill=True))

    load = [asyncio.create_task(task()) for task in [writer] * 4 + [reader] * 6 + [background_relay]]
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
        written = len(log.patterns)
        await asyncio.sleep(1.0)  # and on Redis again, under the same load
        assert len(log.patterns) > written, "the write load did not continue after the recovery"
    finally:
        stop.set()
        if fault == "freeze":
            redis_server.thaw()
        await asyncio.gather(*load)

    assert recovered_in <= 2.0, f"back on Redis {recovered_in:.2f}s after it answered"
    assert call.failures == []
    assert call.count > 100
    assert stale == []
    for stub in stubs:
        await log.relay_stub(stub)
    for key in keys:
        answers = [await stub.Get(cache_pb2.CacheGetRequest(key=key), timeout=CALL_TIMEOUT) for stub in stubs]
        served = {(got.found, got.entry.value if got.found else None) for got in answers}
        assert len(served) == 1, f"the sidecars disagree on {key}: {served}"
        found, value = served.pop()
        assert not found or value == str(database[key]).encode(), f"{key} is stale: {value!r}"
    for sidecar in started:
        assert sidecar.peers is not None
        await asyncio.wait_for(sidecar.peers.subscribed.wait(), RECOVERY_TIMEOUT)
    if sidecars == 2:
        # Peers hear each other again: an invalidation through one reaches the other's streams.
        watch = stubs[0].Watch(cache_pb2.CacheWatchRequest(prefixes=["agents:"]))
        first = await asyncio.wait_for(watch.read(), CALL_TIMEOUT)
        assert first.after == first.through and not first.patterns  # the opening heartbeat
        await stubs[1].Invalidate(cache_pb2.CacheInvalidateRequest(pattern="agents:list:*"), timeout=CALL_TIMEOUT)
        heard = await asyncio.wait_for(watch.read(), CALL_TIMEOUT)
        while not heard.patterns:
            heard = await asyncio.wait_for(watch.read(), CALL_TIMEOUT)
        assert list(heard.patterns) == ["agents:list:*"] and heard.after == heard.through
        watch.cancel()
    for channel in channels:
        await channel.close()
