"""ExecuteAgent through gRPC: the checks, the built-in runtime, and a remote runtime."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from devops_hub.v1 import agents_pb2, runtime_pb2, runtime_pb2_grpc
from google.protobuf import duration_pb2, field_mask_pb2, json_format, struct_pb2

from services.common.runtime.grpc_host import GrpcHost
from services.common.telemetry.metrics import service_metrics
from tests.support.grpc_errors import expect_error
from tests.support.stack import create_builtin_agents, make_settings, running_stack

Agent = agents_pb2.Agent
AgentResult = runtime_pb2.AgentResult


def struct(value: dict) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


@pytest.fixture
async def stack(sqlite_url):
    async with running_stack(make_settings(sqlite_url), with_workflows=False) as running:
        await create_builtin_agents(running.stub)
        yield running


async def run(stack, agent_id: str, capability: str, input: dict, **extra) -> AgentResult:
    request = agents_pb2.ExecuteAgentRequest(id=agent_id, capability=capability, input=struct(input), **extra)
    return await stack.stub.ExecuteAgent(request)


@pytest.mark.parametrize(
    ("agent_id", "capability", "input", "output"),
    [
        ("builtin-json", "json.pick", {"document": {"a": {"b": [1, 2]}}, "fields": {"x": "a.b.1"}}, {"x": 2}),
        ("builtin-json", "json.merge", {"objects": [{"a": {"x": 1}}, {"a": {"y": 2}, "b": 3}]}, {"a": {"x": 1, "y": 2}, "b": 3}),
        ("builtin-text", "text.render", {"template": "v${n} of ${s}", "values": {"n": 3, "s": "api"}}, {"text": "v3 of api"}),
        ("builtin-aggregate", "aggregate.stats", {"values": [1, 2, 3, 6]}, {"count": 4, "sum": 12, "min": 1, "max": 6, "mean": 3}),
        ("builtin-schema", "schema.validate", {"document": {"a": 1}, "schema": {"type": "object", "required": ["a"]}}, {"valid": True, "errors": []}),
        ("builtin-control", "control.echo", {"hello": "world"}, {"hello": "world"}),
        ("builtin-control", "control.wait", {"seconds": 0.01}, {"waited": 0.01}),
    ],
)
async def test_builtin_agents_compute(stack, agent_id, capability, input, output):
    result = await run(stack, agent_id, capability, input)
    assert result.outcome == AgentResult.SUCCEEDED, result.error
    assert json_format.MessageToDict(result.output) == output
    assert result.duration.ToTimedelta().total_seconds() >= 0


async def test_invalid_documents_are_reported_not_failed(stack):
    result = await run(stack, "builtin-schema", "schema.validate", {"document": {"a": "x"}, "schema": {"properties": {"a": {"type": "number"}}}})
    assert result.outcome == AgentResult.SUCCEEDED
    output = json_format.MessageToDict(result.output)
    assert output["valid"] is False and output["errors"][0]["path"] == "a"


@pytest.mark.parametrize(
    ("agent_id", "capability", "input", "words"),
    [
        ("builtin-text", "text.render", {"template": "${missing}"}, "missing"),
        ("builtin-json", "json.pick", {"document": {}, "fields": {"x": "nope"}}, "nope"),
        ("builtin-aggregate", "aggregate.stats", {"values": ["a"]}, "numbers"),
        ("builtin-schema", "schema.validate", {"document": 1, "schema": {"type": 12}}, "not a valid JSON Schema"),
        ("builtin-control", "control.fail", {"fail_attempts": 1, "message": "boom"}, "boom"),
    ],
)
async def test_a_failing_agent_is_a_failed_result(stack, agent_id, capability, input, words):
    result = await run(stack, agent_id, capability, input)
    assert result.outcome == AgentResult.FAILED and words in result.error


async def test_attempt_reaches_the_agent(stack):
    result = await run(stack, "builtin-control", "control.fail", {"fail_attempts": 1}, attempt=2)
    assert result.outcome == AgentResult.SUCCEEDED and json_format.MessageToDict(result.output) == {"attempt": 2}


async def test_deadline_bounds_the_agent(stack):
    result = await run(stack, "builtin-control", "control.wait", {"seconds": 5}, timeout=duration_pb2.Duration(nanos=200_000_000))
    assert result.outcome == AgentResult.TIMED_OUT
    # The caller's own deadline is shorter still: the call ends within it.
    request = agents_pb2.ExecuteAgentRequest(id="builtin-control", capability="control.wait", input=struct({"seconds": 5}))
    result = await stack.stub.ExecuteAgent(request, timeout=1.0)
    assert result.outcome == AgentResult.TIMED_OUT


async def test_checks_before_running(stack):
    await expect_error(run(stack, "ghost", "x", {}), grpc.StatusCode.NOT_FOUND)
    missing = await expect_error(run(stack, "builtin-text", "teleport", {}), grpc.StatusCode.INVALID_ARGUMENT)
    assert "capability" in missing.fields and "text.render" in missing.fields["capability"]
    for status, code in [(Agent.RETIRED, grpc.StatusCode.FAILED_PRECONDITION), (Agent.DEPRECATED, grpc.StatusCode.FAILED_PRECONDITION),
                         (Agent.MAINTENANCE, grpc.StatusCode.UNAVAILABLE)]:
        await stack.stub.UpdateAgent(agents_pb2.UpdateAgentRequest(
            agent=Agent(id="builtin-text", status=status), update_mask=field_mask_pb2.FieldMask(paths=["status"])))
        failure = await expect_error(run(stack, "builtin-text", "text.render", {"template": "x"}), code)
        assert Agent.Status.Name(status) in failure.message
    no_endpoint = Agent(id="plain", name="Plain", domain="ci", capabilities=["work"])
    await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=no_endpoint))
    failure = await expect_error(run(stack, "plain", "work", {}), grpc.StatusCode.FAILED_PRECONDITION)
    assert failure.reason == "AGENT_NO_ENDPOINT"


class EchoRuntime(runtime_pb2_grpc.AgentRuntimeServicer):
    """An external agent: answers with what it was asked, or fails on request."""

    async def Execute(self, request, context):
        data = json_format.MessageToDict(request.input)
        if data.get("fail"):
            return AgentResult(outcome=AgentResult.FAILED, error="external agent refused")
        if data.get("sleep"):
            await asyncio.sleep(data["sleep"])
        result = AgentResult(outcome=AgentResult.SUCCEEDED)
        result.output.update({"agent": request.agent_id, "capability": request.capability, "attempt": request.attempt, **data})
        return result


async def test_remote_runtime_at_the_agent_endpoint(stack):
    host = GrpcHost("127.0.0.1:0", metrics=service_metrics().grpc)
    host.add(runtime_pb2_grpc.add_AgentRuntimeServicer_to_server, EchoRuntime(), "devops_hub.v1.AgentRuntime")
    port = await host.start()
    try:
        agent = Agent(id="remote", name="Remote", domain="ci", capabilities=["echo"], endpoint=f"127.0.0.1:{port}")
        await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=agent))
        ok = await run(stack, "remote", "echo", {"x": 1})
        assert ok.outcome == AgentResult.SUCCEEDED
        assert json_format.MessageToDict(ok.output) == {"agent": "remote", "capability": "echo", "attempt": 1, "x": 1}
        failed = await run(stack, "remote", "echo", {"fail": True})
        assert failed.outcome == AgentResult.FAILED and failed.error == "external agent refused"
        slow = await run(stack, "remote", "echo", {"sleep": 2}, timeout=duration_pb2.Duration(nanos=200_000_000))
        assert slow.outcome == AgentResult.TIMED_OUT
    finally:
        await host.stop(0)
    gone = await run(stack, "remote", "echo", {"x": 1})
    assert gone.outcome == AgentResult.FAILED and "UNAVAILABLE" in gone.error
