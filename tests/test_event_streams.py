"""Event streams start at "now" for every subscriber and resume from a position.

StreamEvents over gRPC (`after`) and GET /api/events:stream over HTTP (Last-Event-ID),
WatchExecution and its :watch route the same way; on SQLite and PostgreSQL, with the
real services and gateway.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import httpx
import pytest
from devops_hub.v1 import events_pb2, events_pb2_grpc

from tests.support.grpc_errors import failure_of
from tests.support.stack import gateway_client, make_settings, running_stack

WAIT = 20.0


@dataclass
class Hub:
    events: events_pb2_grpc.EventsServiceStub
    http: httpx.AsyncClient


@pytest.fixture
async def hub(database_url) -> AsyncIterator[Hub]:
    async with running_stack(make_settings(database_url), with_workflows=True) as stack:
        async with gateway_client(stack.settings, timeout=WAIT) as http:
            yield Hub(stack.events_stub, http)


async def publish(hub: Hub, source: str, type_: str) -> events_pb2.Event:
    return await hub.events.PublishEvent(events_pb2.PublishEventRequest(event=events_pb2.Event(type=type_, source=source)))


@asynccontextmanager
async def grpc_stream(hub: Hub, source: str, after: str = "") -> AsyncIterator[grpc.aio.UnaryStreamCall]:
    call = hub.events.StreamEvents(events_pb2.StreamEventsRequest(source=source, after=after))
    try:
        yield call
    finally:
        call.cancel()


async def next_event(call: grpc.aio.UnaryStreamCall) -> events_pb2.Event:
    event = await asyncio.wait_for(call.read(), WAIT)
    assert event is not grpc.aio.EOF
    return event


async def first_live_event(hub: Hub, call: grpc.aio.UnaryStreamCall, source: str) -> events_pb2.Event:
    """Publishes probes until the stream shows one: from then on its subscription is
    surely in place. Returns the first event the stream delivered."""
    deadline = time.monotonic() + WAIT
    reading = asyncio.ensure_future(call.read())
    try:
        while time.monotonic() < deadline:
            await publish(hub, source, "probe")
            done, _ = await asyncio.wait((reading,), timeout=0.5)
            if done:
                return reading.result()
        raise AssertionError("the stream never delivered an event")
    finally:
        reading.cancel()


async def test_every_subscriber_starts_at_now_even_after_the_last_one_left(hub):
    source = "streams-now"
    before = await publish(hub, source, "before.first")
    async with grpc_stream(hub, source) as first:
        seen = await first_live_event(hub, first, source)
        assert seen.type == "probe" and int(seen.id) > int(before.id)
        # A second subscriber joining the running poller starts at its own now too.
        between = await publish(hub, source, "between")
        async with grpc_stream(hub, source) as second:
            seen = await first_live_event(hub, second, source)
            assert seen.type == "probe" and int(seen.id) > int(between.id)
    # Everyone has left, so the poller stops; the next subscriber must not get what
    # was stored meanwhile.
    await asyncio.sleep(0.5)
    meanwhile = await publish(hub, source, "while.nobody.listened")
    async with grpc_stream(hub, source) as third:
        seen = await first_live_event(hub, third, source)
        assert seen.type == "probe" and int(seen.id) > int(meanwhile.id)


async def test_a_grpc_stream_resumes_after_the_given_event_then_goes_live(hub):
    source = "streams-grpc-resume"
    one, two, three = [await publish(hub, source, f"step.{n}") for n in ("one", "two", "three")]
    await publish(hub, "someone-else", "step.two")  # filtered out
    async with grpc_stream(hub, source, after=one.id) as call:
        assert [(await next_event(call)).id for _ in range(2)] == [two.id, three.id]
        four = await publish(hub, source, "step.four")
        assert (await next_event(call)).id == four.id


async def test_a_resume_position_ahead_of_the_log_delivers_only_what_comes_after_it(hub):
    source = "streams-ahead"
    newest = await publish(hub, source, "now")
    ahead = str(int(newest.id) + 2)
    async with grpc_stream(hub, source, after=ahead) as call:
        published = [await publish(hub, source, f"next.{n}") for n in range(4)]
        later = [event for event in published if int(event.id) > int(ahead)]
        assert [(await next_event(call)).id for _ in later] == [event.id for event in later]


async def test_a_resume_position_that_is_not_an_event_id_is_invalid(hub):
    async with grpc_stream(hub, "x", after="yesterday") as call:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "after" in failure_of(caught.value).fields
    response = await hub.http.get("/api/events:stream", headers={"Last-Event-ID": "-1"})
    assert response.status_code == 400, response.text


async def sse_events(http: httpx.AsyncClient, path: str, count: int, **kwargs) -> list[tuple[str, dict]]:
    """The first `count` (id, event) pairs of a server-sent event stream."""
    events: list[tuple[str, dict]] = []
    event_id = ""
    async with http.stream("GET", path, timeout=WAIT, **kwargs) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                events.append((event_id, json.loads(line[6:])))
                if len(events) == count:
                    break
    return events


async def test_sse_events_carry_their_id_and_last_event_id_resumes(hub):
    source = "streams-sse-resume"
    one, two, three = [await publish(hub, source, f"deploy.{n}") for n in ("one", "two", "three")]
    events = await asyncio.wait_for(
        sse_events(hub.http, "/api/events:stream", 2, params={"source": source}, headers={"Last-Event-ID": one.id}), WAIT
    )
    assert [(event_id, event["id"], event["type"]) for event_id, event in events] == [
        (two.id, two.id, "deploy.two"),
        (three.id, three.id, "deploy.three"),
    ]
    # The query's own `after` wins over the header.
    events = await asyncio.wait_for(
        sse_events(
            hub.http, "/api/events:stream", 1, params={"source": source, "after": two.id}, headers={"Last-Event-ID": one.id}
        ),
        WAIT,
    )
    assert [event_id for event_id, _ in events] == [three.id]


async def test_watching_an_execution_resumes_after_the_last_event_seen(hub):
    created = await hub.http.post(
        "/api/workflows", json={"id": "resumable", "name": "R", "steps": [{"id": "only", "type": "TRANSFORM", "input": {"attempts": 1}}]}
    )
    assert created.status_code == 200, created.text
    started = (await hub.http.post("/api/workflows/resumable:execute", json={})).json()
    path = f"/api/executions/{started['id']}:watch"
    everything = await asyncio.wait_for(sse_events(hub.http, path, 5), WAIT)
    types = [event["type"] for _, event in everything]
    assert types == ["execution.pending", "execution.running", "step.running", "step.succeeded", "execution.succeeded"]
    second_id = everything[1][0]
    rest = await asyncio.wait_for(sse_events(hub.http, path, 10, headers={"Last-Event-ID": second_id}), WAIT)
    assert [event["type"] for _, event in rest] == types[2:]
    # Resumed after its last event, an ended execution's watch ends at once, empty.
    last_id = everything[-1][0]
    assert await asyncio.wait_for(sse_events(hub.http, path, 10, headers={"Last-Event-ID": last_id}), WAIT) == []


async def test_openapi_documents_the_resume_header_of_resumable_streams(hub):
    paths = (await hub.http.get("/openapi.json")).json()["paths"]
    for path in ("/api/events:stream", "/api/executions/{id}:watch"):
        headers = [p["name"] for p in paths[path]["get"]["parameters"] if p["in"] == "header"]
        assert headers == ["Last-Event-ID"], path
    assert not any(p["in"] == "header" for p in paths["/api/events"]["get"]["parameters"])
