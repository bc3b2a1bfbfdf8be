"""A write, its event and its invalidation log entry commit together or not at all.

Through the real services on SQLite and PostgreSQL: events are read back with
ListEvents right after the write returns (no flush in between), the log with its
repository.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from devops_hub.v1 import agents_pb2, cache_pb2, events_pb2, workflows_pb2
from google.protobuf import field_mask_pb2

from services.agents.agents import Agents
from services.agents.repository import AgentRepository
from services.cache.client.decorators import every, stale
from services.cache.log.outbox import Outbox
from services.cache.log.repository import InvalidationLog, LogEntry
from services.workflows.workflows import Workflows
from tests.support import eventually
from tests.support.grpc_errors import expect_error
from tests.support.stack import make_settings, new_agent, running_stack

Agent = agents_pb2.Agent

# What a write to workflow "wf" makes stale, named by the reads' own declarations.
WORKFLOW_WF = (stale(Workflows._stored, "wf"), every(Workflows._page))


@pytest.fixture
async def stack(database_url):
    async with running_stack(make_settings(database_url), with_workflows=True) as running:
        yield running


async def events(stack, type: str) -> list[events_pb2.Event]:
    page = await stack.events_stub.ListEvents(events_pb2.ListEventsRequest(type=type, page_size=1000))
    return list(page.events)


async def new_entries(stack, after: int) -> list[LogEntry]:
    return await InvalidationLog(stack.agents.db).entries_after(after, 1000)


async def test_agent_writes_commit_their_event_and_log_entry(stack):
    log = InvalidationLog(stack.agents.db)
    start = await log.head()
    created = await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(1)))
    assert [e.subject for e in await events(stack, "agent.created") if e.subject == "agent-1"] == ["agent-1"]
    [entry] = await new_entries(stack, start)
    assert entry.patterns == Agents.made_stale("agent-1")

    await stack.stub.UpdateAgent(
        agents_pb2.UpdateAgentRequest(
            agent=Agent(id="agent-1", description="new", etag=created.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        )
    )
    [updated] = await events(stack, "agent.updated")
    assert updated.subject == "agent-1" and updated.source == "agents"
    assert list(updated.data["fields"]) == ["description"]
    await stack.stub.DeleteAgent(agents_pb2.DeleteAgentRequest(id="agent-1"))
    assert [e.subject for e in await events(stack, "agent.deleted")] == ["agent-1"]
    entries = await new_entries(stack, start)
    assert [e.seq for e in entries] == sorted(e.seq for e in entries) and len(entries) == 3
    assert all(e.patterns[0] == "agents:get:agent-1" for e in entries)
    assert entries[-1].seq == await log.head()


async def test_a_write_is_applied_once_in_its_own_process(stack):
    """Its commit applies what it made stale to the writing process's near-cache; the
    stream bringing that log entry back is not applied a second time."""
    near = stack.agents.cache.near
    created = await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(1)))
    await stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="agent-1"))  # the first read starts the stream
    await eventually(lambda: near.live, "the near-cache's stream is live")
    start = await InvalidationLog(stack.agents.db).head()
    await eventually(lambda: near.position >= start, "the stream brought the create back")
    applied: list[tuple[str, int]] = []
    near.observer = lambda pattern, at: applied.append((pattern, at))
    await stack.stub.UpdateAgent(
        agents_pb2.UpdateAgentRequest(
            agent=Agent(id="agent-1", description="new", etag=created.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        )
    )
    [entry] = await new_entries(stack, start)
    await eventually(lambda: near.position >= entry.seq, "the stream brought the update back")
    assert applied == [(pattern, entry.seq) for pattern in entry.patterns]


async def test_a_batch_create_is_one_log_entry(stack):
    start = await InvalidationLog(stack.agents.db).head()
    batch = [agents_pb2.CreateAgentRequest(agent=new_agent(i)) for i in range(3)]
    await stack.stub.BatchCreateAgents(agents_pb2.BatchCreateAgentsRequest(requests=batch))
    [entry] = await new_entries(stack, start)
    assert entry.patterns == Agents.made_stale("agent-0", "agent-1", "agent-2")
    created = {e.subject for e in await events(stack, "agent.created")}
    assert {"agent-0", "agent-1", "agent-2"} <= created


async def test_refused_agent_writes_leave_no_event_and_no_log_entry(stack):
    created = await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(1)))
    head = await InvalidationLog(stack.agents.db).head()
    count = len(await events(stack, "agent.created"))

    # One id of the batch exists already: none of the batch is created.
    batch = [agents_pb2.CreateAgentRequest(agent=new_agent(i)) for i in (7, 1, 8)]
    await expect_error(stack.stub.BatchCreateAgents(agents_pb2.BatchCreateAgentsRequest(requests=batch)), grpc.StatusCode.ALREADY_EXISTS)
    stale = Agent(id="agent-1", description="x", etag=str(int(created.etag) + 1))
    mask = field_mask_pb2.FieldMask(paths=["description"])
    await expect_error(stack.stub.UpdateAgent(agents_pb2.UpdateAgentRequest(agent=stale, update_mask=mask)), grpc.StatusCode.ABORTED)
    await expect_error(stack.stub.DeleteAgent(agents_pb2.DeleteAgentRequest(id="agent-1", etag="99")), grpc.StatusCode.ABORTED)
    await expect_error(stack.stub.DeleteAgent(agents_pb2.DeleteAgentRequest(id="agent-404")), grpc.StatusCode.NOT_FOUND)

    assert len(await events(stack, "agent.created")) == count
    assert await events(stack, "agent.updated") == [] and await events(stack, "agent.deleted") == []
    assert await new_entries(stack, head) == []
    for missing in ("agent-7", "agent-8"):
        await expect_error(stack.stub.GetAgent(agents_pb2.GetAgentRequest(id=missing)), grpc.StatusCode.NOT_FOUND)


async def test_a_write_that_fails_after_its_statements_rolls_everything_back(stack):
    """The data, the event and the log entry were all written in the transaction,
    then the use case failed: none of them is stored, and the cache is not told."""
    db = stack.agents.db
    head = await InvalidationLog(db).head()
    cached = cache_pb2.CacheEntry(key="agents:get:agent-doomed", value=b"cached before", content_type="text/plain")
    await stack.cache_stub.Set(cache_pb2.CacheSetRequest(entry=cached))
    with pytest.raises(RuntimeError):
        async with Outbox(db, stack.agents.cache, stack.agents.relay, "agents").write() as write:
            await AgentRepository(db).insert(write.tx, [new_agent("doomed")], write.time)
            write.made_stale("agents:get:agent-doomed")
            write.emit("agent.created", "agent-doomed", {"agent_id": "agent-doomed"})
            raise RuntimeError("the use case failed after its statements")
    assert await AgentRepository(db).get("agent-doomed") is None
    assert [e for e in await events(stack, "agent.created") if e.subject == "agent-doomed"] == []
    assert await new_entries(stack, head) == []
    still = await stack.cache_stub.Get(cache_pb2.CacheGetRequest(key="agents:get:agent-doomed"))
    assert still.found and still.entry.value == b"cached before"


async def test_workflow_definition_writes_commit_their_event_and_log_entry(stack):
    log = InvalidationLog(stack.workflows.db)
    start = await log.head()
    workflow = workflows_pb2.Workflow(id="wf", name="Wf", steps=[workflows_pb2.Step(id="shape", type=workflows_pb2.Step.TRANSFORM)])
    workflow.steps[0].input.update({"value": 1})
    created = await stack.workflows_stub.CreateWorkflow(workflows_pb2.CreateWorkflowRequest(workflow=workflow))
    assert [e.subject for e in await events(stack, "workflow.created")] == ["wf"]
    [entry] = await new_entries(stack, start)
    assert entry.patterns == WORKFLOW_WF

    await expect_error(stack.workflows_stub.CreateWorkflow(workflows_pb2.CreateWorkflowRequest(workflow=workflow)), grpc.StatusCode.ALREADY_EXISTS)
    stale = workflows_pb2.Workflow(id="wf", name="Renamed", etag=str(int(created.etag) + 1))
    mask = field_mask_pb2.FieldMask(paths=["name"])
    await expect_error(
        stack.workflows_stub.UpdateWorkflow(workflows_pb2.UpdateWorkflowRequest(workflow=stale, update_mask=mask)), grpc.StatusCode.ABORTED
    )
    assert [e.subject for e in await events(stack, "workflow.created")] == ["wf"]
    assert await events(stack, "workflow.updated") == []
    assert len(await new_entries(stack, start)) == 1

    fresh = workflows_pb2.Workflow(id="wf", name="Renamed", etag=created.etag)
    await stack.workflows_stub.UpdateWorkflow(workflows_pb2.UpdateWorkflowRequest(workflow=fresh, update_mask=mask))
    await stack.workflows_stub.DeleteWorkflow(workflows_pb2.DeleteWorkflowRequest(id="wf"))
    assert [e.subject for e in await events(stack, "workflow.updated")] == ["wf"]
    assert [e.subject for e in await events(stack, "workflow.deleted")] == ["wf"]
    assert [e.patterns for e in await new_entries(stack, start)] == [WORKFLOW_WF] * 3


async def test_a_reader_following_the_log_never_skips_an_entry(stack):
    """Concurrent writes commit in seq order, so reading "after the last seq seen"
    (what the relay does) sees every entry."""
    log = InvalidationLog(stack.agents.db)
    seen = [await log.head()]
    writing = True

    async def write(n: int) -> None:
        for i in range(15):
            await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent(f"w{n}-{i}")))

    async def follow() -> None:
        while writing:
            seen.extend(entry.seq for entry in await log.entries_after(seen[-1], 1000))
            await asyncio.sleep(0)

    follower = asyncio.create_task(follow())
    try:
        await asyncio.gather(*(write(n) for n in range(8)))
    finally:
        writing = False
        await follower
    seen.extend(entry.seq for entry in await log.entries_after(seen[-1], 1000))
    written = [entry.seq for entry in await log.entries_after(seen[0], 1000)]
    assert len(written) == 8 * 15
    assert seen[1:] == written
