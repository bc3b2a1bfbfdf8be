"""The cache on a Redis Cluster: three masters of the test's own on loopback
(tests/support/redis_servers.py), sidecars with REDIS_URL=redis://…?cluster=true.

Every script's keys share a slot (the namespace's hash tag), namespaces spread over
the masters, the position lives in a slot of its own and PUBLISH reaches every node:
the same coherence rules must hold as on one Redis."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis
from devops_hub.v1 import cache_pb2, cache_pb2_grpc
from google.protobuf import empty_pb2
from redis.asyncio.cluster import RedisCluster

from devstack.cluster import Cluster, Unavailable
from devstack.coherence import check
from services.cache.sidecar.server import CacheSidecar
from services.cache.sidecar.stores.redis_layout import KeyLayout
from tests.support import eventually, unavailable
from tests.support.cache import StartSidecar
from tests.support.redis_servers import RedisClusterServers, redis_cluster  # noqa: F401 - the fixture

CALL_TIMEOUT = 5.0
LAYOUT = KeyLayout("dh:")


def namespaces_on_every_node(cluster: RedisClusterServers) -> list[str]:
    """One namespace per master (CLUSTER KEYSLOT of its data key, CLUSTER SLOTS)."""
    chosen: dict[int, str] = {}
    for i in range(200):
        namespace = f"ns{i}"
        chosen.setdefault(cluster.node_of(LAYOUT.data_key(f"{namespace}:get:1")), namespace)
        if len(chosen) == len(cluster.ports):
            return [chosen[port] for port in sorted(chosen)]
    raise AssertionError(f"200 namespaces landed on {len(chosen)} of {len(cluster.ports)} masters")


async def start_on(start_sidecar: StartSidecar, cluster: RedisClusterServers) -> tuple[CacheSidecar, cache_pb2_grpc.CacheServiceStub]:
    sidecar = await start_sidecar(redis_url=cluster.url, redis_key_prefix=LAYOUT.prefix)
    channel = grpc.aio.insecure_channel(sidecar.host.bound_address)
    return sidecar, cache_pb2_grpc.CacheServiceStub(channel)


async def get(stub: cache_pb2_grpc.CacheServiceStub, key: str) -> cache_pb2.CacheGetResponse:
    return await stub.Get(cache_pb2.CacheGetRequest(key=key), timeout=CALL_TIMEOUT)


async def fill(stub: cache_pb2_grpc.CacheServiceStub, key: str, value: bytes, version: int) -> bool:
    request = cache_pb2.CacheSetRequest(entry=cache_pb2.CacheEntry(key=key, value=value, version=version), fill=True)
    return (await stub.Set(request, timeout=CALL_TIMEOUT)).stored


async def sync(stub: cache_pb2_grpc.CacheServiceStub, after: int, through: int, *patterns: str, clear: bool = False):
    request = cache_pb2.CacheSyncRequest(after=after, through=through, patterns=patterns, clear=clear)
    return await stub.Sync(request, timeout=CALL_TIMEOUT)


async def sync_state(stub: cache_pb2_grpc.CacheServiceStub) -> cache_pb2.CacheSyncState:
    return await stub.GetSyncState(empty_pb2.Empty(), timeout=CALL_TIMEOUT)


async def records(cluster: RedisClusterServers) -> set[str]:
    """The keys of every value or negative entry left on any master (SCAN on each;
    tombstones left out)."""
    client = RedisCluster.from_url(cluster.url.removesuffix("?cluster=true"))
    try:
        names = [name async for name in client.scan_iter(match=LAYOUT.data_match(""))]
        return {str(LAYOUT.logical_key(name)) for name in names if not (await client.get(name) or b"T").startswith(b"T")}
    finally:
        await client.aclose()


async def test_the_cache_keeps_its_rules_across_the_masters(
    start_sidecar: StartSidecar, redis_cluster: RedisClusterServers  # noqa: F811
) -> None:
    sidecar, stub = await start_on(start_sidecar, redis_cluster)
    spread = namespaces_on_every_node(redis_cluster)
    assert len({redis_cluster.node_of(LAYOUT.data_key(f"{ns}:get:1")) for ns in spread}) == 3
    # An entry and its generation hash share a slot; the position has a slot of its own.
    for ns in spread:
        assert redis_cluster.node_of(LAYOUT.data_key(f"{ns}:get:1")) == redis_cluster.node_of(LAYOUT.generations_key(ns))

    # Positions: from 0 (start_sidecar's Sync), on to 5; a Sync that would skip entries
    # is refused, one already covered changes nothing.
    assert (await sync(stub, 0, 5, "unrelated:1")).applied == 5
    with pytest.raises(grpc.aio.AioRpcError) as skipped:
        await sync(stub, 6, 7, "unrelated:2")
    assert skipped.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await sync(stub, 2, 4, "unrelated:3")).applied == 5

    keys = [f"{ns}:{level}:{i}" for ns in spread for level in ("get", "list") for i in (1, 2)]
    for key in keys:
        miss = await get(stub, key)
        assert not miss.found and miss.position == 5
        assert await fill(stub, key, key.encode(), miss.position)
    found = await stub.GetMany(cache_pb2.CacheGetManyRequest(keys=keys), timeout=CALL_TIMEOUT)
    assert {e.key: (e.value, e.version) for e in found.entries} == {key: (key.encode(), 5) for key in keys}
    assert await records(redis_cluster) == set(keys)

    # Fills read before an invalidation of their key are refused: exact, prefix and glob
    # from the log, and an invalidation from outside it; one namespace per master.
    a, b, c = spread
    stale = {key: (await get(stub, key)).position for key in (f"{a}:get:9", f"{b}:list:9", f"{c}:get:9")}
    assert (await sync(stub, 5, 6, f"{a}:get:9", f"{b}:list:*", f"{c}:get:?")).applied == 6
    for key, version in stale.items():
        assert not await fill(stub, key, b"stale", version), key
    # The prefix and the glob took what they name on their masters, nothing else.
    found = await stub.GetMany(cache_pb2.CacheGetManyRequest(keys=keys), timeout=CALL_TIMEOUT)
    gone = {f"{b}:list:1", f"{b}:list:2", f"{c}:get:1", f"{c}:get:2"}
    assert {e.key for e in found.entries} == set(keys) - gone
    outside = (await get(stub, f"{a}:get:8")).position
    await sync(stub, 6, 7)
    await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern=f"{a}:get:*"), timeout=CALL_TIMEOUT)
    assert not await fill(stub, f"{a}:get:8", b"stale", outside)
    assert not (await get(stub, f"{a}:get:1")).found
    assert await fill(stub, f"{a}:get:8", b"new", (await get(stub, f"{a}:get:8")).position)

    # A clear reaches every master: records unlinked, older fills refused everywhere.
    before = {key: (await get(stub, key)).position for key in (f"{a}:get:7", f"{b}:get:7", f"{c}:get:7")}
    await sync(stub, 7, 8)
    await stub.Clear(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
    assert await records(redis_cluster) == set()
    for key, version in before.items():
        assert not await fill(stub, key, b"stale", version), key
    assert (await sync_state(stub)).applied == 8
    assert (await sync(stub, 8, 9, clear=True)).applied == 9
    for key in before:
        assert await fill(stub, key, b"after", (await get(stub, key)).position)
    stats = await stub.Stats(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
    assert (stats.backend, stats.backend_errors, stats.entries) == ("redis", 0, 3)


async def test_scripts_missing_on_the_masters_are_loaded_again(
    start_sidecar: StartSidecar, redis_cluster: RedisClusterServers  # noqa: F811
) -> None:
    """A master that lost its scripts (restarted, SCRIPT FLUSH) answers NOSCRIPT, in a
    pipeline over several masters too: the scripts are loaded on every primary."""
    sidecar, stub = await start_on(start_sidecar, redis_cluster)
    keys = [f"{ns}:get:1" for ns in namespaces_on_every_node(redis_cluster)]
    for key in keys:
        assert await fill(stub, key, b"v", (await get(stub, key)).position)
    for port in redis_cluster.ports:
        node = redis.Redis(port=port)
        try:
            node.script_flush()
        finally:
            node.close()
    found = await stub.GetMany(cache_pb2.CacheGetManyRequest(keys=keys), timeout=CALL_TIMEOUT)
    assert len(found.entries) == 3
    assert (await stub.Stats(empty_pb2.Empty(), timeout=CALL_TIMEOUT)).backend_errors == 0


async def test_an_invalidation_through_one_sidecar_reaches_the_others_streams(
    start_sidecar: StartSidecar, redis_cluster: RedisClusterServers  # noqa: F811
) -> None:
    here, watched = await start_on(start_sidecar, redis_cluster)
    there, writer = await start_on(start_sidecar, redis_cluster)
    a, b, c = namespaces_on_every_node(redis_cluster)
    stream = watched.Watch(cache_pb2.CacheWatchRequest())
    try:
        first = await asyncio.wait_for(stream.read(), CALL_TIMEOUT)
        assert first.after == first.through == 0 and not first.patterns

        async def next_patterns() -> cache_pb2.CacheInvalidation:
            while True:
                message = await asyncio.wait_for(stream.read(), CALL_TIMEOUT)
                if message.patterns:
                    return message

        await sync(writer, 0, 3, f"{a}:get:1", f"{b}:list:*")
        heard = await next_patterns()
        assert (heard.after, heard.through, list(heard.patterns)) == (0, 3, [f"{a}:get:1", f"{b}:list:*"])
        # The position is the cluster's: the watched sidecar is at 3 too.
        assert (await sync_state(watched)).applied == 3
        await writer.Invalidate(cache_pb2.CacheInvalidateRequest(pattern=f"{c}:*"), timeout=CALL_TIMEOUT)
        heard = await next_patterns()
        assert (heard.after, heard.through, list(heard.patterns)) == (3, 3, [f"{c}:*"])
    finally:
        stream.cancel()


async def test_the_cluster_failing_is_ridden_out_on_memory(
    start_sidecar: StartSidecar, redis_cluster: RedisClusterServers  # noqa: F811
) -> None:
    """Every master killed: no call fails (memory serves, empty); the masters back
    (empty, the cluster formed again from their config files): Redis again, fresh,
    and it takes fills once a relay has synced it."""
    sidecar, stub = await start_on(start_sidecar, redis_cluster)
    key = f"{namespaces_on_every_node(redis_cluster)[0]}:get:1"
    assert await fill(stub, key, b"v", (await get(stub, key)).position)
    redis_cluster.stop()
    assert not (await get(stub, key)).found
    # From outside the log, while away: the cluster is cleared before it is used again.
    await stub.Invalidate(cache_pb2.CacheInvalidateRequest(pattern="other:*"), timeout=CALL_TIMEOUT)
    stats = await stub.Stats(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
    assert (stats.backend, stats.backend_switches) == ("memory", 1)
    await asyncio.to_thread(redis_cluster.restart)
    await eventually(lambda: sidecar.store.backend == "redis", "back on the cluster")
    assert (await sync_state(stub)).fresh  # restarted empty: no position
    assert not await fill(stub, key, b"v", (await get(stub, key)).position)
    await sync(stub, 0, 4)  # what a relay does for a fresh cache
    assert await fill(stub, key, b"v2", (await get(stub, key)).position)
    assert (await get(stub, key)).entry.value == b"v2"
    assert (await stub.Stats(empty_pb2.Empty(), timeout=CALL_TIMEOUT)).backend == "redis"


async def test_a_sidecar_started_while_the_cluster_is_down_uses_it_once_it_answers(
    start_sidecar: StartSidecar, redis_cluster: RedisClusterServers  # noqa: F811
) -> None:
    """The cluster client cannot even learn the slots (RedisClusterUnreachableError,
    not a RedisError): the sidecar starts on memory all the same."""
    redis_cluster.stop()
    sidecar = await start_sidecar(redis_url=redis_cluster.url, redis_key_prefix=LAYOUT.prefix, wait_for_relay=False)
    async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        assert (await stub.Stats(empty_pb2.Empty(), timeout=CALL_TIMEOUT)).backend == "memory"
        assert not (await get(stub, "agents:get:1")).found
        await asyncio.to_thread(redis_cluster.restart)
        # Memory has a position (0) and the cluster none: Redis waits for a relay's Sync.
        await eventually(lambda: sidecar.store.state == "recovering", "the cluster answers")
        assert (await sync_state(stub)).fresh
        await sync(stub, 0, 2)
        assert sidecar.store.backend == "redis"
        assert await fill(stub, "agents:get:1", b"v", (await get(stub, "agents:get:1")).position)
        assert (await get(stub, "agents:get:1")).entry.value == b"v"


async def test_no_stale_read_under_writes_with_the_sidecar_on_the_cluster(
    redis_cluster: RedisClusterServers,  # noqa: F811
) -> None:
    """devstack/coherence.py's checker: real agents processes and a sidecar process on the
    cluster; nothing acknowledged is lost, and the writing process never reads back a
    value older than its acknowledged write."""
    cluster = Cluster("sqlite", redis=False, agents_processes=2,
                      settings={"REDIS_URL": redis_cluster.url, "RELAY_INTERVAL": "0.2"})
    try:
        cluster.start()
    except Unavailable as exc:
        unavailable("the sqlite + Redis Cluster setup", str(exc))
    try:
        outcome = await check(cluster, pairs=4, warmup=1.0, after=3.0, pause=0.02, seed=11)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()
    report = "\n\n".join(outcome.table(path) for path in ("same", "cross"))
    assert outcome.history.reads and outcome.history.acks, report
    assert outcome.lost == [], report
    assert outcome.stale("same", "whole run") == 0, report
