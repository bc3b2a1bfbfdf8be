"""The cache never hides an acknowledged write (the client's side of it): loads shared
only by callers that arrived before the same log position, near-caches that clear on
any gap in the log positions their feed brings, and reads that ask for freshness
(`Cache-Control: no-cache`) bypassing every layer. Real sidecars, services and
gateway on ephemeral ports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from devops_hub.v1 import agents_pb2, cache_pb2, cache_pb2_grpc
from google.protobuf import wrappers_pb2

from services.cache.client.client import CacheClient
from services.cache.client.near_cache import NearCache
from services.cache.sidecar.server import CacheSidecar
from tests.support import eventually
from tests.support.cache import (
    READ_TIMEOUT,
    STRING_TYPE,
    CountingLoader,
)
from tests.support.stack import gateway_client, make_settings, running_stack

String = wrappers_pb2.StringValue


async def test_a_caller_after_this_process_invalidated_never_joins_an_earlier_load(sidecar: CacheSidecar) -> None:
    async with CacheClient(sidecar.host.bound_address, timeout=2.0, near_cache=NearCache()) as client:
        await eventually(lambda: client.near.live)
        old = CountingLoader("old", hold=True)
        before = asyncio.create_task(client.get_or_load("agents:get:1", 60, String, old))
        await asyncio.wait_for(old.started.wait(), READ_TIMEOUT)
        joined = asyncio.create_task(client.get_or_load("agents:get:1", 60, String, CountingLoader("unused")))
        await asyncio.sleep(0.05)

        client.committed(1, ["agents:get:1"])  # the write this process acknowledges (the outbox's call)
        new = CountingLoader("new")
        after = await client.get_or_load("agents:get:1", 60, String, new)
        assert after.value == "new" and new.calls == 1, "a read after the write must not share the earlier load"

        old.release.set()
        # Callers that arrived before the write may see the value from before it.
        assert (await before).value == "old" and (await joined).value == "old" and old.calls == 1
        # ... but it never lands in any layer: the next read still sees the new value.
        assert (await client.get_or_load("agents:get:1", 60, String, CountingLoader("other"))).value == "new"


async def test_a_caller_after_another_process_invalidated_never_joins_an_earlier_load(sidecar: CacheSidecar) -> None:
    address = sidecar.host.bound_address
    async with CacheClient(address, timeout=2.0, near_cache=NearCache()) as reader:
        await eventually(lambda: reader.near.live)
        old = CountingLoader("old", hold=True)
        before = asyncio.create_task(reader.get_or_load("agents:get:2", 60, String, old))
        await asyncio.wait_for(old.started.wait(), READ_TIMEOUT)

        # The write's log entry reaches the sidecar by the relay's route, and the
        # reader by the Watch stream.
        sync = cache_pb2.CacheSyncRequest(after=0, through=1, patterns=["agents:get:2"])
        async with grpc.aio.insecure_channel(address) as channel:
            await cache_pb2_grpc.CacheServiceStub(channel).Sync(sync, timeout=READ_TIMEOUT)
        await eventually(lambda: reader.near.position == 1)

        new = CountingLoader("new")
        assert (await reader.get_or_load("agents:get:2", 60, String, new)).value == "new" and new.calls == 1
        old.release.set()
        assert (await before).value == "old"


class _GappyCache(cache_pb2_grpc.CacheServiceServicer):
    """A CacheService whose Watch stream skips a log span on demand: every Get is a
    hit, so the only thing that can empty the near-cache is the gap."""

    def __init__(self) -> None:
        self.skip = asyncio.Event()
        self.streams = 0

    async def Get(self, request, context):
        entry = cache_pb2.CacheEntry(
            key=request.key, value=String(value="cached").SerializeToString(), content_type=STRING_TYPE, version=1
        )
        return cache_pb2.CacheGetResponse(found=True, entry=entry)

    async def Watch(self, request, context):
        self.streams += 1
        yield cache_pb2.CacheInvalidation(after=1, through=1)  # the stream is at log position 1
        if self.streams == 1:
            await self.skip.wait()
            # (1, 2] never came: the next message covers (2, 3].
            yield cache_pb2.CacheInvalidation(after=2, through=3, patterns=["workflows:get:9"])
        while True:
            await asyncio.sleep(0.2)
            yield cache_pb2.CacheInvalidation(after=1, through=1)  # heartbeats


async def test_a_gap_in_the_watch_stream_clears_the_near_cache() -> None:
    fake = _GappyCache()
    server = grpc.aio.server()
    cache_pb2_grpc.add_CacheServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with CacheClient(f"127.0.0.1:{port}", timeout=2.0, near_cache=NearCache()) as client:
            await eventually(lambda: client.near.live)
            await client.get_or_load("agents:get:1", 60, String, CountingLoader())
            assert len(client.near) == 1

            fake.skip.set()
            await eventually(lambda: fake.streams == 2)  # dropped the stream and resubscribed
            assert len(client.near) == 0, "an entry from a stream with a gap was kept"
            await eventually(lambda: client.near.live)
    finally:
        await server.stop(0)


@pytest.fixture
async def stack_and_http(database_url) -> AsyncIterator[tuple]:
    async with running_stack(make_settings(database_url)) as stack:
        async with gateway_client(stack.settings, timeout=10) as http:
            yield stack, http


async def test_no_cache_reads_past_every_layer_and_refills_them(stack_and_http) -> None:
    stack, http = stack_and_http
    assert (await http.post("/api/agents", json={"id": "a1", "name": "First", "domain": "ci"})).status_code == 200

    async def read_both() -> agents_pb2.ListAgentsResponse:
        assert (await http.get("/api/agents/a1")).json()["name"] == "First"
        return await stack.stub.ListAgents(agents_pb2.ListAgentsRequest(domain="ci"))

    # Until both reads come from the cache (no query): right after start, a loaded
    # machine may keep the service off the sidecar for a moment.
    for _ in range(100):
        queries = stack.agents.db.query_count
        listed = await read_both()
        if stack.agents.db.query_count == queries:
            break
        await asyncio.sleep(0.05)
    # A change the cache cannot know of (made behind the service's back).
    await stack.agents.db.execute("UPDATE agents SET name = 'Behind' WHERE id = 'a1'")
    assert (await http.get("/api/agents/a1")).json()["name"] == "First", "the read is cached"
    assert [a.name for a in listed.agents] == ["First"]

    fresh = await http.get("/api/agents/a1", headers={"Cache-Control": "no-cache"})
    assert fresh.json()["name"] == "Behind"
    assert (await http.get("/api/agents/a1")).json()["name"] == "Behind", "the fresh read refilled the cache"

    fresh_list = await stack.stub.ListAgents(
        agents_pb2.ListAgentsRequest(domain="ci"), metadata=(("cache-control", "no-cache"),)
    )
    assert [a.name for a in fresh_list.agents] == ["Behind"]
    cached_list = await stack.stub.ListAgents(agents_pb2.ListAgentsRequest(domain="ci"))
    assert [a.name for a in cached_list.agents] == ["Behind"]
