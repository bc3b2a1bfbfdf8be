"""Input the schema admits but no engine can store, and bytes that are not a request
at all: every one is a 400 / INVALID_ARGUMENT naming what is wrong, never a 5xx, on
both engines, over HTTP and over gRPC."""

from __future__ import annotations

import struct

import grpc
import pytest
from devops_hub.v1 import agents_pb2, events_pb2, runtime_pb2, runtime_pb2_grpc, workflows_pb2

from services.common.runtime.grpc_host import GrpcHost
from services.common.telemetry.metrics import service_metrics
from tests.support import eventually
from tests.support.grpc_errors import error_reason, expect_error, field_violations
from tests.support.stack import gateway_client, make_settings, running_stack

AgentResult = runtime_pb2.AgentResult
# What str.isdigit accepts and int() refuses: superscript three.
NOT_AN_INT_DIGIT = "\u00b3"


@pytest.fixture
async def stack_and_http(database_url):
    async with running_stack(make_settings(database_url), with_workflows=True) as stack:
        async with gateway_client(stack.settings, timeout=10) as client:
            yield stack, client


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "field"),
    [
        ("get", "/api/agents/abc%00def", {}, "id"),
        ("get", "/api/discover", {"params": {"capability": "\x00"}}, "capability"),
        ("get", "/api/agents", {"params": {"domain": "a\x00"}}, "domain"),
        ("get", "/api/events", {"params": {"source": "\x00"}}, "source"),
        ("post", "/api/agents", {"json": {"id": "nul", "name": "N", "domain": "ci", "description": "a\x00b"}}, "agent.description"),
        ("post", "/api/agents", {"json": {"name": "N", "domain": "ci", "labels": {"k\x00": "v"}}}, "agent.labels"),
        ("post", "/api/workflows/fan-out-greetings:execute", {"content": b'{"input": {"n": 1e400}}'}, "input.n"),
        ("post", "/api/workflows/fan-out-greetings:execute", {"json": {"input": {"deep": [{"s": "x\x00"}]}}}, "input.deep[0].s"),
    ],
)
async def test_values_no_engine_can_store_are_400_naming_the_field(stack_and_http, method, path, kwargs, field):
    _, http = stack_and_http
    if "content" in kwargs:
        kwargs["headers"] = {"content-type": "application/json"}
    response = await getattr(http, method)(path, **kwargs)
    assert response.status_code == 400, response.text
    # A repeated field is named with its index (capability[0]).
    assert any(name == field or name.startswith(f"{field}[") for name in field_violations(response.json())), response.text


@pytest.mark.parametrize("etag", ["99999999999999999999999", "\u00b2", "-1"])
async def test_an_etag_no_revision_has_is_a_conflict_not_a_crash(stack_and_http, etag):
    _, http = stack_and_http
    assert (await http.post("/api/agents", json={"id": "tagged", "name": "T", "domain": "ci"})).status_code == 200
    response = await http.patch("/api/agents/tagged", params={"updateMask": "name"}, json={"name": "U", "etag": etag})
    assert response.status_code == 409, response.text


async def test_garbage_bytes_are_invalid_argument_without_internal_names(stack_and_http):
    stack, _ = stack_and_http
    call = stack.channel.unary_unary("/devops_hub.v1.AgentsService/GetAgent")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"\xff\xff\xff\xff\x0f garbage", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details()
    assert "Error" not in details and "google.protobuf" not in details and "pb2" not in details, details


async def test_nul_over_grpc_names_the_field(stack_and_http):
    stack, _ = stack_and_http
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="a\x00"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "id" in caught.value.details()


async def test_oversized_ids_and_headers_are_never_429(stack_and_http):
    _, http = stack_and_http
    long_id = await http.get("/api/agents/" + "x" * 20000)
    assert long_id.status_code == 431, long_id.text
    long_header = await http.get("/api/agents", headers={"x-request-id": "r" * 20000})
    assert long_header.status_code == 431, long_header.text
    assert error_reason(long_header.json()) == "HEADERS_TOO_LARGE"


async def test_a_nan_without_a_zero_byte_is_refused_too(stack_and_http):
    """A NaN's payload bits are the sender's to choose: one with no zero byte on the
    wire must not slip past the check."""
    stack, _ = stack_and_http
    request = agents_pb2.ExecuteAgentRequest(id="builtin-control", capability="control.echo")
    request.input["n"] = float("nan")
    canonical = struct.pack("<d", float("nan"))
    crafted = request.SerializeToString().replace(canonical, b"\x01\x01\x01\x01\x01\x01\xf8\x7f")
    assert b"\x00" not in crafted
    call = stack.channel.unary_unary("/devops_hub.v1.AgentsService/ExecuteAgent")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(crafted, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input.n" in caught.value.details()


async def test_a_sum_beyond_a_double_fails_the_agent_and_the_workflow_says_why(stack_and_http):
    _, http = stack_and_http
    overflow = {"capability": "aggregate.stats", "input": {"values": [1.7e308, 1.7e308]}}
    answer = await http.post("/api/agents/builtin-aggregate:execute", json=overflow)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outcome"] == "FAILED" and "input.values" in answer.json()["error"], answer.text
    step = {"id": "sum", "type": "AGENT", "agentId": "builtin-aggregate", **overflow}
    assert (await http.post("/api/workflows", json={"id": "overflow", "name": "O", "steps": [step]})).status_code == 200
    execution = (await http.post("/api/workflows/overflow:execute", json={})).json()
    await _expect_failed_execution_naming(http, execution["id"], "input.values")


class InfiniteRuntime(runtime_pb2_grpc.AgentRuntimeServicer):
    """An external agent whose answer holds a number no JSON can carry."""

    async def Execute(self, request, context):
        result = AgentResult(outcome=AgentResult.SUCCEEDED)
        result.output["total"] = float("inf")
        return result


async def test_an_agent_answering_an_infinity_is_a_failed_result_and_a_failed_step_saying_why(stack_and_http):
    _, http = stack_and_http
    host = GrpcHost("127.0.0.1:0", metrics=service_metrics().grpc)
    host.add(runtime_pb2_grpc.add_AgentRuntimeServicer_to_server, InfiniteRuntime(), "devops_hub.v1.AgentRuntime")
    port = await host.start()
    try:
        agent = {"id": "infinite", "name": "I", "domain": "ci", "capabilities": ["sum"], "endpoint": f"127.0.0.1:{port}"}
        assert (await http.post("/api/agents", json=agent)).status_code == 200
        answer = await http.post("/api/agents/infinite:execute", json={"capability": "sum", "input": {}})
        assert answer.status_code == 200, answer.text
        assert answer.json()["outcome"] == "FAILED" and "output.total" in answer.json()["error"], answer.text
        step = {"id": "sum", "type": "AGENT", "agentId": "infinite", "capability": "sum"}
        assert (await http.post("/api/workflows", json={"id": "infinite", "name": "I", "steps": [step]})).status_code == 200
        execution = (await http.post("/api/workflows/infinite:execute", json={})).json()
        await _expect_failed_execution_naming(http, execution["id"], "output.total")
    finally:
        await host.stop(0)


async def _expect_failed_execution_naming(http, execution_id: str, words: str) -> None:
    async def ended() -> bool:
        return (await http.get(f"/api/executions/{execution_id}")).json()["status"] not in ("PENDING", "RUNNING")

    await eventually(ended, "the execution ended")
    final = (await http.get(f"/api/executions/{execution_id}")).json()
    assert final["status"] == "FAILED", final
    assert words in final["error"] and words in final["steps"][0]["error"], final


async def test_a_resume_position_int_cannot_read_is_400_naming_it(stack_and_http):
    stack, http = stack_and_http
    await stack.workflows_stub.CreateWorkflow(
        workflows_pb2.CreateWorkflowRequest(
            workflow=workflows_pb2.Workflow(
                id="w", name="W", steps=[workflows_pb2.Step(id="t", type=workflows_pb2.Step.TRANSFORM)]
            )
        )
    )
    execution = await stack.workflows_stub.ExecuteWorkflow(workflows_pb2.ExecuteWorkflowRequest(id="w"))
    for path in ("/api/events:stream", f"/api/executions/{execution.id}:watch"):
        answer = await http.get(path, params={"after": NOT_AN_INT_DIGIT})
        assert answer.status_code == 400, answer.text
        assert "after" in field_violations(answer.json())
    # Last-Event-ID, the browser's way to say the same, carries only ASCII.
    answer = await http.get(f"/api/executions/{execution.id}:watch", headers=[(b"last-event-id", NOT_AN_INT_DIGIT.encode())])
    assert answer.status_code == 400 and "last-event-id" in field_violations(answer.json()), answer.text
    stream = stack.events_stub.StreamEvents(events_pb2.StreamEventsRequest(after=NOT_AN_INT_DIGIT), timeout=10)
    failure = await expect_error(stream.read(), grpc.StatusCode.INVALID_ARGUMENT)
    assert "after" in failure.fields


async def test_a_duration_beyond_its_type_is_invalid_argument_not_internal(stack_and_http):
    stack, _ = stack_and_http
    request = agents_pb2.ExecuteAgentRequest(id="builtin-control", capability="control.echo")
    request.timeout.seconds = 2**62
    failure = await expect_error(stack.stub.ExecuteAgent(request, timeout=10), grpc.StatusCode.INVALID_ARGUMENT)
    assert "timeout" in failure.fields
    # The longest a Duration may be is still an answer (bounded by the call's own deadline).
    request.timeout.seconds = 315_576_000_000
    assert (await stack.stub.ExecuteAgent(request, timeout=10)).outcome == AgentResult.SUCCEEDED


LONG_ID = "x" * 5000


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/agents/{id}"),
        ("patch", "/api/agents/{id}?updateMask=name"),
        ("delete", "/api/agents/{id}"),
        ("post", "/api/agents/{id}:execute"),
        ("get", "/api/workflows/{id}"),
        ("delete", "/api/workflows/{id}"),
        ("post", "/api/workflows/{id}:execute"),
        ("get", "/api/executions/{id}"),
        ("post", "/api/executions/{id}:cancel"),
        ("get", "/api/executions/{id}:watch"),
        ("delete", "/api/auth/keys/{id}"),
    ],
)
async def test_an_id_longer_than_any_resource_has_is_400_not_echoed(stack_and_http, method, path):
    _, http = stack_and_http
    kwargs = {"json": {}} if method in ("post", "patch") else {}
    answer = await http.request(method.upper(), path.format(id=LONG_ID), **kwargs)
    assert answer.status_code == 400, answer.text[:300]
    # An update names its resource inside the body (agent.id), which its own check refuses.
    assert any(field in ("id", "agent.id") for field in field_violations(answer.json())), answer.text[:300]
    assert LONG_ID not in answer.text


async def test_a_long_id_over_grpc_is_invalid_argument(stack_and_http):
    stack, _ = stack_and_http
    failure = await expect_error(
        stack.workflows_stub.GetWorkflow(workflows_pb2.GetWorkflowRequest(id=LONG_ID), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "id" in failure.fields
