"""Input the schema admits but no engine can store, and bytes that are not a request
at all: every one is a 400 / INVALID_ARGUMENT naming what is wrong, never a 5xx, on
both engines, over HTTP and over gRPC."""

from __future__ import annotations

import struct

import grpc
import pytest
from devops_hub.v1 import agents_pb2

from tests.support.grpc_errors import error_reason, field_violations
from tests.support.stack import gateway_client, make_settings, running_stack


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
