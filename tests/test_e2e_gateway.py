"""The whole slice end to end: HTTP → gateway → agents service → cache sidecar → database."""

from __future__ import annotations

import pytest

from tests.support.grpc_errors import error_reason, field_violations
from tests.support.stack import gateway_client, make_settings, running_stack


@pytest.fixture
async def http(database_url):
    async with running_stack(make_settings(database_url), with_workflows=True) as stack:
        async with gateway_client(stack.settings, timeout=10) as client:
            yield client


async def test_read_after_write_through_the_gateway(http):
    created = await http.post("/api/agents", json={"id": "a1", "name": "First", "domain": "ci", "capabilities": ["lint"]})
    assert created.status_code == 200, created.text
    assert created.json()["status"] == "ACTIVE"
    for _ in range(2):  # the second round is served from the cache
        assert (await http.get("/api/agents/a1")).json()["name"] == "First"
        assert [a["name"] for a in (await http.get("/api/agents", params={"domain": "ci"})).json()["agents"]] == ["First"]

    patched = await http.patch("/api/agents/a1", params={"updateMask": "name"}, json={"name": "Second"})
    assert patched.status_code == 200, patched.text
    assert (await http.get("/api/agents/a1")).json()["name"] == "Second"
    assert [a["name"] for a in (await http.get("/api/agents", params={"domain": "ci"})).json()["agents"]] == ["Second"]

    found = (await http.get("/api/discover", params={"capability": "lint"})).json()
    assert found["totalSize"] == 1 and found["facets"]["domain"] == {"ci": 1}

    assert (await http.delete("/api/agents/a1")).status_code == 200
    gone = await http.get("/api/agents/a1")
    assert gone.status_code == 404 and error_reason(gone.json()) == "AGENT_NOT_FOUND"


async def test_zero_values_are_written_not_left_out(http):
    nothing = (await http.get("/api/discover", params={"capability": "no-such-capability"})).json()
    empty_facets = {"domain": {}, "status": {}, "type": {}, "capability": {}}
    assert nothing == {"agents": [], "totalSize": 0, "facets": empty_facets}
    assert (await http.get("/api/agents", params={"domain": "nowhere"})).json() == {"agents": [], "nextPageToken": ""}
    created = (await http.post("/api/agents", json={"id": "z1", "name": "Zero", "domain": "ci"})).json()
    assert created["capabilities"] == [] and created["metadata"] == {} and created["endpoint"] == ""
    # And the reference says so.
    assert "write zero values" in (await http.get("/openapi.json")).json()["info"]["description"]


async def test_batch_create_and_pages_through_the_gateway(http):
    requests = [{"agent": {"id": f"b{i:03d}", "name": f"B{i}", "domain": "ops"}} for i in range(250)]
    created = await http.post("/api/agents:batchCreate", json={"requests": requests})
    assert created.status_code == 200, created.text
    assert len(created.json()["agents"]) == 250
    seen, token = [], None
    while True:
        params = {"page_size": 100, "domain": "ops", **({"page_token": token} if token else {})}
        page = (await http.get("/api/agents", params=params)).json()
        seen += [a["id"] for a in page["agents"]]
        token = page.get("nextPageToken")
        if not token:
            break
    assert seen == [f"b{i:03d}" for i in range(250)]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "field"),
    [
        ("post", "/api/agents", {"json": {"name": "", "domain": "ci"}}, 400, "agent.name"),
        ("post", "/api/agents", {"json": {"name": "x", "domain": "ci", "status": "SLEEPY"}}, 400, "status"),
        ("post", "/api/agents", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, None),
        ("post", "/api/agents", {"json": {"name": 5, "domain": "ci"}}, 400, "name"),
        ("get", "/api/agents", {"params": {"page_size": -1}}, 400, "page_size"),
        ("get", "/api/agents", {"params": {"page_size": "many"}}, 400, "page_size"),
        ("get", "/api/agents/nobody", {}, 404, None),
        ("delete", "/api/agents/nobody", {}, 404, None),
        ("get", "/api/nothing-here", {}, 404, None),
    ],
)
async def test_bad_input_gets_a_clear_error(http, method, path, kwargs, status, field):
    response = await getattr(http, method)(path, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"code", "message", "details"}
    assert body["message"]
    if field:
        assert field in body["message"] or field in field_violations(body), body


async def test_conflicts_are_409(http):
    body = {"id": "dup", "name": "Dup", "domain": "ci"}
    assert (await http.post("/api/agents", json=body)).status_code == 200
    again = await http.post("/api/agents", json=body)
    assert again.status_code == 409 and again.json()["code"] == 6
    stale = await http.patch("/api/agents/dup", json={"name": "x", "etag": "41"})
    assert stale.status_code == 409 and error_reason(stale.json()) == "ETAG_MISMATCH"


async def test_health_metrics_and_openapi(http):
    health = await http.get("/health")
    assert health.status_code == 200, health.text
    assert "no-store" in health.headers.get("cache-control", "")
    await http.get("/api/agents/x1")
    metrics = await http.get("/metrics")
    assert metrics.status_code == 200 and "/api/agents/{id}" in metrics.text and "/api/agents/x1" not in metrics.text
    spec = (await http.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    assert {"/api/agents", "/api/agents/{id}", "/api/agents:batchCreate", "/api/discover"} <= set(spec["paths"])
