"""The relay: the one route by which the invalidation log reaches the cache, whatever
faults lose on the way.

The services run for real (SQLite and PostgreSQL); the cache they talk to is a real
gRPC server on an ephemeral port whose CacheService keeps a position in the log as
CacheService's GetSyncState and Sync define it, over a plain dict.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from devops_hub.v1 import agents_pb2, cache_pb2, cache_pb2_grpc
from google.protobuf import empty_pb2, field_mask_pb2

from devstack.ports import free_port
from services.agents.agents import Agents
from services.cache.log.repository import InvalidationLog
from services.common.runtime.grpc_host import GrpcHost
from services.common.telemetry.metrics import service_metrics
from tests.support import eventually
from tests.support.stack import Stack, make_settings, new_agent, running_stack

Agent = agents_pb2.Agent


class PositionedCache(cache_pb2_grpc.CacheServiceServicer):
    """A cache that knows how far it has applied the log, and records every Sync."""

    def __init__(self, *, fresh: bool = True, applied: int = 0) -> None:
        self.entries: dict[str, bytes] = {}
        self.fresh = fresh
        self.applied = applied
        self.syncs: list[cache_pb2.CacheSyncRequest] = []
        self.state_reads = 0

    def state(self) -> cache_pb2.CacheSyncState:
        return cache_pb2.CacheSyncState(applied=self.applied, fresh=self.fresh)

    def _apply(self, patterns) -> int:
        doomed = [key for key in self.entries if any(fnmatch.fnmatchcase(key, p) for p in patterns)]
        for key in doomed:
            del self.entries[key]
        return len(doomed)

    async def GetSyncState(self, request, context):
        self.state_reads += 1
        return self.state()

    async def rounds_settled(self) -> None:
        """Waits for a relay round that began after now: one under way may still send a
        span again (it read the position before the writer's own Sync moved it), and
        the cache applies a span's patterns again, as a real one does."""
        reads = self.state_reads
        await eventually(lambda: self.state_reads > reads, "the relay begins another round")

    async def Sync(self, request, context):
        if len(request.patterns) > 1000:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "at most 1000 patterns")
        self.syncs.append(request)
        if not self.fresh and request.after > self.applied:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the position went backwards")
        if request.clear or self.fresh:
            self.entries.clear()
        self._apply(request.patterns)
        self.applied = request.through if self.fresh else max(self.applied, request.through)
        self.fresh = False
        return self.state()


class CacheServer:
    """The cache above on a fixed port, stopped and started again at will."""

    def __init__(self, cache: PositionedCache) -> None:
        self.cache = cache
        self.port = free_port()
        self._host: GrpcHost | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._host = GrpcHost(self.address, metrics=service_metrics().grpc)
        self._host.add(cache_pb2_grpc.add_CacheServiceServicer_to_server, self.cache, "devops_hub.v1.CacheService")
        await self._host.start()

    async def stop(self) -> None:
        if self._host is not None:
            await self._host.stop(0)
            self._host = None


@contextlib.asynccontextmanager
async def cache_server(cache: PositionedCache, *, running: bool = True) -> AsyncIterator[CacheServer]:
    server = CacheServer(cache)
    if running:
        await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def positioned_stack(database_url: str) -> AsyncIterator[tuple[PositionedCache, CacheServer, Stack]]:
    """The agents service on a cache that its relay has given a position already."""
    cache = PositionedCache()
    async with cache_server(cache) as server:
        async with running_stack(settings_for(database_url, server), with_sidecar=False) as stack:
            await eventually(lambda: not cache.fresh, "the relay gives the fresh cache a position")
            yield cache, server, stack


def settings_for(database_url: str, server: CacheServer, **overrides):
    return make_settings(database_url, cache_addr=server.address, relay_interval=0.05, **overrides)


async def head_of(stack: Stack) -> int:
    return await InvalidationLog(stack.agents.db).head()


async def test_an_invalidation_lost_with_its_writer_is_delivered_when_the_cache_returns(database_url):
    cache = PositionedCache()
    async with cache_server(cache) as server:
        settings = settings_for(database_url, server)
        async with running_stack(settings, with_sidecar=False) as stack:
            await eventually(lambda: not cache.fresh, "the relay gives the fresh cache a position")
            created = await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(1)))
            head = await head_of(stack)
            await eventually(lambda: cache.applied == head, "the relay sends the create's entry")
            await cache.rounds_settled()
            cache.entries["agents:get:agent-1"] = b"the agent before the update"

            await server.stop()
            await stack.stub.UpdateAgent(
                agents_pb2.UpdateAgentRequest(
                    agent=Agent(id="agent-1", description="new", etag=created.etag),
                    update_mask=field_mask_pb2.FieldMask(paths=["description"]),
                )
            )
        # The writer is gone with the invalidation it could not send.
        await server.start()
        assert "agents:get:agent-1" in cache.entries and cache.applied == head
        before = len(cache.syncs)

        async with running_stack(settings, with_sidecar=False) as restarted:
            await eventually(lambda: "agents:get:agent-1" not in cache.entries, "the relay delivers the update's entry")
            assert cache.applied == await head_of(restarted) == head + 1
            assert [(s.after, s.through, list(s.patterns)) for s in cache.syncs[before:] if s.patterns] == [
                (head, head + 1, list(Agents.made_stale("agent-1")))
            ]


async def test_a_fresh_cache_is_synced_to_the_head_with_a_clear(database_url):
    cache = PositionedCache()
    async with cache_server(cache, running=False) as server:
        async with running_stack(settings_for(database_url, server), with_sidecar=False) as stack:
            batch = [agents_pb2.CreateAgentRequest(agent=new_agent(i)) for i in range(3)]
            await stack.stub.BatchCreateAgents(agents_pb2.BatchCreateAgentsRequest(requests=batch))
            await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(9)))
            head = await head_of(stack)
            assert head >= 2

            await server.start()
            await eventually(lambda: not cache.fresh, "the relay gives the fresh cache a position")
            assert cache.applied == head
            assert [(s.after, s.through, list(s.patterns), s.clear) for s in cache.syncs] == [(0, head, [], True)]


class PositionedMeanwhile(PositionedCache):
    """Answers that it is fresh, then is given a position by another relay, and a fill
    read there, before this relay's Sync arrives."""

    def __init__(self, position: int) -> None:
        super().__init__()
        self.position = position

    async def GetSyncState(self, request, context):
        state = self.state()
        if self.fresh:
            self.fresh, self.applied = False, self.position
            self.entries["agents:get:a1"] = b"read at the other relay's position"
        return state


async def test_a_cache_positioned_after_it_said_fresh_misses_no_entry(database_url):
    cache = PositionedMeanwhile(position=1)
    async with cache_server(cache, running=False) as server:
        async with running_stack(settings_for(database_url, server), with_sidecar=False) as stack:
            for i in range(3):
                await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(i)))
            head = await head_of(stack)
            assert head > cache.position

            await server.start()
            await eventually(lambda: cache.applied == head, "the relay moves the cache to the head")
            # The entries after the other relay's position were never applied: only a
            # clear keeps the fill read there from being served after them.
            assert cache.entries == {}


async def test_a_cache_behind_pruned_entries_is_cleared(database_url):
    """Entries older than the log's retention are pruned; a cache that missed them is
    told to clear itself rather than keep what they invalidated."""
    cache = PositionedCache(fresh=False, applied=0)
    cache.entries["workflows:get:unrelated"] = b"cached before the entries it missed"
    async with cache_server(cache, running=False) as server:
        settings = settings_for(database_url, server, invalidation_log_retention=0.2)
        async with running_stack(settings, with_sidecar=False) as stack:
            for i in range(3):
                await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(i)))
            head = await head_of(stack)
            log = InvalidationLog(stack.agents.db)

            async def pruned() -> bool:
                return await log.oldest() == head

            # The relay prunes once a second here: every entry but the newest goes.
            await eventually(pruned, "the relay prunes the log")

            await server.start()
            await eventually(lambda: cache.applied == head, "the relay moves the cache to the head")
            assert cache.entries == {}
            [sync] = cache.syncs
            assert (sync.after, sync.through, sync.clear) == (0, head, True)


async def test_each_write_reaches_the_cache_as_its_own_span_of_the_log(database_url):
    """The write's own entry, when it continues the cache's position, goes at once;
    entries the cache missed while away go together once it answers again."""
    async with positioned_stack(database_url) as (cache, server, stack):
        start = cache.applied
        for i in (1, 2):
            await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(i)))
            await eventually(lambda: cache.applied == start + i, "the relay sends the write's entry")  # noqa: B023
        # (A round of the relay may send a span again under load: applying it twice is harmless.)
        spans = list(dict.fromkeys((s.after, s.through, s.patterns[0]) for s in cache.syncs if s.patterns))
        assert spans == [(start, start + 1, "agents:get:agent-1"), (start + 1, start + 2, "agents:get:agent-2")]

        await server.stop()
        for i in (3, 4):
            await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(i)))
        before = len(cache.syncs)
        await server.start()
        await eventually(lambda: cache.applied == start + 4, "the relay sends what the cache missed")
        [caught_up] = [s for s in cache.syncs[before:] if s.patterns]
        assert (caught_up.after, caught_up.through) == (start + 2, start + 4)
        assert {"agents:get:agent-3", "agents:get:agent-4"} <= set(caught_up.patterns)


async def test_a_write_of_many_patterns_is_relayed_in_syncs_of_at_most_1000(database_url):
    async with positioned_stack(database_url) as (cache, server, stack):
        start = cache.applied
        await server.stop()
        batch = [agents_pb2.CreateAgentRequest(agent=new_agent(f"m{i:04d}")) for i in range(1000)]
        await stack.stub.BatchCreateAgents(agents_pb2.BatchCreateAgentsRequest(requests=batch))
        await server.start()
        await eventually(lambda: cache.applied == start + 1, "the batch's entry is relayed")
        calls = [s for s in cache.syncs if s.patterns]
        assert [len(s.patterns) for s in calls] == [1000, 2]
        assert [(s.after, s.through) for s in calls] == [(start, start), (start, start + 1)]
        assert {p for s in calls for p in s.patterns} >= {f"agents:get:m{i:04d}" for i in range(1000)}


async def test_a_cache_without_the_log_rpcs_is_waited_for_quietly(database_url, caplog):
    """A sidecar that answers UNIMPLEMENTED (one without GetSyncState) is treated as
    one that cannot be reached: logged once, polled on, and writes go on."""

    class WithoutTheLog(cache_pb2_grpc.CacheServiceServicer):
        async def Invalidate(self, request, context):
            return cache_pb2.CacheInvalidateResponse()

    host = GrpcHost("127.0.0.1:0", metrics=service_metrics().grpc)
    host.add(cache_pb2_grpc.add_CacheServiceServicer_to_server, WithoutTheLog(), "devops_hub.v1.CacheService")
    port = await host.start()
    try:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await cache_pb2_grpc.CacheServiceStub(channel).GetSyncState(empty_pb2.Empty())
        await channel.close()
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        caplog.set_level(logging.INFO, logger="services.cache.log.relay")
        settings = make_settings(database_url, cache_addr=f"127.0.0.1:{port}", relay_interval=0.02)
        async with running_stack(settings, with_sidecar=False) as stack:
            await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(1)))
            await asyncio.sleep(0.5)
            assert (await stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="agent-1"))).name == "Agent 1"
    finally:
        await host.stop(0)
    relay_lines = [r for r in caplog.records if r.name == "services.cache.log.relay"]
    assert len(relay_lines) == 1 and "cannot be reached" in relay_lines[0].getMessage()


async def test_a_write_while_the_cache_is_down_does_not_keep_calling_it(database_url, monkeypatch):
    """A sidecar that refuses connections fails each call at once: a write waits for it
    no longer than one attempt proves it away, instead of calling it again and again
    until its deadline."""
    async with positioned_stack(database_url) as (cache, server, stack):
        created = await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(1)))
        transport = stack.agents.relay._transport
        calls = []
        call = transport.call

        async def counted(method, request, **options):
            calls.append((asyncio.current_task().get_name(), method))
            return await call(method, request, **options)

        monkeypatch.setattr(transport, "call", counted)
        await server.stop()
        await stack.stub.UpdateAgent(
            agents_pb2.UpdateAgentRequest(
                agent=Agent(id="agent-1", description="new", etag=created.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            )
        )
        # The relay's own rounds go on at their interval meanwhile (more of them the
        # slower the write on a loaded machine); the write itself tries once.
        assert len([method for task, method in calls if task != "invalidation-relay"]) <= 1, calls
