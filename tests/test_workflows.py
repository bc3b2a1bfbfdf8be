"""Workflows end to end through the gateway: definitions, executions, events.

Each test runs on SQLite and on PostgreSQL, with the real sidecar, agents service,
workflows service and gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.support.stack import gateway_client, make_settings, running_stack

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"}


@pytest.fixture
async def hub(database_url, request):
    overrides = getattr(request, "param", {})
    async with running_stack(make_settings(database_url, **overrides), with_workflows=True) as stack:
        async with gateway_client(stack.settings, timeout=20) as client:
            yield client


async def create(http: httpx.AsyncClient, workflow: dict) -> dict:
    response = await http.post("/api/workflows", json=workflow)
    assert response.status_code == 200, response.text
    return response.json()


async def execute(http: httpx.AsyncClient, workflow_id: str, input: dict | None = None, **extra) -> dict:
    response = await http.post(f"/api/workflows/{workflow_id}:execute", json={"input": input or {}, **extra})
    assert response.status_code == 200, response.text
    return response.json()


async def wait_for(http: httpx.AsyncClient, execution_id: str, statuses=TERMINAL, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        execution = (await http.get(f"/api/executions/{execution_id}")).json()
        if execution["status"] in statuses:
            return execution
        await asyncio.sleep(0.05)
    raise AssertionError(f"execution {execution_id} never reached {statuses}: {execution}")


def steps_of(execution: dict) -> dict[str, dict]:
    return {step["stepId"]: step for step in execution["steps"]}


async def sse(http: httpx.AsyncClient, path: str, until: str, params: dict | None = None) -> AsyncIterator[dict]:
    """The events of a server-sent event stream, until one of type `until`."""
    async with http.stream("GET", path, params=params, timeout=20) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                yield event
                if event.get("type") == until:
                    return


FAN_OUT = {
    "id": "fan-out",
    "name": "Fan out and join",
    "steps": [
        {"id": "prepare", "type": "TRANSFORM", "input": {"services": "$.input.services"}},
        {
            "id": "greet",
            "type": "PARALLEL",
            "dependsOn": ["prepare"],
            "forEach": "$.steps.prepare.output.services",
            "agentId": "builtin-text",
            "capability": "text.render",
            "input": {"template": "hello ${name}", "values": {"name": "$.item"}},
        },
        {
            "id": "stats",
            "type": "AGENT",
            "agentId": "builtin-aggregate",
            "capability": "aggregate.stats",
            "input": {"values": "$.input.latencies"},
        },
        {
            "id": "join",
            "type": "AGENT",
            "dependsOn": ["greet", "stats"],
            "agentId": "builtin-json",
            "capability": "json.merge",
            "input": {"objects": [{"greetings": "$.steps.greet.output.items"}, {"mean": "$.steps.stats.output.mean"}]},
        },
    ],
}


async def test_fan_out_and_join_succeeds_with_every_output_in_place(hub):
    await create(hub, FAN_OUT)
    started = await execute(hub, "fan-out", {"services": ["api", "web", "db"], "latencies": [10, 20, 30]})
    assert started["status"] == "PENDING"
    done = await wait_for(hub, started["id"])
    assert done["status"] == "SUCCEEDED", (done.get("error"), done["steps"])
    steps = steps_of(done)
    assert {s["status"] for s in steps.values()} == {"SUCCEEDED"}
    assert all(s["attempts"] == 1 and s["startTime"] and s["endTime"] for s in steps.values())
    assert steps["greet"]["output"] == {"items": [{"text": "hello api"}, {"text": "hello web"}, {"text": "hello db"}]}
    assert steps["stats"]["output"]["mean"] == 20
    assert done["output"]["join"] == {"greetings": [{"text": "hello api"}, {"text": "hello web"}, {"text": "hello db"}], "mean": 20}
    # The join ran after both branches.
    assert steps["join"]["startTime"] >= max(steps["greet"]["endTime"], steps["stats"]["endTime"])


async def test_a_step_that_fails_twice_succeeds_on_the_third_attempt(hub):
    await create(hub, {
        "id": "flaky",
        "name": "Flaky",
        "steps": [{
            "id": "try",
            "type": "AGENT",
            "agentId": "builtin-control",
            "capability": "control.fail",
            "input": {"fail_attempts": 2, "message": "not yet"},
            "retry": {"maxAttempts": 3, "initialBackoff": "0.05s"},
        }],
    })
    done = await wait_for(hub, (await execute(hub, "flaky"))["id"])
    assert done["status"] == "SUCCEEDED", (done.get("error"), done["steps"])
    step = steps_of(done)["try"]
    assert step["attempts"] == 3 and step["output"] == {"attempt": 3}
    events = (await hub.get("/api/events", params={"correlation_id": done["id"], "page_size": 100})).json()["events"]
    retries = [e for e in events if e["type"] == "step.retrying"]
    assert len(retries) == 2 and all(e["data"]["error"] == "not yet" for e in retries)


async def test_retries_run_out_and_the_execution_fails(hub):
    await create(hub, {
        "id": "doomed",
        "name": "Doomed",
        "steps": [
            {"id": "try", "type": "AGENT", "agentId": "builtin-control", "capability": "control.fail",
             "input": {"fail_attempts": 5}, "retry": {"maxAttempts": 2, "initialBackoff": "0.01s"}},
            {"id": "after", "type": "TRANSFORM", "dependsOn": ["try"], "input": {"x": 1}},
        ],
    })
    done = await wait_for(hub, (await execute(hub, "doomed"))["id"])
    assert done["status"] == "FAILED" and "try" in done["error"]
    steps = steps_of(done)
    assert steps["try"]["status"] == "FAILED" and steps["try"]["attempts"] == 2
    assert steps["after"]["status"] == "CANCELLED"


async def test_a_step_that_times_out_times_the_execution_out(hub):
    await create(hub, {
        "id": "slow",
        "name": "Slow",
        "steps": [{"id": "nap", "type": "AGENT", "agentId": "builtin-control", "capability": "control.wait",
                   "input": {"seconds": 5}, "timeout": "0.3s"}],
    })
    done = await wait_for(hub, (await execute(hub, "slow"))["id"])
    assert done["status"] == "TIMED_OUT", done
    assert steps_of(done)["nap"]["status"] == "TIMED_OUT"


async def test_cancel_mid_run(hub):
    await create(hub, {
        "id": "long",
        "name": "Long",
        "steps": [
            {"id": "nap", "type": "AGENT", "agentId": "builtin-control", "capability": "control.wait", "input": {"seconds": 30}},
            {"id": "then", "type": "TRANSFORM", "dependsOn": ["nap"], "input": {"done": True}},
        ],
    })
    started = await execute(hub, "long")
    await wait_for(hub, started["id"], statuses={"RUNNING"})
    cancelled = await hub.post(f"/api/executions/{started['id']}:cancel", json={})
    assert cancelled.status_code == 200, cancelled.text
    body = cancelled.json()
    assert body["status"] == "CANCELLED" and body["endTime"]
    steps = steps_of(body)
    assert steps["nap"]["status"] == "CANCELLED" and steps["then"]["status"] == "CANCELLED"
    again = await hub.post(f"/api/executions/{started['id']}:cancel", json={})
    assert again.status_code == 400 and "nothing to cancel" in again.json()["message"]


async def test_watch_and_event_streams_see_every_transition_in_order(hub):
    await create(hub, {
        "id": "chain",
        "name": "Chain",
        "steps": [
            {"id": "one", "type": "TRANSFORM", "input": {"n": 1}},
            {"id": "two", "type": "WAIT", "duration": "0.2s", "dependsOn": ["one"], "input": {"n": "$.steps.one.output.n"}},
        ],
    })
    live: list[dict] = []

    async def follow_stream(subscribed: asyncio.Event) -> None:
        async with hub.stream("GET", "/api/events:stream", params={"source": "workflows"}, timeout=20) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    if event["type"] == "probe":
                        subscribed.set()
                    if event["type"].startswith(("execution.", "step.")):
                        live.append(event)
                    if event["type"] == "execution.succeeded":
                        return

    # Probes until the stream shows one: from then on its subscription is surely in place.
    subscribed = asyncio.Event()
    streaming = asyncio.create_task(follow_stream(subscribed))
    deadline = time.monotonic() + 20
    while not subscribed.is_set():
        assert time.monotonic() < deadline and not streaming.done(), "the stream never delivered a probe"
        await hub.post("/api/events", json={"type": "probe", "source": "workflows"})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(subscribed.wait(), 0.5)
    started = await execute(hub, "chain")
    watched = [event async for event in sse(hub, f"/api/executions/{started['id']}:watch", until="execution.succeeded")]
    await asyncio.wait_for(streaming, 20)

    expected = [
        ("execution.pending", ""), ("execution.running", ""),
        ("step.running", "one"), ("step.succeeded", "one"),
        ("step.running", "two"), ("step.succeeded", "two"),
        ("execution.succeeded", ""),
    ]
    assert [(e["type"], e["data"].get("step_id", "")) for e in watched] == expected
    assert [(e["type"], e["data"].get("step_id", "")) for e in live] == expected
    assert [int(e["id"]) for e in watched] == sorted(int(e["id"]) for e in watched)


async def test_watching_an_ended_execution_replays_it_and_ends(hub):
    await create(hub, {"id": "quick", "name": "Quick", "steps": [{"id": "only", "type": "TRANSFORM", "input": {"a": 1}}]})
    done = await wait_for(hub, (await execute(hub, "quick"))["id"])
    replay = [e["type"] async for e in sse(hub, f"/api/executions/{done['id']}:watch", until="execution.succeeded")]
    assert replay[0] == "execution.pending" and replay[-1] == "execution.succeeded"
    missing = await hub.get("/api/executions/nope:watch")
    assert missing.status_code == 404


async def test_idempotency_key_returns_the_same_execution(hub):
    await create(hub, {"id": "once", "name": "Once", "steps": [{"id": "only", "type": "TRANSFORM", "input": {"a": 1}}]})
    first = await execute(hub, "once", {"x": 1}, idempotencyKey="deploy-42")
    second = await execute(hub, "once", {"x": 1}, idempotencyKey="deploy-42")
    assert first["id"] == second["id"]
    third = await execute(hub, "once", {"x": 1}, idempotencyKey="deploy-43")
    assert third["id"] != first["id"]
    listed = (await hub.get("/api/executions", params={"workflow_id": "once"})).json()["executions"]
    assert [e["id"] for e in listed] == [third["id"], first["id"]]


async def test_executions_page_newest_first_and_tokens_are_checked(hub):
    await create(hub, {"id": "paged", "name": "Paged", "steps": [{"id": "only", "type": "TRANSFORM", "input": {"a": 1}}]})
    started = [(await execute(hub, "paged", {"n": n}))["id"] for n in range(5)]
    seen, token, pages = [], "", 0
    while True:
        params = {"workflow_id": "paged", "pageSize": 2, **({"pageToken": token} if token else {})}
        page = (await hub.get("/api/executions", params=params)).json()
        seen += [e["id"] for e in page["executions"]]
        pages += 1
        token = page.get("nextPageToken", "")
        if not token:
            break
    assert pages == 3
    assert seen == started[::-1]
    first = (await hub.get("/api/executions", params={"workflow_id": "paged", "pageSize": 2})).json()["nextPageToken"]
    # A token is bound to the filters it was issued for (AIP-158).
    for params in ({"workflow_id": "paged", "pageToken": "not-a-token"}, {"workflow_id": "other", "pageToken": first}):
        refused = await hub.get("/api/executions", params=params)
        assert refused.status_code == 400, refused.text
        assert "page_token" in refused.text


@pytest.mark.parametrize(
    ("steps", "field", "words"),
    [
        ([{"id": "a", "type": "TRANSFORM", "dependsOn": ["b"], "input": {}}, {"id": "b", "type": "TRANSFORM", "dependsOn": ["a"], "input": {}}],
         "workflow.steps[0].depends_on", "cycle"),
        ([{"id": "a", "type": "TRANSFORM", "dependsOn": ["ghost"], "input": {}}], "workflow.steps[0].depends_on[0]", "ghost"),
        ([{"id": "a", "type": "TRANSFORM", "input": {"x": "$.steps.b.output.y"}}, {"id": "b", "type": "TRANSFORM", "input": {}}],
         "workflow.steps[0].input", "depends_on"),
        ([{"id": "a", "type": "AGENT", "agentId": "nobody", "capability": "x"}], "workflow.steps[0].agent_id", "nobody"),
        ([{"id": "a", "type": "AGENT", "agentId": "builtin-text", "capability": "teleport"}], "workflow.steps[0].capability", "teleport"),
        ([{"id": "a", "type": "PARALLEL", "agentId": "builtin-text", "capability": "text.render"}], "workflow.steps[0].for_each", "required"),
        ([{"id": "a", "input": {}}], "workflow.steps[0].type", "one of"),
        ([{"id": "a", "type": "TRANSFORM"}, {"id": "a", "type": "TRANSFORM"}], "workflow.steps[1].id", "repeats"),
    ],
)
async def test_invalid_workflows_name_the_step(hub, steps, field, words):
    response = await hub.post("/api/workflows", json={"name": "Bad", "steps": steps})
    assert response.status_code == 400, response.text
    violations = {
        v["field"]: v["description"]
        for d in response.json()["details"] if d["@type"].endswith("BadRequest")
        for v in d["fieldViolations"]
    }
    assert field in violations and words in violations[field], violations
    assert (await hub.get("/api/workflows")).json().get("workflows", []) == []


async def test_workflow_crud_and_cached_list(hub):
    created = await create(hub, {"id": "w1", "name": "First", "steps": [{"id": "s", "type": "TRANSFORM", "input": {}}]})
    assert [w["name"] for w in (await hub.get("/api/workflows")).json()["workflows"]] == ["First"]
    patched = await hub.patch("/api/workflows/w1", params={"updateMask": "name"}, json={"name": "Renamed", "etag": created["etag"]})
    assert patched.status_code == 200, patched.text
    assert [w["name"] for w in (await hub.get("/api/workflows")).json()["workflows"]] == ["Renamed"]
    assert (await hub.get("/api/workflows/w1")).json()["name"] == "Renamed"
    stale = await hub.patch("/api/workflows/w1", json={"name": "x", "etag": created["etag"]})
    assert stale.status_code == 409
    assert (await hub.delete("/api/workflows/w1")).status_code == 200
    assert (await hub.get("/api/workflows/w1")).status_code == 404
    assert (await hub.post("/api/workflows/w1:execute", json={})).status_code == 404


async def test_conditional_false_skips_what_depends_on_it(hub):
    await create(hub, {
        "id": "gated",
        "name": "Gated",
        "steps": [
            {"id": "check", "type": "AGENT", "agentId": "builtin-schema", "capability": "schema.validate",
             "input": {"document": "$.input.doc", "schema": {"type": "object", "required": ["version"]}}},
            {"id": "gate", "type": "CONDITIONAL", "condition": "$.steps.check.output.valid", "dependsOn": ["check"]},
            {"id": "ship", "type": "TRANSFORM", "dependsOn": ["gate"], "input": {"shipped": True}},
            {"id": "after-ship", "type": "TRANSFORM", "dependsOn": ["ship"], "input": {}},
        ],
    })
    invalid = await wait_for(hub, (await execute(hub, "gated", {"doc": {"name": "x"}}))["id"])
    assert invalid["status"] == "SUCCEEDED"
    assert {k: v["status"] for k, v in steps_of(invalid).items()} == {
        "check": "SUCCEEDED", "gate": "SUCCEEDED", "ship": "SKIPPED", "after-ship": "SKIPPED"
    }
    valid = await wait_for(hub, (await execute(hub, "gated", {"doc": {"version": "1"}}))["id"])
    assert steps_of(valid)["ship"]["status"] == "SUCCEEDED" and valid["output"]["ship"] == {"shipped": True}


async def test_publish_and_list_events(hub):
    published = await hub.post("/api/events", json={"type": "deploy.started", "source": "ci", "subject": "api", "data": {"sha": "abc"}})
    assert published.status_code == 200, published.text
    assert published.json()["id"]
    listed = (await hub.get("/api/events", params={"type": "deploy.started"})).json()["events"]
    assert [(e["source"], e["data"]) for e in listed] == [("ci", {"sha": "abc"})]
    bad = await hub.post("/api/events", json={"type": "", "source": "ci"})
    assert bad.status_code == 400 and "event.type" in bad.json()["message"]
    # Agent changes are events too.
    await hub.post("/api/agents", json={"id": "evented", "name": "E", "domain": "ci"})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = (await hub.get("/api/events", params={"type": "agent.created", "source": "agents"})).json().get("events", [])
        if any(e["subject"] == "evented" for e in found):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("agent.created was never stored")


@pytest.mark.parametrize("hub", [{"workflow_max_parallel": 1}], indirect=True)
async def test_max_parallel_bounds_the_steps_of_one_execution(hub):
    steps = [{"id": f"nap{i}", "type": "WAIT", "duration": "0.15s", "input": {}} for i in range(3)]
    await create(hub, {"id": "naps", "name": "Naps", "steps": steps})
    done = await wait_for(hub, (await execute(hub, "naps"))["id"])
    assert done["status"] == "SUCCEEDED"
    spans = sorted((s["startTime"], s["endTime"]) for s in done["steps"])
    # One at a time: each starts after the one before it ended.
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1)), spans
