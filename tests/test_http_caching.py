"""HTTP caching semantics through the real stack: the services say how long an answer
stays fresh, the gateway adds validators and answers conditional GETs."""

from __future__ import annotations

import pytest

from tests.support.stack import gateway_client, make_settings, running_stack

VARY = "authorization, x-api-key"


@pytest.fixture
async def http(sqlite_url):
    async with running_stack(make_settings(sqlite_url), with_workflows=True) as stack:
        async with gateway_client(stack.settings, timeout=10) as client:
            yield client


async def test_a_resource_carries_its_etag_its_max_age_and_answers_304_until_it_changes(http):
    created = await http.post("/api/agents", json={"id": "a1", "name": "First", "domain": "ci"})
    assert created.status_code == 200, created.text
    # A write's answer has a validator but no freshness: it is not a read to reuse.
    assert created.headers["etag"] == f'"{created.json()["etag"]}"' and "cache-control" not in created.headers

    fetched = await http.get("/api/agents/a1")
    etag = fetched.headers["etag"]
    assert etag == f'"{fetched.json()["etag"]}"'
    assert fetched.headers["cache-control"] == "max-age=300" and fetched.headers["vary"] == VARY

    for validator in (etag, f'W/{etag}', f'"other", {etag}', "*"):
        unchanged = await http.get("/api/agents/a1", headers={"if-none-match": validator})
        assert unchanged.status_code == 304, validator
        assert unchanged.content == b""
        assert unchanged.headers["etag"] == etag and unchanged.headers["cache-control"] == "max-age=300"
        assert unchanged.headers["vary"] == VARY and "x-request-id" in unchanged.headers

    patched = await http.patch("/api/agents/a1", params={"updateMask": "name"}, json={"name": "Second"})
    assert patched.status_code == 200, patched.text
    changed = await http.get("/api/agents/a1", headers={"if-none-match": etag})
    assert changed.status_code == 200 and changed.json()["name"] == "Second"
    assert changed.headers["etag"] != etag and changed.headers["etag"] == patched.headers["etag"]


async def test_a_list_is_validated_by_its_body_and_changes_with_any_write(http):
    await http.post("/api/agents", json={"id": "l1", "name": "One", "domain": "ops"})
    listed = await http.get("/api/agents", params={"domain": "ops"})
    etag = listed.headers["etag"]
    assert listed.headers["cache-control"] == "max-age=60" and listed.headers["vary"] == VARY
    again = await http.get("/api/agents", params={"domain": "ops"}, headers={"if-none-match": etag})
    assert again.status_code == 304 and again.content == b""
    # Another page of the same list is another representation.
    other = await http.get("/api/agents", params={"domain": "ci"}, headers={"if-none-match": etag})
    assert other.status_code == 200

    await http.post("/api/agents", json={"id": "l2", "name": "Two", "domain": "ops"})
    grown = await http.get("/api/agents", params={"domain": "ops"}, headers={"if-none-match": etag})
    assert grown.status_code == 200 and [a["id"] for a in grown.json()["agents"]] == ["l1", "l2"]
    assert grown.headers["etag"] != etag


@pytest.mark.parametrize(
    ("path", "max_age"),
    [("/api/discover", 300), ("/api/workflows", 60), ("/api/workflows/fan-out", 300)],
)
async def test_every_cached_read_says_the_max_age_its_service_declares(http, path, max_age):
    workflow = {"id": "fan-out", "name": "Fan out", "steps": [{"id": "s1", "type": "TRANSFORM", "input": {"x": 1}}]}
    await http.post("/api/agents", json={"id": "d1", "name": "Found", "domain": "ci", "capabilities": ["lint"]})
    created = await http.post("/api/workflows", json=workflow)
    assert created.status_code == 200, created.text
    response = await http.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == f"max-age={max_age}"
    assert (await http.get(path, headers={"if-none-match": response.headers["etag"]})).status_code == 304


async def test_errors_and_uncacheable_reads_carry_no_freshness(http):
    missing = await http.get("/api/agents/nobody", headers={"if-none-match": "*"})
    assert missing.status_code == 404
    assert "etag" not in missing.headers and "cache-control" not in missing.headers
    executions = await http.get("/api/executions")
    assert executions.status_code == 200 and "etag" in executions.headers
    assert "cache-control" not in executions.headers and "vary" not in executions.headers
