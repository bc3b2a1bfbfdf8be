"""AgentsService through its real gRPC interface, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from devops_hub.v1 import agents_pb2
from google.protobuf import empty_pb2, field_mask_pb2

from tests.support import eventually
from tests.support.cache import log_delivered
from tests.support.grpc_errors import expect_error
from tests.support.stack import make_settings, new_agent, running_stack

Agent = agents_pb2.Agent


async def test_create_get_update_delete(stack):
    created = await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(1, description="lints")))
    assert created.id == "agent-1" and created.etag and created.create_time.seconds > 0
    assert list(created.capabilities) == ["lint", "test"]

    fetched = await stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="agent-1"))
    assert fetched == created

    updated = await stack.stub.UpdateAgent(
        agents_pb2.UpdateAgentRequest(
            agent=Agent(id="agent-1", status=Agent.MAINTENANCE, capabilities=["deploy"], etag=created.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["status", "capabilities"]),
        )
    )
    assert updated.status == Agent.MAINTENANCE and list(updated.capabilities) == ["deploy"]
    assert updated.name == "Agent 1" and updated.description == "lints"
    assert updated.etag != created.etag

    await stack.stub.DeleteAgent(agents_pb2.DeleteAgentRequest(id="agent-1"))
    failure = await expect_error(stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="agent-1")), grpc.StatusCode.NOT_FOUND)
    assert failure.reason == "AGENT_NOT_FOUND" and "agent-1" in failure.message


async def test_read_after_write_is_never_stale(stack):
    """Reads are cached; every write invalidates what it made stale."""
    await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(1)))
    await log_delivered(stack.cache_stub, stack.agents.db)
    await stack.agents.relay.stop()  # it reads the database on a timer: only the reads below may count
    for round in range(2):
        before = stack.agents.db.query_count
        assert (await stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="agent-1"))).name == "Agent 1"
        listed = await stack.stub.ListAgents(agents_pb2.ListAgentsRequest(domain="ci"))
        discovered = await stack.stub.DiscoverAgents(agents_pb2.DiscoverAgentsRequest(capability=["lint"]))
        if round == 1:
            assert stack.agents.db.query_count == before, "the second round is served from the cache"
    assert [a.name for a in listed.agents] == ["Agent 1"] and discovered.total_size == 1
    stats = await stack.cache_stub.Stats(empty_pb2.Empty())
    assert stats.sets >= 3

    await stack.stub.UpdateAgent(
        agents_pb2.UpdateAgentRequest(
            agent=Agent(id="agent-1", name="Renamed", capabilities=["deploy"]),
            update_mask=field_mask_pb2.FieldMask(paths=["name", "capabilities"]),
        )
    )
    assert (await stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="agent-1"))).name == "Renamed"
    listed = await stack.stub.ListAgents(agents_pb2.ListAgentsRequest(domain="ci"))
    assert [a.name for a in listed.agents] == ["Renamed"]
    discovered = await stack.stub.DiscoverAgents(agents_pb2.DiscoverAgentsRequest(capability=["lint"]))
    assert discovered.total_size == 0

    await stack.stub.DeleteAgent(agents_pb2.DeleteAgentRequest(id="agent-1"))
    assert not (await stack.stub.ListAgents(agents_pb2.ListAgentsRequest(domain="ci"))).agents


async def test_pagination_walks_every_agent_once(stack):
    batch = [agents_pb2.CreateAgentRequest(agent=new_agent(f"a{i:03d}")) for i in range(250)]
    await stack.stub.BatchCreateAgents(agents_pb2.BatchCreateAgentsRequest(requests=batch))
    seen, token, pages = [], "", 0
    while True:
        page = await stack.stub.ListAgents(agents_pb2.ListAgentsRequest(page_size=100, page_token=token))
        pages += 1
        seen.extend(a.id for a in page.agents)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == sorted(f"a{i:03d}" for i in range(250))


async def test_page_token_is_bound_to_its_filters(stack):
    batch = [agents_pb2.CreateAgentRequest(agent=new_agent(i)) for i in range(3)]
    await stack.stub.BatchCreateAgents(agents_pb2.BatchCreateAgentsRequest(requests=batch))
    page = await stack.stub.ListAgents(agents_pb2.ListAgentsRequest(page_size=1, domain="ci"))
    assert page.next_page_token
    failure = await expect_error(
        stack.stub.ListAgents(agents_pb2.ListAgentsRequest(page_size=1, domain="ops", page_token=page.next_page_token)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "page_token" in failure.fields
    failure = await expect_error(
        stack.stub.ListAgents(agents_pb2.ListAgentsRequest(page_token="not-a-token")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "page_token" in failure.fields
    # Changing only the page size keeps the token valid (AIP-158).
    next_page = await stack.stub.ListAgents(agents_pb2.ListAgentsRequest(page_size=5, domain="ci", page_token=page.next_page_token))
    assert [a.id for a in next_page.agents] == ["agent-1", "agent-2"]


async def test_list_filters(stack):
    agents = [
        new_agent(1, domain="ci", capabilities=["lint"]),
        new_agent(2, domain="ci", status=Agent.INACTIVE, capabilities=["deploy"]),
        new_agent(3, domain="security", type=Agent.SERVICE, capabilities=["scan", "lint"]),
    ]
    await stack.stub.BatchCreateAgents(
        agents_pb2.BatchCreateAgentsRequest(requests=[agents_pb2.CreateAgentRequest(agent=a) for a in agents])
    )

    async def ids(**filters) -> list[str]:
        return [a.id for a in (await stack.stub.ListAgents(agents_pb2.ListAgentsRequest(**filters))).agents]

    assert await ids(domain="ci") == ["agent-1", "agent-2"]
    assert await ids(status=Agent.INACTIVE) == ["agent-2"]
    assert await ids(type=Agent.SERVICE) == ["agent-3"]
    assert await ids(capability="lint") == ["agent-1", "agent-3"]
    assert await ids(capability="lint", domain="security") == ["agent-3"]
    assert await ids(capability="nothing") == []


async def test_discover_ands_filters_and_counts_facets(stack):
    agents = [
        new_agent(1, domain="ci", capabilities=["lint", "test"]),
        new_agent(2, domain="ci", status=Agent.INACTIVE, capabilities=["lint"]),
        new_agent(3, domain="security", type=Agent.SERVICE, capabilities=["lint", "scan"]),
        new_agent(4, domain="security", capabilities=["scan"]),
    ]
    await stack.stub.BatchCreateAgents(
        agents_pb2.BatchCreateAgentsRequest(requests=[agents_pb2.CreateAgentRequest(agent=a) for a in agents])
    )
    found = await stack.stub.DiscoverAgents(agents_pb2.DiscoverAgentsRequest(capability=["lint"]))
    assert [a.id for a in found.agents] == ["agent-1", "agent-2", "agent-3"]
    assert found.total_size == 3
    assert dict(found.facets.domain) == {"ci": 2, "security": 1}
    assert dict(found.facets.status) == {"ACTIVE": 2, "INACTIVE": 1}
    assert dict(found.facets.type) == {"TASK": 2, "SERVICE": 1}
    assert dict(found.facets.capability) == {"lint": 3, "test": 1, "scan": 1}

    both = await stack.stub.DiscoverAgents(
        agents_pb2.DiscoverAgentsRequest(capability=["lint", "scan"], domain="security", page_size=10)
    )
    assert [a.id for a in both.agents] == ["agent-3"] and both.total_size == 1

    limited = await stack.stub.DiscoverAgents(agents_pb2.DiscoverAgentsRequest(page_size=1))
    assert len(limited.agents) == 1 and limited.total_size == 4


async def test_batch_create_is_all_or_nothing(stack):
    await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(500)))
    batch = [agents_pb2.CreateAgentRequest(agent=new_agent(i)) for i in range(1000)]
    failure = await expect_error(
        stack.stub.BatchCreateAgents(agents_pb2.BatchCreateAgentsRequest(requests=batch)), grpc.StatusCode.ALREADY_EXISTS
    )
    assert "agent-500" in failure.message
    listed = await stack.stub.ListAgents(agents_pb2.ListAgentsRequest(page_size=1000))
    assert [a.id for a in listed.agents] == ["agent-500"]

    del batch[500]
    created = await stack.stub.BatchCreateAgents(agents_pb2.BatchCreateAgentsRequest(requests=batch))
    assert len(created.agents) == 999
    listed = await stack.stub.ListAgents(agents_pb2.ListAgentsRequest(page_size=1000, capability="test"))
    assert len(listed.agents) == 1000


async def test_batch_limits_and_bad_entries(stack):
    too_many = [agents_pb2.CreateAgentRequest(agent=new_agent(i)) for i in range(1001)]
    failure = await expect_error(
        stack.stub.BatchCreateAgents(agents_pb2.BatchCreateAgentsRequest(requests=too_many)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "requests" in failure.fields
    bad = [
        agents_pb2.CreateAgentRequest(agent=new_agent(1)),
        agents_pb2.CreateAgentRequest(agent=new_agent(2, name="")),
        agents_pb2.CreateAgentRequest(agent=new_agent(1)),
    ]
    failure = await expect_error(
        stack.stub.BatchCreateAgents(agents_pb2.BatchCreateAgentsRequest(requests=bad)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert set(failure.fields) == {"requests[1].agent.name", "requests[2].agent.id"}
    assert not (await stack.stub.ListAgents(agents_pb2.ListAgentsRequest())).agents


@pytest.mark.parametrize(
    ("agent", "field"),
    [
        (new_agent(1, name=""), "agent.name"),
        (new_agent(1, name="   "), "agent.name"),
        (new_agent(1, domain=""), "agent.domain"),
        (new_agent(1, domain="Has Spaces"), "agent.domain"),
        (new_agent(1, type=99), "agent.type"),
        (new_agent(1, status=42), "agent.status"),
        (new_agent("bad id!"), "agent.id"),
        (new_agent(1, capabilities=["ok", "Not OK"]), "agent.capabilities[1]"),
        (new_agent(1, endpoint="nowhere"), "agent.endpoint"),
        (new_agent(1, capabilities=[f"c{i}" for i in range(65)]), "agent.capabilities"),
    ],
)
async def test_create_rejects_bad_fields(stack, agent, field):
    failure = await expect_error(stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=agent)), grpc.StatusCode.INVALID_ARGUMENT)
    assert field in failure.fields, failure.fields
    assert field in failure.message
    assert not (await stack.stub.ListAgents(agents_pb2.ListAgentsRequest())).agents


async def test_create_defaults_and_generated_id(stack):
    created = await stack.stub.CreateAgent(
        agents_pb2.CreateAgentRequest(agent=Agent(name=" Builder ", domain="ci", capabilities=["a", "b", "a"]))
    )
    assert len(created.id) == 36 and created.name == "Builder"
    assert created.type == Agent.TASK and created.status == Agent.ACTIVE
    assert list(created.capabilities) == ["a", "b"]


async def test_duplicate_id_is_already_exists(stack):
    await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(1)))
    failure = await expect_error(
        stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(1))), grpc.StatusCode.ALREADY_EXISTS
    )
    assert failure.reason == "AGENT_EXISTS" and "agent-1" in failure.message


async def test_update_rules(stack):
    created = await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(1)))
    mask = field_mask_pb2.FieldMask

    stale = await expect_error(
        stack.stub.UpdateAgent(
            agents_pb2.UpdateAgentRequest(agent=Agent(id="agent-1", name="x", etag="999"), update_mask=mask(paths=["name"]))
        ),
        grpc.StatusCode.ABORTED,
    )
    assert stale.reason == "ETAG_MISMATCH"

    missing = await expect_error(
        stack.stub.UpdateAgent(agents_pb2.UpdateAgentRequest(agent=Agent(id="nope", name="x"), update_mask=mask(paths=["name"]))),
        grpc.StatusCode.NOT_FOUND,
    )
    assert missing.reason == "AGENT_NOT_FOUND"

    bad_path = await expect_error(
        stack.stub.UpdateAgent(agents_pb2.UpdateAgentRequest(agent=Agent(id="agent-1"), update_mask=mask(paths=["create_time"]))),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "update_mask.paths[0]" in bad_path.fields

    blank = await expect_error(
        stack.stub.UpdateAgent(agents_pb2.UpdateAgentRequest(agent=Agent(id="agent-1", name=""), update_mask=mask(paths=["name"]))),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "agent.name" in blank.fields

    # No mask: the fields that are set.
    updated = await stack.stub.UpdateAgent(
        agents_pb2.UpdateAgentRequest(agent=Agent(id="agent-1", description="new", etag=created.etag))
    )
    assert updated.description == "new" and updated.name == "Agent 1" and list(updated.capabilities) == ["lint", "test"]
    # A second write with the first etag is refused.
    await expect_error(
        stack.stub.UpdateAgent(agents_pb2.UpdateAgentRequest(agent=Agent(id="agent-1", description="x", etag=created.etag))),
        grpc.StatusCode.ABORTED,
    )
    # Metadata cleared through the mask.
    cleared = await stack.stub.UpdateAgent(
        agents_pb2.UpdateAgentRequest(agent=Agent(id="agent-1"), update_mask=mask(paths=["metadata"]))
    )
    assert dict(cleared.metadata) == {}


async def test_concurrent_updates_without_an_etag_lose_no_field(stack):
    """An update merges its fields into the agent as stored: one that raced another is
    merged again onto the other's result, never written over it."""
    await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(1)))
    changes = [Agent(id="agent-1", version="2.0"), Agent(id="agent-1", description="new"), Agent(id="agent-1", endpoint="host:9000")]
    await asyncio.gather(*(stack.stub.UpdateAgent(agents_pb2.UpdateAgentRequest(agent=agent)) for agent in changes))
    stored = await stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="agent-1"))
    assert (stored.version, stored.description, stored.endpoint) == ("2.0", "new", "host:9000")
    assert stored.etag == "4"


async def test_many_concurrent_updates_without_an_etag_all_succeed(stack):
    """Updates of one agent in one process take turns rather than race: none gives up
    ABORTED after losing its attempts to the others."""
    await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(1)))
    updates = [agents_pb2.UpdateAgentRequest(agent=Agent(id="agent-1", description=f"take {i}")) for i in range(12)]
    answers = await asyncio.gather(*(stack.stub.UpdateAgent(update) for update in updates))
    assert sorted(int(answer.etag) for answer in answers) == list(range(2, 14))


async def test_delete_rules(stack):
    failure = await expect_error(stack.stub.DeleteAgent(agents_pb2.DeleteAgentRequest(id="ghost")), grpc.StatusCode.NOT_FOUND)
    assert "ghost" in failure.message
    created = await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(1)))
    await expect_error(stack.stub.DeleteAgent(agents_pb2.DeleteAgentRequest(id="agent-1", etag="77")), grpc.StatusCode.ABORTED)
    await stack.stub.DeleteAgent(agents_pb2.DeleteAgentRequest(id="agent-1", etag=created.etag))
    # Capabilities went with the agent.
    assert (await stack.stub.DiscoverAgents(agents_pb2.DiscoverAgentsRequest())).facets.capability == {}


async def test_page_size_bounds(stack):
    failure = await expect_error(stack.stub.ListAgents(agents_pb2.ListAgentsRequest(page_size=-1)), grpc.StatusCode.INVALID_ARGUMENT)
    assert "page_size" in failure.fields
    batch = [agents_pb2.CreateAgentRequest(agent=new_agent(f"b{i:04d}")) for i in range(1000)]
    await stack.stub.BatchCreateAgents(agents_pb2.BatchCreateAgentsRequest(requests=batch))
    await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent("c")))
    assert len((await stack.stub.ListAgents(agents_pb2.ListAgentsRequest())).agents) == 50
    capped = await stack.stub.ListAgents(agents_pb2.ListAgentsRequest(page_size=5000))
    assert len(capped.agents) == 1000 and capped.next_page_token


async def test_a_list_is_one_query(stack):
    """Agents come with their capabilities in one query, however many agents."""
    batch = [agents_pb2.CreateAgentRequest(agent=new_agent(i, capabilities=[f"cap{i}", "x"])) for i in range(200)]
    await stack.stub.BatchCreateAgents(agents_pb2.BatchCreateAgentsRequest(requests=batch))
    db = stack.agents.db
    await log_delivered(stack.cache_stub, db)
    await stack.agents.relay.stop()  # it reads the database on a timer: only the reads below may count
    before = db.query_count
    page = await stack.stub.ListAgents(agents_pb2.ListAgentsRequest(page_size=200, capability="x"))
    assert len(page.agents) == 200 and all(len(a.capabilities) == 2 for a in page.agents)
    assert db.query_count - before == 1
    before = db.query_count
    await stack.stub.ListAgents(agents_pb2.ListAgentsRequest(page_size=200, capability="x"))
    assert db.query_count == before, "the second read is a cache hit"


async def test_reads_and_writes_work_without_the_sidecar(database_url):
    async with running_stack(make_settings(database_url), with_sidecar=False) as stack:
        await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(1)))
        results = await asyncio.gather(*(stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="agent-1")) for _ in range(20)))
        assert {r.name for r in results} == {"Agent 1"}
        await stack.stub.UpdateAgent(
            agents_pb2.UpdateAgentRequest(agent=Agent(id="agent-1", name="New"), update_mask=field_mask_pb2.FieldMask(paths=["name"]))
        )
        assert (await stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="agent-1"))).name == "New"
        assert len((await stack.stub.ListAgents(agents_pb2.ListAgentsRequest())).agents) == 1


async def test_cacheable_reads_say_how_long_they_stay_fresh(stack):
    """The max-age each read declares in the protos travels with its answer; writes and
    errors carry none."""

    async def trailers(call) -> dict[str, str]:
        try:
            await call
        except grpc.aio.AioRpcError as error:
            return dict(error.trailing_metadata() or ())
        return dict(await call.trailing_metadata())

    created = await trailers(stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(1))))
    assert "cache-control" not in created
    assert (await trailers(stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="agent-1"))))["cache-control"] == "max-age=300"
    assert (await trailers(stack.stub.ListAgents(agents_pb2.ListAgentsRequest())))["cache-control"] == "max-age=60"
    assert (await trailers(stack.stub.DiscoverAgents(agents_pb2.DiscoverAgentsRequest())))["cache-control"] == "max-age=300"
    assert "cache-control" not in await trailers(stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="missing")))


async def test_a_hot_get_answers_the_cached_bytes_as_they_are(stack):
    """A GetAgent served by the near-cache sends the bytes the cache holds, neither
    decoded nor encoded again: the Agent's own serialization, with the cache trailers."""
    created = await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(1, description="lints")))
    near = stack.agents.cache.near
    await stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="agent-1"))  # the first read starts the stream
    await eventually(lambda: near.live, "the near-cache's stream is live")
    # No response deserializer: the call answers the bytes that came over the wire.
    get_raw = stack.channel.unary_unary(
        "/devops_hub.v1.AgentsService/GetAgent", request_serializer=agents_pb2.GetAgentRequest.SerializeToString
    )
    request = agents_pb2.GetAgentRequest(id="agent-1")
    cold = await get_raw(request)
    client = stack.agents.cache
    # Read again until the near-cache answers (the create's late Watch message, or a
    # sidecar call past its deadline on a loaded machine, may have cost it the entry).
    for _ in range(50):
        hits, sidecar_hits = client.hits, (await client.stats()).hits
        call = get_raw(request)
        hot = await call
        if client.hits == hits + 1 and (await client.stats()).hits == sidecar_hits:
            break
    else:
        raise AssertionError("no read was the near-cache's")
    agent = Agent.FromString(hot)
    assert agent == created and hot == agent.SerializeToString() == cold
    trailers = dict(await call.trailing_metadata())
    assert trailers["cache-control"] == "max-age=300" and trailers["surrogate-key"] == "agents:get:agent-1"
    missing = await expect_error(stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="agent-2")), grpc.StatusCode.NOT_FOUND)
    assert missing.reason == "AGENT_NOT_FOUND"

