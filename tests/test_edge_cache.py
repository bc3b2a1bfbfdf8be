"""The gateway's edge cache through the real stack: hot GETs answered from the
gateway's memory, invalidated from the sidecar's ordered Watch stream by the
surrogate keys the service said, and admitted by the services' own guard."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid

import grpc
import httpx
import pytest
from devops_hub.v1 import agents_pb2, agents_pb2_grpc, auth_pb2, auth_pb2_grpc
from prometheus_client import REGISTRY

from gateway.errors import rpc_error_response
from gateway.hardening import rate_limit_headers
from services.agents.server import build as build_agents
from services.cache.edge.store import EdgeCache, Said, cacheable, write_of
from services.cache.sidecar.server import build as build_sidecar
from services.common.auth import keys
from services.common.foundation.settings import Settings
from services.common.runtime.process import running
from tests.support.auth import ADMIN_KEY, READ, auth_settings
from tests.support.stack import gateway_client, make_settings, running_stack

NO_CACHE = {"cache-control": "no-cache"}


def handled(method: str) -> float:
    """How many AgentsService calls of `method` this process's servers have answered."""
    labels = {"grpc_service": "devops_hub.v1.AgentsService", "grpc_method": method, "grpc_type": "unary"}
    return sum(
        REGISTRY.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": code}) or 0.0
        for code in (status.name for status in grpc.StatusCode)
    )


async def hot(http: httpx.AsyncClient, path: str, timeout: float = 20.0, **options) -> httpx.Response:
    """GETs `path` until the edge cache answers it (its answers carry an Age): the
    cache is used only once the gateway's Watch stream is live."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        answer = await http.get(path, **options)
        if "age" in answer.headers:
            return answer
        assert asyncio.get_running_loop().time() < deadline, f"{path} never came from the edge cache"
        await asyncio.sleep(0.05)


async def held_steadily(
    http: httpx.AsyncClient, path: str, times: int, timeout: float = 20.0, method: str = "GetAgent", **options
) -> list[httpx.Response]:
    """`times` GETs in a row all answered by the edge cache with no GetAgent call: the
    first answers the edge keeps may still be dropped by a Watch message of the write
    that made the resource (on a loaded machine it can come after the first hit), so
    the run is tried again until it holds. `method`: the RPC the path would call."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        await hot(http, path, timeout, **options)
        calls = handled(method)
        run = [await http.get(path, **options) for _ in range(times)]
        if all("age" in answer.headers for answer in run) and handled(method) == calls:
            return run
        assert asyncio.get_running_loop().time() < deadline, f"{path} was not held by the edge cache {times} times in a row"


async def from_the_edge(
    http: httpx.AsyncClient, path: str, timeout: float = 20.0, method: str = "GetAgent", **options
) -> httpx.Response:
    """A GET of `path` (with `options`, e.g. conditional headers) answered by the edge
    cache with no GetAgent call. The edge lets go of what it holds whenever its sidecar
    proves slow (a call past its deadline on a loaded machine) or a late Watch message
    names it, so the answer is held again and asked for again until it comes from the hold."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        await held_steadily(http, path, 1, timeout, method)
        calls = handled(method)
        answer = await http.get(path, **options)
        if "age" in answer.headers and handled(method) == calls:
            return answer
        assert asyncio.get_running_loop().time() < deadline, f"{path} {options} never came from the edge cache"


async def fresh_within(http: httpx.AsyncClient, path: str, name: str, timeout: float = 10.0) -> httpx.Response:
    """GETs until the answer shows `name` (a write elsewhere reaches the gateway in one Watch message)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        answer = await http.get(path)
        if answer.json()["name"] == name:
            return answer
        assert asyncio.get_running_loop().time() < deadline, f"{path} stayed stale: {answer.json()}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def open_stack(sqlite_url):
    async with running_stack(make_settings(sqlite_url)) as stack:
        async with gateway_client(stack.settings, timeout=10) as http:
            yield stack, http


async def test_a_hot_get_is_answered_without_a_grpc_call_and_says_its_surrogate_keys(open_stack):
    stack, http = open_stack
    assert (await http.post("/api/agents", json={"id": "e1", "name": "One", "domain": "ci"})).status_code == 200
    first, *run = await held_steadily(http, "/api/agents/e1", 6)
    for again in run:
        assert again.status_code == 200 and again.content == first.content
        assert again.headers["etag"] == first.headers["etag"] and again.headers["cache-control"] == "max-age=300"
        assert "x-request-id" in again.headers
    listed = await hot(http, "/api/agents", params={"domain": "ci"})
    assert (await from_the_edge(http, "/api/agents?domain=ci", method="ListAgents")).content == listed.content

    # What the gateway keeps by: the service says it with the answer.
    call = stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="e1"))
    await call
    said = dict(await call.trailing_metadata())
    assert said["surrogate-key"] == "agents:get:e1" and said["cache-control"] == "max-age=300"
    # A no-cache read refills the cache, and is kept by the same key.
    call = stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="e1"), metadata=(("cache-control", "no-cache"),))
    await call
    assert dict(await call.trailing_metadata())["surrogate-key"] == "agents:get:e1"
    assert int(said["cache-version"]) >= 1, "the log position it was read at"
    # A write is not cacheable: it says what it made stale, at which log position.
    call = stack.stub.UpdateAgent(
        agents_pb2.UpdateAgentRequest(agent=agents_pb2.Agent(id="e1", name="One"), update_mask={"paths": ["name"]})
    )
    await call
    said = dict(await call.trailing_metadata())
    assert "surrogate-key" not in said
    position, *patterns = said["cache-invalidated"].split()
    assert int(position) > 1 and patterns == ["agents:get:e1", "agents:list:*", "agents:discover:*"]


async def test_no_cache_and_conditional_requests(open_stack):
    stack, http = open_stack
    await http.post("/api/agents", json={"id": "e2", "name": "Two", "domain": "ci"})
    held = await from_the_edge(http, "/api/agents/e2")
    etag = held.headers["etag"]
    unchanged = await from_the_edge(http, "/api/agents/e2", headers={"if-none-match": etag})
    assert unchanged.status_code == 304 and unchanged.content == b"" and unchanged.headers["etag"] == etag
    other = await from_the_edge(http, "/api/agents/e2", headers={"if-none-match": '"other"'})
    assert other.status_code == 200 and other.content == held.content

    calls = handled("GetAgent")
    bypassed = await http.get("/api/agents/e2", headers=NO_CACHE)
    assert bypassed.status_code == 200 and "age" not in bypassed.headers
    assert handled("GetAgent") == calls + 1
    # Its own refill of the service's caches (a Delete, then a fill) races a keep of
    # its answer, which the edge refuses; the next read keeps what it reads.
    refilled = await hot(http, "/api/agents/e2")
    assert refilled.content == bypassed.content


async def test_writes_through_the_gateway_grpc_and_another_process_invalidate_the_edge(open_stack):
    stack, http = open_stack
    await http.post("/api/agents", json={"id": "e3", "name": "Zero", "domain": "ci"})
    await http.post("/api/agents", json={"id": "e4", "name": "Bystander", "domain": "ci"})
    await hot(http, "/api/agents/e3")
    await hot(http, "/api/agents/e4")
    await hot(http, "/api/agents", params={"domain": "ci"})

    # Through the gateway: the very next read sees it, and only what it made stale goes:
    # another agent's answer is still held. (Written again if the edge let go of all it
    # held meanwhile, as it does when its sidecar proves slow on a loaded machine; a
    # gateway that empties itself on every write never keeps it.)
    for attempt in range(20):
        await hot(http, "/api/agents/e4")
        name = f"Gateway {attempt}"
        patched = await http.patch("/api/agents/e3", params={"updateMask": "name"}, json={"name": name})
        assert patched.status_code == 200
        calls = handled("GetAgent")
        held = "age" in (await http.get("/api/agents/e4")).headers and handled("GetAgent") == calls
        after = await http.get("/api/agents/e3")
        assert after.json()["name"] == name and after.headers["etag"] == patched.headers["etag"]
        if held:
            break
    else:
        raise AssertionError("a write through the gateway dropped another agent's answer every time")

    # Through gRPC directly: within one Watch message.
    await hot(http, "/api/agents/e3")
    await stack.stub.UpdateAgent(
        agents_pb2.UpdateAgentRequest(agent=agents_pb2.Agent(id="e3", name="Direct"), update_mask={"paths": ["name"]})
    )
    await fresh_within(http, "/api/agents/e3", "Direct")

    # Through another gateway (another worker of `make run`): within one Watch message.
    await hot(http, "/api/agents/e3")
    async with gateway_client(stack.settings, timeout=10) as other_gateway:
        patched = await other_gateway.patch("/api/agents/e3", params={"updateMask": "name"}, json={"name": "Elsewhere"})
        assert patched.status_code == 200
    await fresh_within(http, "/api/agents/e3", "Elsewhere")

    # Through another agents process on the same database and sidecar.
    await hot(http, "/api/agents/e3")
    listed = await hot(http, "/api/agents", params={"domain": "ci"})
    async with running(await build_agents(stack.settings.replace(agents_addr="127.0.0.1:0"))) as other:
        async with grpc.aio.insecure_channel(other.address) as channel:
            stub = agents_pb2_grpc.AgentsServiceStub(channel)
            await stub.UpdateAgent(
                agents_pb2.UpdateAgentRequest(agent=agents_pb2.Agent(id="e3", name="Other"), update_mask={"paths": ["name"]})
            )
        await fresh_within(http, "/api/agents/e3", "Other")
        relisted = await http.get("/api/agents", params={"domain": "ci"})
        assert relisted.content != listed.content and b"Other" in relisted.content


async def test_the_edge_is_cleared_and_bypassed_while_its_stream_is_down(sqlite_url):
    settings = make_settings(sqlite_url)
    async with running(await build_sidecar(settings)) as sidecar:
        await sidecar.store.sync(0, 0, (), False)
        async with running_stack(settings.replace(cache_addr=sidecar.address), with_sidecar=False) as stack:
            async with gateway_client(stack.settings, timeout=10) as http:
                await http.post("/api/agents", json={"id": "e4", "name": "Four", "domain": "ci"})
                await hot(http, "/api/agents/e4")
                await sidecar.stop(0)
                # The stream ends with the sidecar: from then on every read goes to the service.
                deadline = asyncio.get_running_loop().time() + 20
                while "age" in (await http.get("/api/agents/e4")).headers:
                    assert asyncio.get_running_loop().time() < deadline, "the edge kept answering without its stream"
                    await asyncio.sleep(0.05)
                calls = handled("GetAgent")
                for _ in range(3):
                    answer = await http.get("/api/agents/e4")
                    assert answer.status_code == 200 and "age" not in answer.headers
                assert handled("GetAgent") == calls + 3


# --------------------------------------------------------------------------- access


@contextlib.asynccontextmanager
async def secured_stack(sqlite_url: str, redis_url: str, limit: int):
    """Keys on, anonymous reads on, `limit` requests an hour per caller: shared in
    Redis with `redis_url`, else in each process's memory, as a plain `make run`."""
    settings = auth_settings(
        sqlite_url, rate_limit_requests=limit, rate_limit_window=3600, redis_url=redis_url, redis_key_prefix=f"dhtest:{uuid.uuid4().hex}:"
    )
    async with running_stack(settings) as stack:
        async with gateway_client(stack.settings, timeout=10) as http:
            yield stack, http, auth_pb2_grpc.ApiKeysServiceStub(stack.channel)


@pytest.fixture(params=["memory", "redis"])
def limits_in(request) -> str:
    """REDIS_URL for the rate limits: none (each process's memory) or the machine's Redis."""
    return request.getfixturevalue("redis_url") if request.param == "redis" else ""


async def new_key(keys_stub, *scopes: int) -> auth_pb2.CreateApiKeyResponse:
    return await keys_stub.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(api_key=auth_pb2.ApiKey(name=f"k-{uuid.uuid4().hex[:6]}", scopes=scopes)),
        metadata=(("x-api-key", ADMIN_KEY),),
    )


async def service_refusal(call) -> tuple[int, dict, dict[str, str]]:
    """What the service itself answers to a direct gRPC call it refuses, as the gateway
    renders any service's refusal over HTTP: status, JSON body, rate-limit headers."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    response = rpc_error_response(refused.value)
    response.headers.update(rate_limit_headers(refused.value.trailing_metadata()))
    return response.status_code, json.loads(response.body), {k.lower(): v for k, v in response.headers.items()}


def _seconds_apart(body: dict) -> str:
    """A 429's body with its waits ("retry in 57s", RetryInfo's "57s") taken out: two
    buckets' waits may differ by the second between two refusals."""
    return re.sub(r"\b\d+(\.\d+)?s\b", "Ns", json.dumps(body, sort_keys=True))


async def held_for_a_reader(http: httpx.AsyncClient, keys_stub, agent_id: str):
    """A new agent, a new read key, and the agent's answer held by the edge for it."""
    created = await http.post("/api/agents", json={"id": agent_id, "name": "E", "domain": "ci"}, headers={"x-api-key": ADMIN_KEY})
    assert created.status_code == 200, created.text
    reader = await new_key(keys_stub, READ)
    as_reader = {"x-api-key": reader.key}
    return reader, as_reader, await hot(http, f"/api/agents/{agent_id}", headers=as_reader)


async def test_the_edge_answers_on_a_default_stack(sqlite_url):
    """As `make run`: keys checked, the default rate limits, each process's memory, no Redis."""
    defaults = Settings()
    settings = auth_settings(
        sqlite_url, rate_limit_requests=defaults.rate_limit_requests, rate_limit_execute_requests=defaults.rate_limit_execute_requests
    )
    async with running_stack(settings) as stack, gateway_client(stack.settings, timeout=10) as http:
        await http.post("/api/agents", json={"id": "d1", "name": "D", "domain": "ci"}, headers={"x-api-key": ADMIN_KEY})
        held, *run = await held_steadily(http, "/api/agents/d1", 4)
        for again in run:
            assert again.status_code == 200 and again.content == held.content
            assert again.headers["x-ratelimit-limit"] == str(defaults.rate_limit_requests)


async def test_keys_get_from_the_edge_exactly_what_the_service_answers(sqlite_url, limits_in):
    async with secured_stack(sqlite_url, limits_in, 10_000) as (stack, http, keys_stub):
        reader, as_reader, held = await held_for_a_reader(http, keys_stub, "e5")
        assert held.status_code == 200 and held.headers["x-ratelimit-limit"] == "10000"

        def directly(key: str):
            return stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="e5"), metadata=(("x-api-key", key),))

        # A key the service does not know: 401, from the gateway, as from the service.
        unknown = keys.new_key()
        calls = handled("GetAgent")
        refused = await http.get("/api/agents/e5", headers={"x-api-key": unknown})
        assert handled("GetAgent") == calls, "refused before any call"
        assert (refused.status_code, refused.json()) == (await service_refusal(directly(unknown)))[:2]
        # No key, with anonymous reads on: served, from the client address's bucket.
        anonymous = await hot(http, "/api/agents/e5")
        assert anonymous.status_code == 200 and anonymous.headers["x-ratelimit-limit"] == "10000"

        # Revoked: refused within a second, as by the service's own guard.
        await keys_stub.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(id=reader.api_key.id), metadata=(("x-api-key", ADMIN_KEY),))
        deadline = asyncio.get_running_loop().time() + 5
        while (refused := await http.get("/api/agents/e5", headers=as_reader)).status_code == 200:
            assert asyncio.get_running_loop().time() < deadline, "a revoked key was still served from the edge"
            await asyncio.sleep(0.05)
        assert refused.status_code == 401
        assert (refused.status_code, refused.json()) == (await service_refusal(directly(reader.key)))[:2]


async def test_hits_and_misses_of_one_caller_draw_on_one_bucket(sqlite_url, limits_in):
    """The gateway takes every caller's token, hit or miss; the services take none
    for what it admitted, and limit direct callers with the same rules and words."""
    async with secured_stack(sqlite_url, limits_in, 12) as (stack, http, keys_stub):
        reader, as_reader, held = await held_for_a_reader(http, keys_stub, "e6")
        left = int(held.headers["x-ratelimit-remaining"])
        assert left >= 4, "hot() should have taken a few tokens at most"
        calls = handled("GetAgent")
        answers = [
            await http.get("/api/agents/e6", headers={**as_reader, **(NO_CACHE if n % 2 else {})}) for n in range(left + 1)
        ]
        assert [a.status_code for a in answers] == [200] * left + [429]
        assert [int(a.headers["x-ratelimit-remaining"]) for a in answers[:left]] == list(range(left - 1, -1, -1))
        # Every admitted one was a hit or a miss (a plain GET misses too if the edge
        # was cleared meanwhile, by a second of silence on its stream).
        hits, misses = sum("age" in a.headers for a in answers[:left]), handled("GetAgent") - calls
        assert hits >= 1 and misses >= left // 2 and hits + misses == left
        calls += misses
        limited = answers[-1]
        assert 1 <= int(limited.headers["retry-after"]) <= 3600 // 12 and limited.headers["x-ratelimit-remaining"] == "0"
        # A miss past the limit is refused from the same bucket, before any call.
        assert (await http.get("/api/agents/e6", headers={**as_reader, **NO_CACHE})).status_code == 429
        assert handled("GetAgent") == calls

        # The service refuses a direct caller over its limit in the same words: at once
        # when the bucket is shared in Redis, after its own 12 when it is its memory's.
        for _ in range(13):
            try:
                await stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="e6"), metadata=(("x-api-key", reader.key),))
            except grpc.aio.AioRpcError:
                break
        status, body, headers = await service_refusal(
            stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="e6"), metadata=(("x-api-key", reader.key),))
        )
        assert status == limited.status_code == 429
        assert _seconds_apart(limited.json()) == _seconds_apart(body)
        for name in ("x-ratelimit-limit", "x-ratelimit-remaining"):
            assert limited.headers[name] == headers[name]
        assert "retry-after" in headers


# --------------------------------------------------------------------------- the cache itself


def test_entries_are_bounded_and_dropped_by_any_pattern_matching_a_surrogate_key():
    now = [0.0]
    cache = EdgeCache(max_entries=3, max_bytes=1 << 20, max_ttl=10, clock=lambda: now[0])
    assert cacheable([("cache-control", "max-age=60")]) is None
    assert cacheable([("cache-control", "max-age=60"), ("surrogate-key", "agents:get:a")]) is None, "no version"
    trailers = [("cache-control", "max-age=60"), ("surrogate-key", "agents:get:a agents:list:h=1"), ("cache-version", "5")]
    said = cacheable(trailers)
    assert said == Said(60, ("agents:get:a", "agents:list:h=1"), 5)
    headers = ((b"content-length", b"1"), (b"etag", b'"1"'), (b"cache-control", b"max-age=60"))
    assert not cache.put(("/a", b""), b"x", headers[:1], said), "no ETag: nothing to answer a conditional GET with"
    cache.put(("/a", b""), b"x", headers, said)
    assert cache.get(("/a", b"")) is None, "not live: nothing is kept"
    cache.go_live(5)
    assert cache.put(("/a", b""), b"a", headers, said)
    held = cache.get(("/a", b""))
    assert held is not None and held.etag == '"1"' and held.head == headers
    assert held.validators == ((b"etag", b'"1"'), (b"cache-control", b"max-age=60")), "what a 304 says"
    assert cache.put(("/l", b""), b"l", headers, Said(60, ("agents:list:h=1",), 5))
    cache.invalidate("agents:list:*", 6)
    assert cache.get(("/a", b"")) is None and cache.get(("/l", b"")) is None
    # An answer read before an invalidation of one of its keys is refused; one read after it is kept.
    assert not cache.put(("/a", b""), b"a", headers, said)
    assert cache.put(("/a", b""), b"a", headers, Said(60, said.keys, 6))
    for n in range(4):
        assert cache.put((f"/{n}", b""), b"n", headers, Said(60, (f"agents:get:{n}",), 6))
    assert len(cache) == 3 and cache.get(("/0", b"")) is None
    now[0] += 10  # the cap, below the max-age
    assert cache.get(("/3", b"")) is None
    cache.put(("/x", b""), b"x", headers, Said(60, said.keys, 6))
    cache.go_dark()
    cache.go_live(6)
    assert len(cache) == 0
    # A write's answer names its position and patterns; past the metadata bound, "*".
    assert write_of([("cache-invalidated", "7 agents:get:a agents:list:*")]) == (7, ["agents:get:a", "agents:list:*"])
    assert write_of([("cache-invalidated", "8 *")]) == (8, ["*"])


def test_a_hot_answer_is_refreshed_by_one_reader_before_it_expires():
    """In the last tenth of its life an answer sends its first reader upstream, whose
    answer replaces it, while every other reader is still answered from it: under load
    it never expires, and concurrent readers never all miss at once."""
    now = [0.0]
    cache = EdgeCache(max_entries=8, max_bytes=1 << 20, max_ttl=10, clock=lambda: now[0])
    cache.go_live(1)
    headers = ((b"content-length", b"1"), (b"etag", b'"1"'))
    said = Said(60, ("agents:get:a",), 1)
    assert cache.put(("/a", b""), b"a", headers, said)
    now[0] = 8.9
    assert cache.get(("/a", b"")) is not None
    now[0] = 9.0
    assert cache.get(("/a", b"")) is None, "the first reader of the last tenth refreshes it"
    assert [cache.get(("/a", b"")) is not None for _ in range(3)] == [True] * 3, "the others are still answered"
    assert cache.put(("/a", b""), b"b", headers, said)
    now[0] = 17.5
    assert cache.get(("/a", b"")).body == b"b", "the refreshed answer lives its own ten seconds"
    now[0] = 20.0
    assert cache.get(("/a", b"")) is None, "nothing is answered past its lifetime, refreshed or not"


async def test_a_burst_of_readers_on_a_cold_answer_asks_the_service_once(open_stack):
    """Readers who miss an answer while another reader's miss of it is on its way wait
    for that one's answer and are then answered as hits, each admitted on its own: a
    burst on a cold key (a new agent, or one no one read for a while) is one call
    upstream, not one per reader."""
    stack, http = open_stack
    # Each try on an agent of its own: the Watch message of the write that made it may
    # reach the edge after the first answer and drop it (on a loaded machine), and then
    # every reader rightly asks for itself; readers who never waited would do so every time.
    for attempt in range(10):
        path = f"/api/agents/burst-{attempt}"
        created = await http.post("/api/agents", json={"id": f"burst-{attempt}", "name": "Burst", "domain": "ci"})
        assert created.status_code == 200
        await hot(http, "/api/agents", timeout=20)  # the edge is live
        calls = handled("GetAgent")
        answers = await asyncio.gather(*(http.get(path) for _ in range(20)))
        assert {answer.status_code for answer in answers} == {200}
        assert len({answer.content for answer in answers}) == 1
        if sum("age" in answer.headers for answer in answers) == 19:
            assert handled("GetAgent") - calls == 1, "one reader asked the service; the others waited for its answer"
            break
    else:
        raise AssertionError("in no burst did the readers wait for the first one's answer")
    # A miss whose answer is not kept (an error) lets each waiting reader ask for itself.
    missing = await asyncio.gather(*(http.get("/api/agents/no-such-agent") for _ in range(5)))
    assert {answer.status_code for answer in missing} == {404}
