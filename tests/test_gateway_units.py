"""The gateway's pure parts, without sockets: path templates and the router, the error
table, json_format error explanations, and the body limit."""

from __future__ import annotations

import json

import grpc
import pytest
from devops_hub.v1 import agents_pb2, runtime_pb2
from google.protobuf import json_format

from gateway.backends import ChannelPool, backend_addresses
from gateway.errors import HTTP_STATUS, http_status
from gateway.front import GatewayFront
from gateway.metrics import HttpMetrics
from gateway.rest import RestGateway
from gateway.routes import RouteError, build_routes
from gateway.templates import NotAllowed, PathTemplate, RouteMatch, Router, TemplateError
from gateway.transcode import explain
from services.common.contract.api import backend_of, discover_services
from services.common.foundation.settings import Settings
from services.common.transport.channels import service_address
from tests.support.api import BACKEND_OF_SERVICE

pytestmark = pytest.mark.fast

# --------------------------------------------------------------------------- templates


def test_parse_simple_variable_and_verb():
    template = PathTemplate.parse("/api/agents/{id}:execute")

    assert template.segments == ("api", "agents", "*")
    assert template.verb == "execute"
    assert [(v.field_path, v.start, v.stop) for v in template.variables] == [(("id",), 2, 3)]
    assert template.openapi_path == "/api/agents/{id}:execute"


def test_parse_verb_on_a_literal_segment():
    template = PathTemplate.parse("/api/agents:batchCreate")

    assert template.segments == ("api", "agents")
    assert template.verb == "batchCreate"
    assert template.variables == ()


def test_parse_nested_field_and_multi_segment_variables():
    nested = PathTemplate.parse("/api/agents/{agent.id}")
    spanning = PathTemplate.parse("/v1/{name=projects/*/agents/*}:run")
    rest = PathTemplate.parse("/files/{path=**}")

    assert nested.variables[0].field_path == ("agent", "id")
    assert spanning.segments == ("v1", "projects", "*", "agents", "*")
    assert (spanning.variables[0].start, spanning.variables[0].stop) == (1, 5)
    assert spanning.openapi_path == "/v1/{name}:run"
    assert rest.variables[0].stop is None


@pytest.mark.parametrize(
    "text",
    ["api/agents", "/api/{id", "/api/{1d}", "/api//agents", "/api/agents/", "/a/**/b", "/a/{x}/{x}", "/a:", "/a/b{c}"],
)
def test_invalid_templates_are_refused(text):
    with pytest.raises(TemplateError):
        PathTemplate.parse(text)


def router(*bindings: tuple[str, str]) -> Router[str]:
    return Router((method, PathTemplate.parse(path), f"{method} {path}") for method, path in bindings)


AGENT_ROUTES = router(
    ("GET", "/api/agents"),
    ("GET", "/api/agents/{id}"),
    ("PATCH", "/api/agents/{agent.id}"),
    ("POST", "/api/agents:batchCreate"),
    ("POST", "/api/agents/{id}:execute"),
    ("GET", "/api/agents/stats"),
)


def test_router_keeps_the_verb_out_of_the_variable():
    get = AGENT_ROUTES.match("GET", "/api/agents/x")
    execute = AGENT_ROUTES.match("POST", "/api/agents/x:execute")
    wrong = AGENT_ROUTES.match("GET", "/api/agents/x:execute")

    assert get == RouteMatch("GET /api/agents/{id}", ("x",))
    assert execute == RouteMatch("POST /api/agents/{id}:execute", ("x",))
    assert wrong == NotAllowed(("POST",))


def test_router_shares_shapes_across_variable_names():
    assert AGENT_ROUTES.match("PATCH", "/api/agents/x") == RouteMatch("PATCH /api/agents/{agent.id}", ("x",))
    assert AGENT_ROUTES.match("DELETE", "/api/agents/x") == NotAllowed(("GET", "PATCH"))


def test_router_prefers_literals_but_falls_back_by_method():
    assert AGENT_ROUTES.match("GET", "/api/agents/stats") == RouteMatch("GET /api/agents/stats", ())
    # No PATCH on the literal: the variable route still takes it.
    assert AGENT_ROUTES.match("PATCH", "/api/agents/stats") == RouteMatch("PATCH /api/agents/{agent.id}", ("stats",))


def test_router_unknown_verbs_and_encoded_characters_stay_in_values():
    assert AGENT_ROUTES.match("GET", "/api/agents/a:b") == RouteMatch("GET /api/agents/{id}", ("a:b",))
    assert AGENT_ROUTES.match("GET", "/api/agents/a%2Fb%3Aexecute") == RouteMatch("GET /api/agents/{id}", ("a/b:execute",))


def test_router_not_found_cases():
    for path in ("/", "/api", "/api/agents/", "/api/agents//", "/api/agents/x/y", "/api/agents/:execute", "/other"):
        assert AGENT_ROUTES.match("GET", path) is None, path


def test_router_multi_segment_captures():
    routes = router(("GET", "/v1/{name=projects/*/agents/*}"), ("GET", "/files/{path=**}"))

    assert routes.match("GET", "/v1/projects/p1/agents/a1") == RouteMatch("GET /v1/{name=projects/*/agents/*}", ("projects/p1/agents/a1",))
    assert routes.match("GET", "/v1/projects/p1/other/a1") is None
    assert routes.match("GET", "/files/a/b/c.txt") == RouteMatch("GET /files/{path=**}", ("a/b/c.txt",))


def test_router_refuses_two_bindings_of_one_method_and_shape():
    with pytest.raises(TemplateError, match="ambiguous"):
        router(("GET", "/api/agents/{id}"), ("GET", "/api/agents/{name}"))


# --------------------------------------------------------------------------- routes


def test_every_generated_service_with_http_rules_has_a_backend():
    routes = build_routes(discover_services(), BACKEND_OF_SERVICE)

    assert {route.service for route in routes} <= set(BACKEND_OF_SERVICE)
    update = next(r for r in routes if r.method.name == "UpdateAgent")
    assert [f.name for f in update.path_fields[0]] == ["agent", "id"]
    assert update.body_field.name == "agent"


def test_a_service_without_a_backend_is_refused_at_start_up():
    with pytest.raises(RouteError, match="AgentsService has http rules but no backend") as refused:
        build_routes(discover_services(), {})
    # It says what to add, and where.
    assert "option (backend)" in str(refused.value)


async def test_channel_pool_opens_one_channel_per_address():
    pool = ChannelPool({"agents": "127.0.0.1:1", "workflows": "127.0.0.1:1", "cache": "127.0.0.1:2"})
    pool.open()
    try:
        assert pool.channel("agents") is pool.channel("workflows")
        assert pool.channel("cache") is not pool.channel("agents")
    finally:
        await pool.close()


def test_a_service_is_reached_at_the_address_of_the_backend_it_declares():
    settings = Settings(agents_addr="10.0.0.1:1", workflows_addr="10.0.0.2:2", cache_addr="10.0.0.3:3")
    addresses = {s.name: service_address(s, settings) for s in discover_services() if backend_of(s)}

    assert addresses["ApiKeysService"] == addresses["AgentsService"] == "10.0.0.1:1"
    assert addresses["EventsService"] == "10.0.0.2:2" and addresses["CacheService"] == "10.0.0.3:3"
    assert backend_addresses(settings, ["cache", "agents", "cache"]) == {"agents": "10.0.0.1:1", "cache": "10.0.0.3:3"}


def test_a_missing_address_names_the_setting():
    with pytest.raises(ValueError, match=r"add reports_addr \(read from REPORTS_ADDR\)"):
        Settings().backend_address("reports")
    with pytest.raises(ValueError, match="CACHE_ADDR is empty"):
        Settings(cache_addr="").backend_address("cache")
    with pytest.raises(ValueError, match="AgentRuntime declares no backend"):
        service_address(runtime_pb2.DESCRIPTOR.services_by_name["AgentRuntime"], Settings())


def test_discovery_scans_the_generated_package():
    names = {service.full_name for service in discover_services()}

    assert {"devops_hub.v1.AgentsService", "devops_hub.v1.CacheService"} <= names


# --------------------------------------------------------------------------- errors


def test_http_status_table_covers_every_grpc_code():
    assert set(HTTP_STATUS) == set(grpc.StatusCode)
    assert http_status(grpc.StatusCode.NOT_FOUND.value[0]) == 404
    assert http_status(grpc.StatusCode.ABORTED.value[0]) == 409
    assert http_status(99) == 500


@pytest.mark.parametrize(
    ("document", "path", "reason"),
    [
        ({"agent": {"name": 5}}, "agent.name", "expected string"),
        ({"agent": {"nam": "x"}}, "agent.nam", "unknown field"),
        ({"agent": {"status": "BOGUS"}}, "agent.status", "Invalid enum value BOGUS"),
        ({"agent": {"capabilities": "x"}}, "agent.capabilities", "must be in []"),
    ],
)
def test_explain_turns_json_format_errors_into_field_paths(document, path, reason):
    with pytest.raises(json_format.ParseError) as caught:
        json_format.ParseDict(document, agents_pb2.CreateAgentRequest())

    explained_path, explained_reason = explain(caught.value)

    assert explained_path == path
    assert reason in explained_reason
    assert not explained_reason.endswith(".")


# --------------------------------------------------------------------------- body limit


async def test_body_over_the_limit_is_413_before_any_backend_call():
    gateway = RestGateway(build_routes(discover_services(), BACKEND_OF_SERVICE), timeout=1.0, max_body_bytes=16)
    body = json.dumps({"name": "x" * 64}).encode()
    chunks = [{"type": "http.request", "body": body[:10], "more_body": True}, {"type": "http.request", "body": body[10:]}]
    sent: list[dict] = []

    async def receive():
        return chunks.pop(0)

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/agents",
        "raw_path": b"/api/agents",
        "query_string": b"",
        "headers": [],
    }
    await gateway(scope, receive, send)

    assert sent[0]["status"] == 413
    error = json.loads(sent[1]["body"])
    assert error["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "16 bytes" in error["message"]


async def test_a_gateway_bug_still_answers_500_in_the_error_shape_with_the_usual_headers():
    async def broken(scope, receive, send):
        raise RuntimeError("a bug")

    metrics = HttpMetrics()
    front = GatewayFront(broken, ["/health"], broken, metrics=metrics, tracer=None, profiler=None)
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/api/agents", "query_string": b"", "headers": [(b"x-request-id", b"bug-1")]}
    await front(scope, receive, send)

    assert sent[0]["status"] == 500
    headers = dict(sent[0]["headers"])
    assert headers[b"x-request-id"] == b"bug-1" and headers[b"x-content-type-options"] == b"nosniff"
    error = json.loads(sent[1]["body"])
    assert error["code"] == grpc.StatusCode.INTERNAL.value[0] and error["message"] == "internal gateway error"
    assert metrics.registry.get_sample_value(
        "http_requests_total", {"method": "GET", "route": "unmatched", "status": "500"}
    ) == 1
