"""The asyncio client (devops_hub.client) against a running stack: thin methods over
the stubs, AIP-193 details as exceptions, paged lists and server streams as async
iterators, and a service config that retries reads (and only reads) on UNAVAILABLE."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid

import pytest
from devops_hub import errors
from devops_hub.channels import SERVICES, is_read, service_config
from devops_hub.client import Client
from devops_hub.v1 import agents_pb2, auth_pb2, events_pb2, workflows_pb2
from google.protobuf import json_format

from devstack.ports import free_port
from services.agents import new_key as new_key_module
from services.agents.builtins import builtin_agent_records
from services.common.auth import keys
from tests.support import ROOT
from tests.support.auth import ADMIN, ADMIN_KEY, READ, auth_settings, new_key
from tests.support.client import DEPLOY_GATE, DEPLOY_INPUT, cli_env, run_cli
from tests.support.stack import new_agent, running_stack


def _addresses(settings) -> dict[str, str]:
    return {"agents": settings.agents_addr, "workflows": settings.workflows_addr, "cache": settings.cache_addr}


@pytest.fixture
async def client(secured):
    stack, _ = secured
    async with Client.connect(_addresses(stack.settings), ADMIN_KEY) as hub:
        yield hub


async def test_agents_round_trip_and_pages_through_every_agent(client):
    agent = new_agent(f"client-{uuid.uuid4().hex[:6]}")
    created = await client.create_agent(agent)
    assert created.id == agent.id and created.etag
    updated = await client.update_agent(agents_pb2.Agent(id=agent.id, description="changed", etag=created.etag), ["description"])
    assert (await client.get_agent(agent.id)).description == updated.description == "changed"
    # Pages of two, followed to the end by the iterator.
    listed = [a.id async for a in client.list_agents(page_size=2)]
    assert sorted(listed) == sorted({a.id for a in builtin_agent_records()} | {agent.id})
    assert [a.id async for a in client.list_agents(domain="ci", page_size=1)] == [agent.id]
    await client.delete_agent(agent.id)
    with pytest.raises(errors.NotFound) as missing:
        await client.get_agent(agent.id)
    assert missing.value.reason == "AGENT_NOT_FOUND" and missing.value.metadata == {"id": agent.id}


async def test_errors_carry_their_field_violations(client):
    with pytest.raises(errors.InvalidArgument) as bad:
        await client.create_agent(agents_pb2.Agent(id="Not An Id!", domain="ci"))
    fields = dict(bad.value.violations)
    assert fields["agent.name"] == "is required" and "agent.id" in fields
    assert bad.value.reason == "INVALID_FIELDS" and bad.value.code.name == "INVALID_ARGUMENT"
    with pytest.raises(errors.AlreadyExists):
        await client.create_agent(builtin_agent_records()[0])


async def test_keys_scope_what_a_client_may_do(secured, client):
    stack, keys_stub = secured
    reader_key = await new_key(keys_stub, READ)
    async with Client.connect(_addresses(stack.settings), reader_key) as reader:
        assert list((await reader.whoami()).scopes) == [READ]
        with pytest.raises(errors.PermissionDenied):
            await reader.delete_agent("builtin-text")
        with pytest.raises(errors.PermissionDenied):
            await reader.cache_stats()
    created = await client.create_api_key(auth_pb2.ApiKey(name="writer", scopes=["SCOPE_WRITE"]))
    assert created.key.startswith("dh_") and created.api_key.name == "writer"
    assert (await client.revoke_api_key(created.api_key.id)).revoke_time.seconds > 0
    assert (await client.cache_stats()).backend == "memory"


async def test_an_execution_is_watched_to_its_end_and_events_stream_live(client):
    workflow = await client.create_workflow(json_format.ParseDict(DEPLOY_GATE, workflows_pb2.Workflow()))
    execution = await client.execute_workflow(workflow.id, DEPLOY_INPUT, idempotency_key="once")
    assert (await client.execute_workflow(workflow.id, DEPLOY_INPUT, idempotency_key="once")).id == execution.id
    watched = [event async for event in client.watch_execution(execution.id)]
    assert watched[-1].type == "execution.succeeded"
    assert {e.data["step_id"] for e in watched if e.type == "step.succeeded"} == {"validate", "latency", "gate", "announce"}
    final = await client.get_execution(execution.id)
    assert final.status == workflows_pb2.Execution.SUCCEEDED
    assert [e.id async for e in client.list_executions(workflow_id=workflow.id)] == [execution.id]

    kind = f"client.test.{uuid.uuid4().hex[:6]}"
    stream = client.stream_events(type=kind)
    first = asyncio.ensure_future(anext(stream))
    # The stream starts at the newest event when it opens: publish until it sees one.
    while not first.done():
        await client.publish_event(events_pb2.Event(type=kind, source="client-test"))
        await asyncio.wait([first], timeout=0.3)
    assert first.result().type == kind
    await stream.aclose()
    assert [e.type async for e in client.list_events(type=kind)][0] == kind


async def test_rate_limits_tell_how_long_to_wait(sqlite_url):
    settings = auth_settings(sqlite_url, rate_limit_requests=2, rate_limit_window=60)
    async with running_stack(settings) as stack, Client.connect(_addresses(stack.settings), ADMIN_KEY) as client:
        with pytest.raises(errors.RateLimited) as limited:
            for _ in range(3):
                await client.whoami()
        # One token comes back every 60/2 = 30 seconds.
        assert limited.value.retry_after is not None and 25 <= limited.value.retry_after <= 30


async def test_a_missing_server_is_unavailable_and_a_missing_part_is_named():
    async with Client.connect({"agents": f"127.0.0.1:{free_port()}"}, timeout=3) as client:
        with pytest.raises(errors.Unavailable):
            await client.get_agent("builtin-text")
        with pytest.raises(ValueError, match="workflows"):
            await client.get_workflow("deploy-gate")


def test_the_service_config_retries_reads_only_and_gives_streams_no_deadline():
    configs = json.loads(service_config(timeout=7))["methodConfig"]
    policy = {(n["service"].rsplit(".", 1)[1], n["method"]): c for c in configs for n in c["name"]}
    assert policy[("AgentsService", "GetAgent")]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert policy[("AgentsService", "GetAgent")]["timeout"] == "7s"
    assert "retryPolicy" not in policy[("AgentsService", "CreateAgent")]
    assert "retryPolicy" not in policy[("WorkflowsService", "ExecuteWorkflow")]
    assert "timeout" not in policy[("EventsService", "StreamEvents")]
    # Every method of every service has its entry, read from the descriptors.
    assert set(policy) == {(s.name, m.name) for s in SERVICES.values() for m in s.methods}
    assert all(("retryPolicy" in policy[(s.name, m.name)]) == is_read(m) for s in SERVICES.values() for m in s.methods)



async def test_make_key_calls_the_running_stack_through_the_client_and_falls_back_when_refused(secured, monkeypatch, capsys):
    stack, _ = secured
    monkeypatch.delenv("DATABASE_URL", raising=False)
    created, where = await new_key_module.create(stack.settings, "through-stack", [ADMIN])
    assert created.key.startswith("dh_") and where.startswith("through the stack running at")
    # A services' key the stack does not know: refused (UNAUTHENTICATED), so the database instead.
    refused = stack.settings.replace(service_api_key=keys.new_key())
    created, where = await new_key_module.create(refused, "into-db", [ADMIN])
    assert created.key.startswith("dh_") and where.startswith("in sqlite")
    assert "refused the services' key" in capsys.readouterr().err


async def test_the_guides_example_runs_as_written(secured, client):
    """docs/client.md's asyncio example, its key the only change, against a stack
    holding the example workflow it runs (`make run` loads it)."""
    stack, _ = secured
    guide = (ROOT / "docs" / "client.md").read_text()
    example = guide.split("## The asyncio client", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert 'api_key="dh_..."' in example
    await client.create_workflow(json_format.ParseDict(DEPLOY_GATE, workflows_pb2.Workflow()))
    ran = await run_cli([sys.executable, "-c", example.replace('api_key="dh_..."', f'api_key="{ADMIN_KEY}"')], cli_env(stack.settings))
    assert ran.code == 0, ran.err
    assert "INVALID_FIELDS [('agent.id'" in ran.out and "('agent.name', 'is required')" in ran.out, ran.out
    assert ran.lines()[-1].startswith("execution.succeeded"), ran.out
