"""No execution stays RUNNING when the process running it stops or dies."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import grpc
import pytest
from devops_hub.v1 import events_pb2, workflows_pb2, workflows_pb2_grpc
from google.protobuf import json_format

from devstack.ports import free_port
from services.common.data.event_repository import EventRepository
from services.common.runtime.process import running
from services.workflows.server import build as build_workflows
from tests.support import ROOT
from tests.support.processes import read_until, spawned
from tests.support.stack import create_builtin_agents, make_settings, running_stack

pytestmark = pytest.mark.slow

Execution = workflows_pb2.Execution

LONG = json_format.ParseDict(
    {
        "id": "long",
        "name": "Long",
        "steps": [{"id": "nap", "type": "AGENT", "agentId": "builtin-control", "capability": "control.wait", "input": {"seconds": 60}}],
    },
    workflows_pb2.Workflow(),
)


async def wait_status(stub, execution_id: str, statuses: set[int], timeout: float = 15) -> Execution:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        execution = await stub.GetExecution(workflows_pb2.GetExecutionRequest(id=execution_id))
        if execution.status in statuses:
            return execution
        await asyncio.sleep(0.05)
    raise AssertionError(f"{execution_id} stayed {Execution.Status.Name(execution.status)}")


@contextlib.asynccontextmanager
async def started_workflows(settings):
    """Another workflows process on the same database, and a stub to call it."""
    async with running(await build_workflows(settings.replace(workflows_addr="127.0.0.1:0"))) as service:
        async with grpc.aio.insecure_channel(service.address) as channel:
            yield service, workflows_pb2_grpc.WorkflowsServiceStub(channel)


async def test_a_graceful_stop_fails_what_runs_with_the_reason(database_url):
    async with running_stack(make_settings(database_url), with_workflows=True) as stack:
        await stack.workflows_stub.CreateWorkflow(workflows_pb2.CreateWorkflowRequest(workflow=LONG))
        execution = await stack.workflows_stub.ExecuteWorkflow(workflows_pb2.ExecuteWorkflowRequest(id="long"))
        await wait_status(stack.workflows_stub, execution.id, {Execution.RUNNING})

        async with started_workflows(stack.settings) as (_, stub):
            await stack.workflows.engine.stop()  # what the first process does on SIGTERM
            ended = await wait_status(stub, execution.id, {Execution.FAILED}, timeout=5)
            assert "stopped" in ended.error
            assert ended.steps[0].status == workflows_pb2.StepRun.CANCELLED


async def test_an_execution_left_by_a_dead_process_is_failed(database_url):
    async with running_stack(make_settings(database_url), with_workflows=False) as stack:
        await create_builtin_agents(stack.stub)
        port = free_port()
        env = dict(os.environ)
        env.update(
            DATABASE_URL=stack.settings.database_url,
            AGENTS_ADDR=stack.settings.agents_addr,
            CACHE_ADDR=stack.settings.cache_addr,
            WORKFLOWS_ADDR=f"127.0.0.1:{port}",
            WORKFLOW_LEASE_TTL="1.5",
            AUTH_ENABLED="false",
            PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'clients' / 'python'}",
            PYTHONUNBUFFERED="1",
        )
        with spawned("services.workflows", env) as doomed:
            # In a thread: a blocking read here would stall this loop, and with it
            # the in-process agents service, in the middle of a write transaction.
            await asyncio.to_thread(read_until, doomed, "listening on grpc://")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = workflows_pb2_grpc.WorkflowsServiceStub(channel)
                await stub.CreateWorkflow(workflows_pb2.CreateWorkflowRequest(workflow=LONG))
                execution = await stub.ExecuteWorkflow(workflows_pb2.ExecuteWorkflowRequest(id="long"))
                await wait_status(stub, execution.id, {Execution.RUNNING})
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(timeout=10)

        async with started_workflows(stack.settings.replace(workflow_lease_ttl=1.5)) as (_, stub):
            ended = await wait_status(stub, execution.id, {Execution.FAILED}, timeout=10)
            assert "lease expired" in ended.error
            listed = await stub.ListExecutions(workflows_pb2.ListExecutionsRequest(status=Execution.RUNNING))
            assert not listed.executions


async def test_retention_keeps_the_newest_events(sqlite_url):
    async with running_stack(make_settings(sqlite_url, events_retention=50), with_workflows=True) as stack:
        for i in range(120):
            await stack.events_stub.PublishEvent(events_pb2.PublishEventRequest(event=events_pb2.Event(type="tick", source="test", subject=str(i))))
        deleted = await EventRepository(stack.workflows.db).prune(keep=50)
        assert deleted >= 70
        remaining = await stack.events_stub.ListEvents(events_pb2.ListEventsRequest(type="tick", page_size=1000))
        assert [e.subject for e in remaining.events] == [str(i) for i in range(119, 69, -1)]
        assert await EventRepository(stack.workflows.db).prune(keep=50) == 0


@pytest.mark.parametrize("page_size", [7])
async def test_events_page_newest_first(sqlite_url, page_size):
    async with running_stack(make_settings(sqlite_url), with_workflows=True) as stack:
        for i in range(20):
            await stack.events_stub.PublishEvent(events_pb2.PublishEventRequest(event=events_pb2.Event(type="tick", source="test", subject=str(i))))
        seen, token = [], ""
        while True:
            page = await stack.events_stub.ListEvents(events_pb2.ListEventsRequest(type="tick", page_size=page_size, page_token=token))
            seen += [e.subject for e in page.events]
            token = page.next_page_token
            if not token:
                break
        assert seen == [str(i) for i in range(19, -1, -1)]
