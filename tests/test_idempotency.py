"""Safe retries (AIP-155): every create and execute RPC takes a request_id, over HTTP
the Idempotency-Key header; a retry with it gets the first answer and writes nothing
more, on SQLite and PostgreSQL, across a restart, under concurrency, and when the
first answer was lost to a connection cut during COMMIT (services/common/runtime/idempotency.py)."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import httpx
import pytest
from devops_hub.v1 import agents_pb2, agents_pb2_grpc, events_pb2
from google.protobuf import descriptor_pool

from services.agents.server import build as build_agents
from services.common.contract.api import backend_of, discover_services
from services.common.runtime.idempotency import KEY_FIELD
from services.common.runtime.process import running
from tests.support.auth import READ, WRITE, new_key
from tests.support.databases import fresh_schema
from tests.support.grpc_errors import error_reason, expect_error, field_violations
from tests.support.pg_proxy import CommitCutter
from tests.support.stack import gateway_client, make_settings, new_agent, running_stack

AGENT = {"name": "Retried", "domain": "idem", "capabilities": ["lint"]}
WORKFLOW = {"name": "Retried", "steps": [{"id": "only", "type": "TRANSFORM", "input": {"a": 1}}]}

# Each RPC whose request has a request_id: (HTTP method, path, body, how many resources
# with the test's mark it made: None when it writes nothing to count).
CALLS = {
    "CreateAgent": ("POST", "/api/agents", AGENT, "/api/agents?domain=idem", "agents"),
    "BatchCreateAgents": ("POST", "/api/agents:batchCreate", {"requests": [{"agent": AGENT}, {"agent": AGENT}]}, "/api/agents?domain=idem", "agents"),
    "ExecuteAgent": ("POST", "/api/agents/builtin-control:execute", {"capability": "control.echo", "input": {"text": "once"}}, None, None),
    "CreateWorkflow": ("POST", "/api/workflows", WORKFLOW, "/api/workflows", "workflows"),
    "ExecuteWorkflow": ("POST", "/api/workflows/fixed:execute", {"input": {"x": 1}}, "/api/executions?workflow_id=fixed", "executions"),
    "PublishEvent": ("POST", "/api/events", {"type": "idem.test", "source": "idem"}, "/api/events?source=idem", "events"),
    "CreateApiKey": ("POST", "/api/auth/keys", {"name": "retried", "scopes": ["SCOPE_READ"]}, "/api/auth/keys", "apiKeys"),
}


def test_every_method_with_a_request_id_is_covered_here():
    keyed = {m.name for s in discover_services() for m in s.methods if KEY_FIELD in m.input_type.fields_by_name}
    assert keyed == set(CALLS)
    # Of the services DevOps Hub serves (AgentRuntime's Execute is the agents' own).
    served = [s for s in discover_services() if backend_of(s)]
    create_or_execute = {m.name for s in served for m in s.methods if m.name.startswith(("Create", "BatchCreate", "Execute", "Publish"))}
    assert create_or_execute == keyed


@pytest.fixture
async def hub(database_url):
    async with running_stack(make_settings(database_url), with_workflows=True) as stack:
        async with gateway_client(stack.settings, timeout=20) as http:
            response = await http.post("/api/workflows", json={"id": "fixed", **WORKFLOW})
            assert response.status_code == 200, response.text
            yield stack, http


async def _count(http: httpx.AsyncClient, path: str, field: str) -> int:
    response = await http.get(path, headers={"cache-control": "no-cache"})
    assert response.status_code == 200, response.text
    return len(response.json().get(field, []))


@pytest.mark.parametrize("method", list(CALLS))
async def test_the_same_idempotency_key_twice_makes_one_resource_and_the_same_answer(hub, method):
    _, http = hub
    verb, path, body, listing, field = CALLS[method]
    before = await _count(http, listing, field) if listing else 0
    key = {"Idempotency-Key": str(uuid.uuid4())}
    first = await http.request(verb, path, json=body, headers=key)
    assert first.status_code == 200, first.text
    second = await http.request(verb, path, json=body, headers=key)
    assert second.status_code == 200, second.text
    if method == "CreateApiKey":
        # The secret is shown once and never stored: the retry's answer is the same key without it.
        # (Zero values are written out in JSON: the retry's key is "".)
        assert first.json()["key"].startswith("dh_") and second.json()["key"] == ""
    assert second.json() == first.json() if method != "CreateApiKey" else second.json() == {**first.json(), "key": ""}
    if listing:
        made = len(body["requests"]) if method == "BatchCreateAgents" else 1
        assert await _count(http, listing, field) == before + made
    # Without a key, the same request is a new one (and the key was the only difference).
    third = await http.request(verb, path, json=body)
    assert third.status_code == 200, third.text
    if listing:
        assert await _count(http, listing, field) == before + 2 * made


async def test_the_same_key_with_another_request_is_refused_over_http_and_grpc(hub):
    stack, http = hub
    key = {"Idempotency-Key": str(uuid.uuid4())}
    assert (await http.post("/api/agents", json=AGENT, headers=key)).status_code == 200
    other = await http.post("/api/agents", json={**AGENT, "name": "Another"}, headers=key)
    assert other.status_code == 400, other.text
    assert error_reason(other.json()) == "REQUEST_ID_REUSED" and "different request" in other.json()["message"]
    request_id = str(uuid.uuid4())
    await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent("grpc-first"), request_id=request_id))
    failure = await expect_error(
        stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent("grpc-second"), request_id=request_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert failure.reason == "REQUEST_ID_REUSED"
    # The key is per method: the same one on another method is another request.
    event = events_pb2.Event(type="idem.other", source="idem")
    published = await stack.events_stub.PublishEvent(events_pb2.PublishEventRequest(event=event, request_id=request_id))
    assert published.id


async def test_a_key_that_is_not_a_uuid4_is_invalid_argument(hub):
    stack, http = hub
    response = await http.post("/api/agents", json=AGENT, headers={"Idempotency-Key": "retry-1"})
    assert response.status_code == 400
    assert "request_id" in field_violations(response.json())
    failure = await expect_error(
        stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent("bad-key"), request_id="x" * 36)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "UUID4" in failure.fields["request_id"]
    # One longer than any id is refused by the id rule before anything reads it.
    failure = await expect_error(
        stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=new_agent("bad-key"), request_id="x" * 200)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "at most 128" in failure.fields["request_id"]
    # ExecuteWorkflow's older idempotency_key keeps its old rule: any 1-128 characters.
    too_long = await http.post("/api/workflows/fixed:execute", json={"idempotencyKey": "k" * 129})
    assert too_long.status_code == 400 and "idempotency_key" in field_violations(too_long.json())


async def test_the_body_or_query_request_id_wins_over_the_header(hub):
    _, http = hub
    in_query, in_header = str(uuid.uuid4()), str(uuid.uuid4())
    first = await http.post(f"/api/agents?requestId={in_query}", json=AGENT, headers={"Idempotency-Key": in_header})
    again = await http.post(f"/api/agents?requestId={in_query}", json=AGENT)
    assert first.status_code == again.status_code == 200
    assert first.json()["id"] == again.json()["id"]


async def test_a_key_is_scoped_to_the_caller_that_sent_it(secured):
    stack, keys_stub = secured
    alice, bob = await new_key(keys_stub, WRITE, READ), await new_key(keys_stub, WRITE, READ)
    request = agents_pb2.CreateAgentRequest(agent=agents_pb2.Agent(name="Mine", domain="scoped"), request_id=str(uuid.uuid4()))
    first = await stack.stub.CreateAgent(request, metadata=(("x-api-key", alice),))
    again = await stack.stub.CreateAgent(request, metadata=(("x-api-key", alice),))
    other = await stack.stub.CreateAgent(request, metadata=(("x-api-key", bob),))
    assert again == first and other.id != first.id


async def test_simultaneous_requests_with_one_key_write_once(hub):
    stack, _ = hub
    request_id = str(uuid.uuid4())
    request = agents_pb2.CreateAgentRequest(agent=agents_pb2.Agent(name="Raced", domain="raced"), request_id=request_id)
    answers = await asyncio.gather(*(stack.stub.CreateAgent(request) for _ in range(8)))
    assert len({a.id for a in answers}) == 1 and len({a.SerializeToString(deterministic=True) for a in answers}) == 1
    listed = await stack.stub.ListAgents(agents_pb2.ListAgentsRequest(domain="raced"))
    assert [a.id for a in listed.agents] == [answers[0].id]


async def test_simultaneous_requests_to_two_replicas_with_one_key_write_once(hub):
    """Two agents processes on one database (WORKERS=2, or two pods): the key's row, not
    any process's memory, decides which request writes."""
    stack, _ = hub
    request_id = str(uuid.uuid4())
    request = agents_pb2.CreateAgentRequest(agent=agents_pb2.Agent(name="Replicated", domain="replicas"), request_id=request_id)
    async with running(await build_agents(stack.settings.replace(agents_addr="127.0.0.1:0"))) as other:
        async with grpc.aio.insecure_channel(other.address) as channel:
            stubs = [stack.stub, agents_pb2_grpc.AgentsServiceStub(channel)]
            answers = await asyncio.gather(*(stubs[i % 2].CreateAgent(request) for i in range(8)))
    assert len({a.SerializeToString(deterministic=True) for a in answers}) == 1
    listed = await stack.stub.ListAgents(agents_pb2.ListAgentsRequest(domain="replicas"))
    assert [a.id for a in listed.agents] == [answers[0].id]


async def test_a_key_is_honoured_across_a_restart(database_url):
    request = agents_pb2.CreateAgentRequest(agent=agents_pb2.Agent(name="Durable", domain="durable"), request_id=str(uuid.uuid4()))
    settings = make_settings(database_url)
    async with running_stack(settings, with_sidecar=False) as stack:
        first = await stack.stub.CreateAgent(request)
    async with running_stack(settings, with_sidecar=False) as stack:
        again = await stack.stub.CreateAgent(request)
        listed = await stack.stub.ListAgents(agents_pb2.ListAgentsRequest(domain="durable"))
    assert again == first
    assert [a.id for a in listed.agents] == [first.id]


async def test_keys_are_pruned_after_their_retention(sqlite_url):
    request = agents_pb2.CreateAgentRequest(agent=agents_pb2.Agent(name="Short", domain="short"), request_id=str(uuid.uuid4()))
    settings = make_settings(sqlite_url, idempotency_retention=0.5, events_prune_interval=0.1)
    async with running_stack(settings, with_sidecar=False, with_workflows=True) as stack:
        first = await stack.stub.CreateAgent(request)
        db = stack.agents.db
        assert await db.fetchval("SELECT COUNT(*) FROM idempotency_keys") == 1
        for _ in range(100):
            if await db.fetchval("SELECT COUNT(*) FROM idempotency_keys") == 0:
                break
            await asyncio.sleep(0.1)
        assert await db.fetchval("SELECT COUNT(*) FROM idempotency_keys") == 0
        # Past its retention the key is free: the same request makes a new agent.
        second = await stack.stub.CreateAgent(request)
        assert second.id != first.id


@pytest.fixture
async def cut_commits(pg_server_url):
    """The test's PostgreSQL behind a proxy that can cut the connection just after the
    server has answered a COMMIT, before the answer reaches the service."""
    await fresh_schema(pg_server_url)
    async with CommitCutter(pg_server_url) as cutter:
        yield cutter


async def test_a_write_whose_commit_answer_is_lost_is_answered_from_the_store_on_retry(cut_commits):
    async with running_stack(make_settings(cut_commits.url), with_sidecar=False) as stack:
        async with gateway_client(stack.settings, timeout=20) as http:
            key = {"Idempotency-Key": str(uuid.uuid4())}
            cut_commits.arm(b"INSERT INTO agents")
            lost = await http.post("/api/agents", json=AGENT, headers=key)
            assert cut_commits.cuts == 1
            # The write committed, but the service cannot know: with a key a retry is safe, so 503.
            assert lost.status_code == 503, lost.text
            assert "retry-after" in lost.headers
            retried = await http.post("/api/agents", json=AGENT, headers=key)
            assert retried.status_code == 200, retried.text
            listed = (await http.get("/api/agents?domain=idem", headers={"cache-control": "no-cache"})).json()["agents"]
            assert [a["id"] for a in listed] == [retried.json()["id"]]

            # Without a key the outcome is unknown to the service too, and it says so: not a
            # 503 inviting a blind retry that would make a second agent.
            cut_commits.arm(b"INSERT INTO agents")
            unkeyed = await http.post("/api/agents", json={**AGENT, "domain": "idem-unkeyed"})
            assert cut_commits.cuts == 2
            assert unkeyed.status_code == 500, unkeyed.text
            assert error_reason(unkeyed.json()) == "COMMIT_OUTCOME_UNKNOWN"
            listed = (await http.get("/api/agents?domain=idem-unkeyed", headers={"cache-control": "no-cache"})).json()
            assert len(listed["agents"]) == 1


def test_request_ids_are_annotated_as_aip_155_says():
    from google.api import field_behavior_pb2, field_info_pb2

    for service in discover_services():
        for method in service.methods:
            field = method.input_type.fields_by_name.get(KEY_FIELD)
            if field is None:
                continue
            options = descriptor_pool.Default().FindFieldByName(field.full_name).GetOptions()
            assert options.Extensions[field_info_pb2.field_info].format == field_info_pb2.FieldInfo.UUID4
            assert field_behavior_pb2.OPTIONAL in options.Extensions[field_behavior_pb2.field_behavior]
