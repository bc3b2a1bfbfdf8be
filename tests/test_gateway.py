"""The gateway end to end: real uvicorn on an ephemeral port, real grpc.aio backends.

The backends are small in-memory test doubles (AgentsService, CacheService and a
server-streaming WatchAgent added from a descriptor built here); they record what they
receive, so these tests check transcoding, routing, errors and the operational
endpoints, not agent behaviour (the agents service has its own tests).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator

import grpc
import httpx
import pytest
from devops_hub.v1 import agents_pb2, agents_pb2_grpc, cache_pb2, cache_pb2_grpc, runtime_pb2
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, empty_pb2, json_format
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from gateway import proto_comments
from gateway.routes import build_routes
from services.common.auth.scopes import Scope, required_scopes
from services.common.contract.api import discover_services, method_path
from services.common.contract.errors import Aborted, AlreadyExists, NotFound, invalid_fields
from services.common.foundation.settings import Settings
from services.common.runtime.grpc_host import GrpcHost
from services.common.telemetry.metrics import service_metrics
from tests.support import ROOT
from tests.support.api import BACKEND_OF_SERVICE
from tests.support.stack import running_gateway

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
WATCH_SERVICE = "devops_hub.testing.AgentWatchService"


# --------------------------------------------------------------------------- doubles


class InMemoryAgents(agents_pb2_grpc.AgentsServiceServicer):
    """Enough of AgentsService to answer, remembering each method's last request and metadata."""

    def __init__(self) -> None:
        self.agents: dict[str, agents_pb2.Agent] = {}
        self.requests: dict[str, Message] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self._next_id = 0

    def _record(self, name: str, request: Message, context: grpc.aio.ServicerContext) -> None:
        self.requests[name] = request
        self.metadata[name] = {key: value for key, value in context.invocation_metadata()}

    def _get(self, agent_id: str) -> agents_pb2.Agent:
        agent = self.agents.get(agent_id)
        if agent is None:
            raise NotFound(f"agent {agent_id!r} not found", metadata={"id": agent_id})
        return agent

    def _create(self, agent: agents_pb2.Agent) -> agents_pb2.Agent:
        if not agent.name:
            raise invalid_fields([("agent.name", "is required")])
        if agent.id in self.agents:
            raise AlreadyExists(f"agent {agent.id!r} already exists", metadata={"id": agent.id})
        created = agents_pb2.Agent()
        created.CopyFrom(agent)
        if not created.id:
            self._next_id += 1
            created.id = f"agent-{self._next_id}"
        created.create_time.FromSeconds(1_700_000_000)
        created.etag = "e1"
        self.agents[created.id] = created
        return created

    async def ListAgents(self, request, context):
        self._record("ListAgents", request, context)
        matches = [
            agent
            for agent in sorted(self.agents.values(), key=lambda a: a.id)
            if (not request.domain or agent.domain == request.domain)
            and (not request.status or agent.status == request.status)
            and (not request.type or agent.type == request.type)
            and (not request.capability or request.capability in agent.capabilities)
        ]
        size = request.page_size or 50
        return agents_pb2.ListAgentsResponse(
            agents=matches[:size], next_page_token=matches[size].id if len(matches) > size else ""
        )

    async def GetAgent(self, request, context):
        self._record("GetAgent", request, context)
        if request.id == "slow":
            await asyncio.sleep(5)
        if request.id == "stopping":
            # What a backend's own stop does to a call it has not finished.
            await context.abort(grpc.StatusCode.CANCELLED, "the server is stopping")
        return self._get(request.id)

    async def CreateAgent(self, request, context):
        self._record("CreateAgent", request, context)
        return self._create(request.agent)

    async def BatchCreateAgents(self, request, context):
        self._record("BatchCreateAgents", request, context)
        return agents_pb2.BatchCreateAgentsResponse(agents=[self._create(r.agent) for r in request.requests])

    async def UpdateAgent(self, request, context):
        self._record("UpdateAgent", request, context)
        stored = self._get(request.agent.id)
        request.update_mask.MergeMessage(request.agent, stored, replace_message_field=True, replace_repeated_field=True)
        stored.etag = "e2"
        return stored

    async def DeleteAgent(self, request, context):
        self._record("DeleteAgent", request, context)
        self._get(request.id)
        del self.agents[request.id]
        return empty_pb2.Empty()

    async def ExecuteAgent(self, request, context):
        self._record("ExecuteAgent", request, context)
        self._get(request.id)
        result = runtime_pb2.AgentResult(outcome=runtime_pb2.AgentResult.SUCCEEDED)
        result.output.update({"echo": json_format.MessageToDict(request.input)})
        result.duration.FromMilliseconds(1500)
        return result

    async def DiscoverAgents(self, request, context):
        self._record("DiscoverAgents", request, context)
        matches = [
            agent
            for agent in sorted(self.agents.values(), key=lambda a: a.id)
            if set(request.capability) <= set(agent.capabilities)
            and (not request.status or agent.status == request.status)
        ]
        facets = agents_pb2.Facets()
        for agent in matches:
            facets.domain[agent.domain] += 1
        return agents_pb2.DiscoverAgentsResponse(
            agents=matches[: request.page_size or 50], total_size=len(matches), facets=facets
        )


class CacheDouble(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self) -> None:
        self.patterns: list[str] = []

    async def Invalidate(self, request, context):
        self.patterns.append(request.pattern)
        return cache_pb2.CacheInvalidateResponse(removed=3)

    async def Stats(self, request, context):
        return cache_pb2.CacheStats(hits=5, misses=5, hit_rate=0.5, evictions={"lru": 2}, backend="memory")


def watch_service() -> ServiceDescriptor:
    """A server-streaming RPC with an http rule, as a later proto would declare one:
    `rpc WatchAgent(GetAgentRequest) returns (stream Agent) {get: "/api/agents/{id}:watch"}`."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindServiceByName(WATCH_SERVICE)
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto(
        name="devops_hub/testing/agent_watch.proto",
        package="devops_hub.testing",
        syntax="proto3",
        dependency=["devops_hub/v1/agents.proto", "google/api/annotations.proto"],
    )
    method = file.service.add(name="AgentWatchService").method.add(
        name="WatchAgent",
        input_type=".devops_hub.v1.GetAgentRequest",
        output_type=".devops_hub.v1.Agent",
        server_streaming=True,
    )
    method.options.Extensions[annotations_pb2.http].get = "/api/agents/{id}:watch"
    pool.AddSerializedFile(file.SerializeToString())
    return pool.FindServiceByName(WATCH_SERVICE)


def watch_handler(agents: InMemoryAgents) -> grpc.GenericRpcHandler:
    async def watch_agent(request, context):
        if request.id == "late":  # quiet at first, like a watch waiting for a change
            await asyncio.sleep(0.3)
            yield agents_pb2.Agent(id="late", etag="rev-0")
            return
        if request.id == "flaky":  # fails after its first message
            yield agents_pb2.Agent(id="flaky", etag="rev-0")
            raise Aborted("watch interrupted", metadata={"id": "flaky"})
        agent = agents._get(request.id)
        for revision in range(3):
            yield agents_pb2.Agent(id=agent.id, name=agent.name, etag=f"rev-{revision}")

    return grpc.method_handlers_generic_handler(
        WATCH_SERVICE,
        {
            "WatchAgent": grpc.unary_stream_rpc_method_handler(
                watch_agent,
                request_deserializer=agents_pb2.GetAgentRequest.FromString,
                response_serializer=agents_pb2.Agent.SerializeToString,
            )
        },
    )


# --------------------------------------------------------------------------- fixtures


@dataclasses.dataclass
class Backends:
    agents: InMemoryAgents
    cache: CacheDouble
    agents_host: GrpcHost
    agents_addr: str
    cache_addr: str

    def settings(self, **changes) -> Settings:
        defaults = dict(
            agents_addr=self.agents_addr,
            workflows_addr=self.agents_addr,
            cache_addr=self.cache_addr,
            gateway_timeout=5.0,
        )
        return Settings(**{**defaults, **changes})


SERVICES = [*discover_services(), watch_service()]
BACKEND_OPTIONS = {
    "services": SERVICES,
    "backend_of_service": {**BACKEND_OF_SERVICE, WATCH_SERVICE: "agents"},
}


@pytest.fixture
async def backends() -> AsyncIterator[Backends]:
    agents, cache = InMemoryAgents(), CacheDouble()
    agents_host = GrpcHost("127.0.0.1:0", metrics=service_metrics().grpc)
    agents_host.add(agents_pb2_grpc.add_AgentsServiceServicer_to_server, agents, "devops_hub.v1.AgentsService")
    agents_host.add(lambda _, server: server.add_generic_rpc_handlers((watch_handler(agents),)), None, WATCH_SERVICE)
    cache_host = GrpcHost("127.0.0.1:0", metrics=service_metrics().grpc)
    cache_host.add(cache_pb2_grpc.add_CacheServiceServicer_to_server, cache, "devops_hub.v1.CacheService")
    agents_port = await agents_host.start()
    cache_port = await cache_host.start()
    yield Backends(agents, cache, agents_host, f"127.0.0.1:{agents_port}", f"127.0.0.1:{cache_port}")
    await agents_host.stop(0)
    await cache_host.stop(0)


@pytest.fixture
async def client(backends: Backends) -> AsyncIterator[httpx.AsyncClient]:
    async with running_gateway(backends.settings(), **BACKEND_OPTIONS) as base_url:
        async with httpx.AsyncClient(base_url=base_url) as http:
            yield http


@pytest.fixture
def dead_address() -> Iterator[str]:
    """A port that is bound but never listens: connections to it are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


async def create(client: httpx.AsyncClient, **agent) -> dict:
    response = await client.post("/api/agents", json=agent)
    assert response.status_code == 200, response.text
    return response.json()


def assert_error_shape(body: dict, code: int) -> None:
    assert set(body) == {"code", "message", "details"}
    assert body["code"] == code
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["details"], list)


def detail(body: dict, type_url: str) -> dict:
    matches = [d for d in body["details"] if d["@type"] == type_url]
    assert matches, f"no {type_url} in {body['details']}"
    return matches[0]


# --------------------------------------------------------------------------- transcoding


async def test_create_uses_body_field_and_renders_proto3_json(client, backends):
    body = await create(client, id="a1", name="linter", domain="ci", type="SERVICE", capabilities=["lint"], metadata={"team": "x"})

    sent = backends.agents.requests["CreateAgent"]
    assert sent.agent.name == "linter" and sent.agent.type == agents_pb2.Agent.SERVICE
    assert list(sent.agent.capabilities) == ["lint"] and dict(sent.agent.metadata) == {"team": "x"}
    # lowerCamelCase keys, enums by name, Timestamp as RFC 3339.
    assert body["createTime"] == "2023-11-14T22:13:20Z"
    assert body["type"] == "SERVICE" and body["metadata"] == {"team": "x"}
    assert "create_time" not in body


async def test_get_binds_path_variable(client, backends):
    await create(client, id="a1", name="linter", domain="ci")

    response = await client.get("/api/agents/a1")

    assert response.status_code == 200
    assert response.json()["name"] == "linter"
    assert backends.agents.requests["GetAgent"].id == "a1"


async def test_path_variable_is_percent_decoded(client, backends):
    response = await client.get("/api/agents/a%20b%2Fc")

    assert response.status_code == 404
    assert backends.agents.requests["GetAgent"].id == "a b/c"


async def test_update_sets_nested_path_variable_over_the_body(client, backends):
    await create(client, id="a1", name="linter", domain="ci")

    response = await client.patch("/api/agents/a1?update_mask=name", json={"id": "ignored", "name": "renamed", "domain": "x"})

    assert response.status_code == 200, response.text
    sent = backends.agents.requests["UpdateAgent"]
    assert sent.agent.id == "a1"
    assert sent.agent.name == "renamed"
    assert list(sent.update_mask.paths) == ["name"]
    assert response.json()["name"] == "renamed" and response.json()["domain"] == "ci"


async def test_update_mask_accepts_lower_camel_case_parameter(client, backends):
    await create(client, id="a1", name="linter", domain="ci")

    response = await client.patch("/api/agents/a1", params={"updateMask": "domain,capabilities"}, json={"domain": "sec"})

    assert response.status_code == 200
    assert list(backends.agents.requests["UpdateAgent"].update_mask.paths) == ["domain", "capabilities"]


async def test_batch_create_parses_the_whole_request_from_the_body(client, backends):
    response = await client.post(
        "/api/agents:batchCreate",
        json={"requests": [{"agent": {"id": "b1", "name": "one", "domain": "ci"}}, {"agent": {"name": "two", "domain": "ci"}}]},
    )

    assert response.status_code == 200, response.text
    assert [a["name"] for a in response.json()["agents"]] == ["one", "two"]
    assert len(backends.agents.requests["BatchCreateAgents"].requests) == 2


async def test_execute_takes_the_path_id_and_the_rest_from_the_body(client, backends):
    await create(client, id="a1", name="linter", domain="ci")

    response = await client.post(
        "/api/agents/a1:execute",
        json={"id": "ignored", "capability": "lint", "input": {"files": ["a.py"], "strict": True}, "timeout": "2.5s"},
    )

    assert response.status_code == 200, response.text
    sent = backends.agents.requests["ExecuteAgent"]
    assert sent.id == "a1" and sent.capability == "lint"
    assert json_format.MessageToDict(sent.input) == {"files": ["a.py"], "strict": True}
    assert sent.timeout.ToMilliseconds() == 2500
    # Struct as a plain object, Duration as "1.500s", enums by name.
    assert response.json() == {
        "outcome": "SUCCEEDED",
        "output": {"echo": {"files": ["a.py"], "strict": True}},
        "duration": "1.500s",
        "error": "",  # zero values are written, not left out
    }


async def test_delete_renders_empty_as_an_empty_object_and_takes_query(client, backends):
    await create(client, id="a1", name="linter", domain="ci")

    response = await client.delete("/api/agents/a1", params={"etag": "e1"})

    assert response.status_code == 200
    assert response.json() == {}
    sent = backends.agents.requests["DeleteAgent"]
    assert (sent.id, sent.etag) == ("a1", "e1")


async def test_list_query_parameters_enum_by_name_and_number(client, backends):
    await create(client, id="a1", name="one", domain="ci", status="ACTIVE", type="SERVICE")
    await create(client, id="a2", name="two", domain="ci", status="INACTIVE", type="SERVICE")

    response = await client.get("/api/agents", params={"status": "ACTIVE", "type": "2", "page_size": "5", "pageToken": "t"})

    assert response.status_code == 200
    assert [a["id"] for a in response.json()["agents"]] == ["a1"]
    sent = backends.agents.requests["ListAgents"]
    assert sent.status == agents_pb2.Agent.ACTIVE
    assert sent.type == agents_pb2.Agent.SERVICE
    assert sent.page_size == 5 and sent.page_token == "t"


async def test_discover_repeated_query_parameter_and_maps(client, backends):
    await create(client, id="a1", name="one", domain="ci", capabilities=["lint", "test"])
    await create(client, id="a2", name="two", domain="sec", capabilities=["lint"])

    response = await client.get("/api/discover?capability=lint&capability=test")

    assert response.status_code == 200
    assert list(backends.agents.requests["DiscoverAgents"].capability) == ["lint", "test"]
    body = response.json()
    assert body["totalSize"] == 1
    assert body["facets"]["domain"] == {"ci": 1}


async def test_cache_routes_reach_the_cache_backend_with_int64_as_strings(client, backends):
    invalidated = await client.post("/api/cache:invalidate", json={"pattern": "agents:*"})
    stats = await client.get("/api/cache/stats")

    assert invalidated.status_code == 200 and invalidated.json() == {"removed": "3"}
    assert backends.cache.patterns == ["agents:*"]
    # Zero values are written too: a count of 0 is "0", an empty map {}.
    zeros = {"entries": "0", "bytes": "0", "sets": "0", "invalidations": "0", "namespaces": {}, "backendErrors": "0", "backendSwitches": "0"}
    assert stats.json() == {"hits": "5", "misses": "5", "hitRate": 0.5, "evictions": {"lru": "2"}, "backend": "memory", **zeros}


async def test_headers_are_forwarded_as_metadata_and_request_id_echoed(client, backends):
    await create(client, id="a1", name="linter", domain="ci")

    response = await client.get(
        "/api/agents/a1", headers={"Authorization": "Bearer t0k", "X-API-Key": "k1", "X-Request-ID": "req-42"}
    )

    assert response.headers["x-request-id"] == "req-42"
    seen = backends.agents.metadata["GetAgent"]
    assert seen["authorization"] == "Bearer t0k"
    assert seen["x-api-key"] == "k1"
    assert seen["x-request-id"] == "req-42"


async def test_non_ascii_credentials_are_400_not_a_crash(client, backends):
    response = await client.get("/api/agents/a1", headers={"authorization": "Bearer caf\xe9".encode("latin-1")})

    assert response.status_code == 400
    assert detail(response.json(), BAD_REQUEST)["fieldViolations"][0]["field"] == "authorization"
    assert "GetAgent" not in backends.agents.requests


async def test_missing_request_id_is_generated_and_matches_what_the_backend_saw(client, backends):
    response = await client.get("/api/agents/nope")

    generated = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert backends.agents.metadata["GetAgent"]["x-request-id"] == generated


# --------------------------------------------------------------------------- routing


async def test_custom_verb_is_not_swallowed_by_the_id_variable(client, backends):
    await create(client, id="a1", name="linter", domain="ci")

    get = await client.get("/api/agents/a1")
    watch = await client.get("/api/agents/a1:watch")
    execute = await client.post("/api/agents/a1:execute", json={"capability": "lint"})
    watch_by_post = await client.post("/api/agents/a1:watch")
    execute_by_get = await client.get("/api/agents/a1:execute")

    assert get.headers["content-type"] == "application/json" and get.json()["id"] == "a1"
    assert watch.headers["content-type"].startswith("text/event-stream")
    assert execute.status_code == 200 and backends.agents.requests["ExecuteAgent"].id == "a1"
    assert backends.agents.requests["GetAgent"].id == "a1"
    assert watch_by_post.status_code == 405 and watch_by_post.headers["allow"] == "GET"
    assert execute_by_get.status_code == 405 and execute_by_get.headers["allow"] == "POST"
    assert_error_shape(execute_by_get.json(), 12)


async def test_colon_that_is_no_known_verb_stays_part_of_the_id(client, backends):
    response = await client.get("/api/agents/a:b")

    assert response.status_code == 404
    assert backends.agents.requests["GetAgent"].id == "a:b"


async def test_batch_create_verb_route_versus_id_route(client, backends):
    batch_get = await client.get("/api/agents:batchCreate")
    id_post = await client.post("/api/agents/batchCreate", json={})
    id_get = await client.get("/api/agents/batchCreate")

    assert batch_get.status_code == 405 and batch_get.headers["allow"] == "POST"
    assert id_post.status_code == 405 and id_post.headers["allow"] == "DELETE, GET, PATCH"
    assert id_get.status_code == 404
    assert backends.agents.requests["GetAgent"].id == "batchCreate"
    assert "BatchCreateAgents" not in backends.agents.requests


async def test_unknown_path_is_404_in_the_error_shape(client):
    for path in ("/nope", "/api/agents/a1/extra", "/api/agents/"):
        response = await client.get(path)
        assert response.status_code == 404, path
        body = response.json()
        assert_error_shape(body, 5)
        assert path in body["message"]
        assert detail(body, ERROR_INFO)["reason"] == "ROUTE_NOT_FOUND"


async def test_wrong_method_on_a_fixed_endpoint_is_405_in_the_error_shape(client):
    response = await client.post("/health")

    assert response.status_code == 405
    assert_error_shape(response.json(), 12)


# --------------------------------------------------------------------------- errors


async def test_malformed_json_is_400(client, backends):
    response = await client.post("/api/agents", content=b'{"name": ', headers={"content-type": "application/json"})

    assert response.status_code == 400
    body = response.json()
    assert_error_shape(body, 3)
    assert "not valid JSON" in body["message"]
    assert detail(body, ERROR_INFO)["reason"] == "MALFORMED_JSON"
    assert "CreateAgent" not in backends.agents.requests


async def test_body_that_is_not_an_object_is_400(client):
    response = await client.post("/api/agents:batchCreate", json=[1, 2])

    assert response.status_code == 400
    assert "must be a JSON object" in response.json()["message"]


async def test_wrong_field_type_is_400_naming_the_field(client):
    response = await client.post("/api/agents", json={"name": 5, "domain": "ci"})

    assert response.status_code == 400
    body = response.json()
    assert_error_shape(body, 3)
    violation = detail(body, BAD_REQUEST)["fieldViolations"][0]
    assert violation["field"] == "agent.name"
    assert "agent.name" in body["message"]


async def test_unknown_body_field_is_400_naming_it(client):
    response = await client.post("/api/agents:batchCreate", json={"requests": [{"agent": {"nmae": "x"}}]})

    assert response.status_code == 400
    body = response.json()
    assert detail(body, BAD_REQUEST)["fieldViolations"] == [{"field": "requests.agent.nmae", "description": "unknown field"}]


async def test_bad_enum_name_in_query_is_400_naming_the_parameter(client):
    response = await client.get("/api/agents?status=BOGUS")

    assert response.status_code == 400
    body = response.json()
    violation = detail(body, BAD_REQUEST)["fieldViolations"][0]
    assert violation["field"] == "status"
    assert "BOGUS" in violation["description"]


async def test_non_integer_page_size_is_400_naming_it(client):
    response = await client.get("/api/agents?page_size=ten")

    assert response.status_code == 400
    body = response.json()
    assert detail(body, BAD_REQUEST)["fieldViolations"][0]["field"] == "page_size"
    assert "page_size" in body["message"]


@pytest.mark.parametrize(
    ("query", "field", "fragment"),
    [
        ("colour=red", "colour", "unknown query parameter"),
        ("domain=a&domain=b", "domain", "not repeated"),
        ("status.x=1", "status.x", "has no fields"),
    ],
)
async def test_query_parameter_problems_are_400(client, query, field, fragment):
    response = await client.get(f"/api/agents?{query}")

    assert response.status_code == 400
    body = response.json()
    assert fragment in body["message"]
    assert detail(body, BAD_REQUEST)["fieldViolations"][0]["field"] == field


async def test_query_may_not_set_what_the_body_carries(client):
    batch = await client.post("/api/agents:batchCreate?requests=x", json={"requests": []})
    create_agent = await client.post("/api/agents?agent.name=x", json={"name": "y"})

    assert batch.status_code == 400 and "request body carries every field" in batch.json()["message"]
    assert create_agent.status_code == 400 and "path or body" in create_agent.json()["message"]


async def test_backend_not_found_is_404_with_details_passed_through(client):
    response = await client.get("/api/agents/missing")

    assert response.status_code == 404
    body = response.json()
    assert_error_shape(body, 5)
    assert body["message"] == "agent 'missing' not found"
    info = detail(body, ERROR_INFO)
    assert info == {"@type": ERROR_INFO, "reason": "NOT_FOUND", "domain": "devops-hub", "metadata": {"id": "missing"}}


async def test_backend_already_exists_is_409_with_details(client):
    await create(client, id="a1", name="linter", domain="ci")

    response = await client.post("/api/agents", json={"id": "a1", "name": "again", "domain": "ci"})

    assert response.status_code == 409
    body = response.json()
    assert_error_shape(body, 6)
    assert detail(body, ERROR_INFO)["metadata"] == {"id": "a1"}


async def test_backend_invalid_argument_keeps_its_field_violations(client):
    response = await client.post("/api/agents", json={"domain": "ci"})

    assert response.status_code == 400
    violations = detail(response.json(), BAD_REQUEST)["fieldViolations"]
    assert violations == [{"field": "agent.name", "description": "is required"}]


async def test_deadline_exceeded_is_504(backends):
    async with running_gateway(backends.settings(gateway_timeout=0.2), **BACKEND_OPTIONS) as base_url:
        async with httpx.AsyncClient(base_url=base_url) as http:
            response = await http.get("/api/agents/slow")

    assert response.status_code == 504
    assert_error_shape(response.json(), 4)


async def test_a_call_the_backend_cancels_is_503_with_retry_after_not_499(backends):
    async with running_gateway(backends.settings(), **BACKEND_OPTIONS) as base_url:
        async with httpx.AsyncClient(base_url=base_url) as http:
            response = await http.get("/api/agents/stopping")

    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert_error_shape(response.json(), 1)


async def test_unreachable_backend_is_503(backends, dead_address):
    async with running_gateway(backends.settings(agents_addr=dead_address), **BACKEND_OPTIONS) as base_url:
        async with httpx.AsyncClient(base_url=base_url) as http:
            response = await http.get("/api/agents/a1")

    assert response.status_code == 503
    assert_error_shape(response.json(), 14)


# --------------------------------------------------------------------------- streaming


async def test_server_stream_is_served_as_server_sent_events(client):
    await create(client, id="a1", name="linter", domain="ci")

    async with client.stream("GET", "/api/agents/a1:watch") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payload = (await response.aread()).decode()

    events = [json.loads(line[len("data: ") :]) for line in payload.split("\n\n") if line]
    assert [e["etag"] for e in events] == ["rev-0", "rev-1", "rev-2"]
    assert all(e["id"] == "a1" for e in events)


async def test_stream_that_fails_at_once_is_a_plain_http_error(client):
    response = await client.get("/api/agents/missing:watch")

    assert response.status_code == 404
    assert_error_shape(response.json(), 5)


async def test_stream_failing_midway_ends_with_an_error_event(client):
    response = await client.get("/api/agents/flaky:watch")

    assert response.status_code == 200
    first, last = [chunk for chunk in response.text.split("\n\n") if chunk]
    assert json.loads(first.removeprefix("data: "))["etag"] == "rev-0"
    event, data = last.split("\n")
    assert event == "event: error"
    error = json.loads(data.removeprefix("data: "))
    assert_error_shape(error, 10)
    assert detail(error, ERROR_INFO)["metadata"] == {"id": "flaky"}


async def test_quiet_stream_sends_headers_before_its_first_event(client, monkeypatch):
    monkeypatch.setattr("gateway.rest.FIRST_EVENT_GRACE", 0.05)

    started = asyncio.get_running_loop().time()
    async with client.stream("GET", "/api/agents/late:watch") as response:
        # The backend waits 0.3 s before its first message; the headers do not.
        assert asyncio.get_running_loop().time() - started < 0.25
        assert response.status_code == 200
        events = [line async for line in response.aiter_lines() if line]

    assert [json.loads(e.removeprefix("data: "))["etag"] for e in events] == ["rev-0"]


# --------------------------------------------------------------------------- health


async def test_health_is_serving_when_every_backend_is(client, backends):
    response = await client.get("/health")

    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["status"] == "SERVING"
    # Every backend some route calls, and only those (no workflows routes exist yet).
    assert set(body["backends"]) == {route.backend for route in gateway_routes()} >= {"agents", "cache"}
    assert body["backends"]["cache"] == {"address": backends.cache_addr, "status": "SERVING"}


async def test_health_is_503_naming_the_unreachable_backend(backends, dead_address):
    settings = backends.settings(cache_addr=dead_address)
    async with running_gateway(settings, **BACKEND_OPTIONS) as base_url:
        async with httpx.AsyncClient(base_url=base_url) as http:
            health = await http.get("/health")
            ready = await http.get("/health/ready")
            live = await http.get("/health/live")

    assert health.status_code == 503
    assert health.headers["cache-control"] == "no-store"
    body = health.json()
    assert body["status"] == "NOT_SERVING"
    assert body["failing"] == ["cache"]
    cache = body["backends"]["cache"]
    assert cache["address"] == dead_address and cache["status"] == "UNAVAILABLE" and cache["error"]
    assert body["backends"]["agents"]["status"] == "SERVING"
    assert ready.status_code == 503 and ready.json()["failing"] == ["cache"]
    assert live.status_code == 200 and live.json() == {"status": "SERVING"}


async def test_health_is_503_when_a_backend_reports_not_serving(client, backends):
    from grpc_health.v1 import health_pb2

    await backends.agents_host.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

    response = await client.get("/health")

    assert response.status_code == 503
    body = response.json()
    on_agents_host = {name for name, info in body["backends"].items() if info["address"] == backends.agents_addr}
    assert "agents" in on_agents_host
    assert body["failing"] == sorted(on_agents_host)
    assert body["backends"]["agents"]["status"] == "NOT_SERVING"
    assert body["backends"]["cache"]["status"] == "SERVING"


# --------------------------------------------------------------------------- metrics


async def test_metrics_label_route_templates_never_raw_paths(client):
    await create(client, id="abc123", name="linter", domain="ci")
    await client.get("/api/agents/abc123")
    await client.get("/api/agents/abc123")
    await client.get("/api/agents/zzz999")
    await client.get("/no/such/path")

    response = await client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "abc123" not in text and "zzz999" not in text and "/no/such/path" not in text
    assert 'http_requests_total{method="GET",route="/api/agents/{id}",status="200"} 2.0' in text
    assert 'http_requests_total{method="GET",route="/api/agents/{id}",status="404"} 1.0' in text
    assert 'http_requests_total{method="POST",route="/api/agents",status="200"} 1.0' in text
    assert 'http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert 'http_request_duration_seconds_count{method="GET",route="/api/agents/{id}"} 3.0' in text
    # The app owns its registry: nothing from the process-wide default (python_gc_*, process_*).
    assert "python_gc_objects_collected_total" not in text


# --------------------------------------------------------------------------- openapi


def gateway_routes():
    return build_routes(SERVICES, BACKEND_OPTIONS["backend_of_service"])


def rule_bindings(services: list[ServiceDescriptor]) -> set[tuple[str, str]]:
    """(METHOD, path with variables blanked) for every http rule, read straight from the descriptors."""
    found = set()
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            rule = options.Extensions[annotations_pb2.http]
            for binding in [rule, *rule.additional_bindings]:
                kind = binding.WhichOneof("pattern")
                path = getattr(binding, kind)
                found.add((kind.upper(), re.sub(r"\{[^}]*\}", "{}", path)))
    return found


async def test_openapi_lists_exactly_the_routes(client):
    document = (await client.get("/openapi.json")).json()

    assert document["openapi"].startswith("3.0.")
    assert document["info"]["title"] and document["info"]["version"] == "v1"
    served = {
        (method.upper(), re.sub(r"\{[^}]*\}", "{}", path))
        for path, item in document["paths"].items()
        for method in item
    }
    assert served == rule_bindings(SERVICES)
    assert set(document["paths"]["/api/agents/{id}"]) == {"get", "patch", "delete"}
    assert set(document["paths"]["/api/agents:batchCreate"]) == {"post"}
    assert len({op["operationId"] for item in document["paths"].values() for op in item.values()}) == len(served)


async def test_openapi_parameters_match_path_variables_and_query_fields(client):
    document = (await client.get("/openapi.json")).json()
    paths = document["paths"]

    for path, item in paths.items():
        variables = re.findall(r"\{([^}]*)\}", path)
        for operation in item.values():
            path_params = [p["name"] for p in operation["parameters"] if p["in"] == "path"]
            assert path_params == variables, (path, operation["operationId"])
            assert all(p["required"] for p in operation["parameters"] if p["in"] == "path")

    patch = paths["/api/agents/{id}"]["patch"]
    assert "agent.id" in patch["parameters"][0]["description"]
    assert [p["name"] for p in patch["parameters"] if p["in"] == "query"] == ["updateMask"]
    assert patch["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/devops_hub.v1.Agent"}

    listing = {p["name"]: p for p in paths["/api/agents"]["get"]["parameters"]}
    assert set(listing) == {"pageSize", "pageToken", "domain", "status", "type", "capability"}
    assert listing["pageSize"]["schema"] == {"type": "integer", "format": "int32"}
    status_ref = listing["status"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert "ACTIVE" in document["components"]["schemas"][status_ref]["enum"]

    discover = {p["name"]: p for p in paths["/api/discover"]["get"]["parameters"]}
    assert discover["capability"]["schema"] == {"type": "array", "items": {"type": "string"}}

    batch = paths["/api/agents:batchCreate"]["post"]
    # Its only parameter: the header that sets request_id (a retry's key, AIP-155).
    assert [(p["name"], p["in"]) for p in batch["parameters"]] == [("Idempotency-Key", "header")]
    assert "Idempotency-Key" not in {p["name"] for p in patch["parameters"]}
    assert batch["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("BatchCreateAgentsRequest")


def test_every_rpc_of_the_api_has_a_comment_in_its_proto():
    # The OpenAPI document explains an operation in its proto's words only.
    comments = proto_comments.load()
    missing = [m.full_name for service in discover_services() for m in service.methods if m.full_name not in comments]
    assert not missing, f"write a comment above these rpcs in protos/: {missing}"


async def test_openapi_describes_every_operation_and_field_in_the_protos_words(client):
    document = (await client.get("/openapi.json")).json()
    operations = {op["operationId"]: op for item in document["paths"].values() for op in item.values()}
    listing = operations["AgentsService_ListAgents"]
    # Words written in protos/devops_hub/v1/agents.proto and options.proto, nowhere else.
    assert listing["description"].startswith("Lists agents in id order, filtered by every filter that is set.")
    assert "Callable without a key when ALLOW_ANONYMOUS_READ is true." in listing["description"]
    assert {p["name"]: p.get("description") for p in listing["parameters"]}["pageSize"] == "Default 50, at most 1000."
    comments = proto_comments.load()
    for route in build_routes(discover_services()):
        described = operations[route.operation_id]["description"]
        assert described.startswith(comments[route.method.full_name]), route.operation_id
    schemas = document["components"]["schemas"]
    assert schemas["devops_hub.v1.Facets"]["description"] == "Counts of the matching agents by each value of a field."
    assert "- `TASK`: Runs a piece of work on demand and returns." in schemas["devops_hub.v1.Agent.Type"]["description"]
    for name, schema in schemas.items():
        if not name.startswith("devops_hub.") or "properties" not in schema:
            continue
        by_json_name = {f.json_name: f.full_name for f in _descriptor(name).fields}
        for field_name, field in schema["properties"].items():
            if by_json_name[field_name] in comments:
                assert field["description"] == comments[by_json_name[field_name]], by_json_name[field_name]
    # OpenAPI 3.0 ignores what stands beside a $ref: a described reference is wrapped.
    facets = schemas["devops_hub.v1.DiscoverAgentsResponse"]["properties"]["facets"]
    assert facets == {"allOf": [{"$ref": "#/components/schemas/devops_hub.v1.Facets"}], "description": comments[
        "devops_hub.v1.DiscoverAgentsResponse.facets"
    ]}
    patch = document["paths"]["/api/agents/{id}"]["patch"]["requestBody"]
    assert patch["description"] == comments["devops_hub.v1.UpdateAgentRequest.agent"]


def _descriptor(full_name: str):
    return descriptor_pool.Default().FindMessageTypeByName(full_name)


async def test_openapi_declares_the_api_key_and_each_operation_s_scope(client):
    document = (await client.get("/openapi.json")).json()
    assert document["components"]["securitySchemes"] == {
        "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        "BearerKey": {"type": "http", "scheme": "bearer", "description": "The same API key, as `Authorization: Bearer <key>`."},
    }
    with_key = [{"ApiKeyHeader": []}, {"BearerKey": []}]
    scopes = required_scopes(SERVICES)
    routes = {route.operation_id: route for route in build_routes(SERVICES, BACKEND_OPTIONS["backend_of_service"])}
    for item in document["paths"].values():
        for operation in item.values():
            scope = scopes[method_path(routes[operation["operationId"]].method)]
            assert operation["x-required-scope"] == Scope.Name(scope)
            # Reads need no key while ALLOW_ANONYMOUS_READ is true (the default).
            assert operation["security"] == ([{}, *with_key] if scope == Scope.SCOPE_READ else with_key), operation["operationId"]
    assert document["paths"]["/api/agents"]["post"]["x-required-scope"] == "SCOPE_WRITE"


async def test_openapi_schemas_follow_the_proto3_json_mapping(client):
    document = (await client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]

    # Without the descriptions (the protos' comments: test_openapi_describes_...).
    agent = {name: {k: v for k, v in schema.items() if k != "description"} for name, schema in schemas["devops_hub.v1.Agent"]["properties"].items()}
    assert agent["createTime"] == {"type": "string", "format": "date-time", "readOnly": True}
    assert agent["metadata"] == {"type": "object", "additionalProperties": {"type": "string"}}
    assert agent["capabilities"] == {"type": "array", "items": {"type": "string"}}
    assert schemas["devops_hub.v1.CacheStats"]["properties"]["hits"]["type"] == "string"
    error = document["paths"]["/api/agents/{id}"]["get"]["responses"]["default"]["content"]["application/json"]["schema"]
    status = schemas[error["$ref"].rsplit("/", 1)[1]]
    assert set(status["properties"]) == {"code", "message", "details"}
    delete_ok = document["paths"]["/api/agents/{id}"]["delete"]["responses"]["200"]["content"]["application/json"]
    assert delete_ok["schema"] == {"type": "object"}
    watch_ok = document["paths"]["/api/agents/{id}:watch"]["get"]["responses"]["200"]["content"]
    assert list(watch_ok) == ["text/event-stream"]

    def refs(node):
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in refs(document):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref


# --------------------------------------------------------------------------- process


async def test_python_dash_m_gateway_serves_and_exits_cleanly_on_sigterm(backends):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python")]),
        "GATEWAY_PORT": "0",
        "AGENTS_ADDR": backends.agents_addr,
        "WORKFLOWS_ADDR": backends.agents_addr,
        "CACHE_ADDR": backends.cache_addr,
        "LOG_LEVEL": "WARNING",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE
    )
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=20)).decode().strip()
        match = re.fullmatch(r"gateway listening on (http://127\.0\.0\.1:\d+)", line)
        assert match, line
        async with httpx.AsyncClient(base_url=match.group(1)) as http:
            health = await http.get("/health")
            stats = await http.get("/api/cache/stats")
        assert health.status_code == 200
        assert stats.json()["backend"] == "memory"

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_no_cache_request_reaches_the_service_as_no_cache_metadata(client, backends):
    await create(client, id="fresh", name="fresh")
    for header, forwarded in (("no-cache", True), ("max-age=0, No-Cache", True), ('no-cache="x-api-key"', True),
                              ("max-age=60", False), (None, False)):
        headers = {"cache-control": header} if header else {}
        assert (await client.get("/api/agents/fresh", headers=headers)).status_code == 200
        sent = backends.agents.metadata["GetAgent"].get("cache-control")
        assert sent == ("no-cache" if forwarded else None), header
