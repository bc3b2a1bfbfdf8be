"""Details a client or an operator reads off the wire, each through the real interface:

- integral JSON numbers inside Struct/Value come back as integers through the gateway;
- a 429's body says the same wait as its Retry-After header;
- Redis-mode cache Stats count DevOps Hub's own records, not the whole server;
- every series the alert rules and the dashboard select exists from start, at zero.
"""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import httpx
import pytest
import redis.asyncio as aioredis
from devops_hub.v1 import cache_pb2, cache_pb2_grpc
from google.protobuf import empty_pb2

from services.cache.client.keys import SERVICE_NAMESPACES
from tests.support.auth import ADMIN_KEY, auth_settings
from tests.support.cache import READ_TIMEOUT, StartSidecar, entry
from tests.support.deploy import PROMQL_WORDS, alert_rules, dashboard_exprs, metric_names
from tests.support.metrics import scrape
from tests.support.processes import launched_stack
from tests.support.stack import gateway_client, make_settings, running_stack

# --------------------------------------------------------------------------- integral numbers


async def test_integral_numbers_in_structs_come_back_as_integers(sqlite_url):
    expected = {"attempts": 1, "ratio": 0.5, "negative": -3, "nested": [2, {"n": 10}]}
    async with running_stack(make_settings(sqlite_url), with_workflows=True) as stack:
        async with gateway_client(stack.settings, timeout=20) as http:
            created = await http.post(
                "/api/workflows", json={"id": "numbers", "name": "N", "steps": [{"id": "only", "type": "TRANSFORM", "input": expected}]}
            )
            assert created.status_code == 200, created.text
            # Struct keys come in any order: look at the numbers as written.
            assert re.search(r'"attempts":1[,}]', created.text) and re.search(r'"ratio":0\.5[,}]', created.text), created.text
            assert _types(created.json()["steps"][0]["input"]) == _types(expected)

            started = await http.post("/api/workflows/numbers:execute", json={"input": {"count": 3}})
            assert started.status_code == 200, started.text
            execution = await _ended(http, started.json()["id"])
            assert _types(execution["input"]) == {"count": int}
            assert execution["output"]["only"] == expected and _types(execution["output"]["only"]) == _types(expected)
            # Streams render the same way: the execution's events, replayed by :watch.
            async with http.stream("GET", f"/api/executions/{execution['id']}:watch") as response:
                data = [json.loads(line[6:]) async for line in response.aiter_lines() if line.startswith("data: ")]
            succeeded = [event["data"] for event in data if event["type"] == "step.succeeded"]
            assert succeeded and all(isinstance(d["attempts"], int) for d in succeeded)


async def _ended(http: httpx.AsyncClient, execution_id: str) -> dict:
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        execution = (await http.get(f"/api/executions/{execution_id}")).json()
        if execution["status"] not in ("PENDING", "RUNNING"):
            return execution
        assert asyncio.get_running_loop().time() < deadline, execution
        await asyncio.sleep(0.05)


def _types(value: object) -> object:
    """The value's shape with each leaf replaced by its Python type: 1 and 1.0 differ."""
    if isinstance(value, dict):
        return {key: _types(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_types(item) for item in value]
    return type(value)


# --------------------------------------------------------------------------- 429


async def test_a_429_body_says_the_wait_its_retry_after_header_says(sqlite_url):
    # Two requests a second: the third within the second waits well under a second,
    # which the header rounds up to 1; the body must not say "0.4s".
    settings = auth_settings(sqlite_url, rate_limit_requests=2, rate_limit_window=1)
    async with running_stack(settings) as stack, gateway_client(stack.settings, timeout=10, headers={"x-api-key": ADMIN_KEY}) as http:
        for _ in range(20):
            limited = await http.get("/api/agents")
            if limited.status_code == 429:
                break
        assert limited.status_code == 429, "the limit was never reached"
    wait = int(limited.headers["retry-after"])
    body = limited.json()
    assert f"retry in {wait}s" in body["message"]
    delays = [detail["retryDelay"] for detail in body["details"] if detail["@type"].endswith("RetryInfo")]
    assert delays == [f"{wait}s"]


# --------------------------------------------------------------------------- Redis stats


async def test_redis_stats_count_this_deployments_records_only(start_sidecar: StartSidecar, redis_url: str, redis_prefix: str):
    inspector = aioredis.Redis.from_url(redis_url)
    # Someone else's keys on the same server, and big ones: none of them may count.
    foreign = f"{redis_prefix}foreign:"
    await inspector.mset({f"{foreign}{i}": b"x" * 10_000 for i in range(50)})
    try:
        sidecar = await start_sidecar(redis_url=redis_url, redis_key_prefix=f"{redis_prefix}dh:")
        async with grpc.aio.insecure_channel(sidecar.host.bound_address) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=[entry(f"agents:get:{i}", b"v" * 100) for i in range(3)]))
            stats = await stub.Stats(empty_pb2.Empty(), timeout=READ_TIMEOUT)
    finally:
        await inspector.aclose()
    assert stats.backend == "redis"
    assert stats.entries == 3
    # Three small records: their own bytes, nowhere near the 500 kB of foreign values.
    assert 300 <= stats.bytes < 10_000
    assert sum(stats.evictions.values()) == 0


# --------------------------------------------------------------------------- metrics from start

_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric name, label matchers) of every metric an expression selects."""
    names = metric_names(expr)
    found = []
    for match in _SELECTOR.finditer(expr):
        name, braces = match.group(1), match.group(2) or ""
        if name in names and name not in PROMQL_WORDS:
            found.append((name, _MATCHER.findall(braces)))
    return found


def _matches(labels: dict[str, str], matchers: list[tuple[str, str, str]]) -> bool:
    for label, op, value in matchers:
        actual = labels.get(label, "")
        if op == "=" and actual != value or op == "!=" and actual == value:
            return False
        if op in ("=~", "!~") and bool(re.fullmatch(value, actual)) != (op == "=~"):
            return False
    return True


@pytest.mark.slow
def test_every_series_the_alerts_and_dashboard_select_exists_before_any_traffic(tmp_path, redis_url, redis_prefix):
    exprs = [rule["expr"] for rule in alert_rules()] + dashboard_exprs()
    # With Redis, since one alert selects the Redis backend's series (which a memory-only
    # sidecar rightly lacks: at 0 it would say "fell back from Redis").
    with launched_stack(tmp_path, REDIS_URL=redis_url, REDIS_KEY_PREFIX=redis_prefix) as env:
        series: list[tuple[str, dict[str, str]]] = []
        for port in (env["AGENTS_METRICS_PORT"], env["WORKFLOWS_METRICS_PORT"], env["CACHE_METRICS_PORT"], env["GATEWAY_PORT"]):
            series += [(name, dict(labels)) for name, labels in scrape(port)]
    missing = set()
    for expr in exprs:
        for name, matchers in selectors(expr):
            if name == "up":  # Prometheus's own
                continue
            if not any(n == name and _matches(labels, matchers) for n, labels in series):
                missing.add(f"{name}{{{', '.join(''.join(m) for m in matchers)}}}")
    assert not missing, f"selected by the alerts or the dashboard but not exported at start: {sorted(missing)}"
    # The cache's namespaces are the services' own.
    namespaces = {labels["namespace"] for name, labels in series if name == "devops_hub_cache_hits_total"}
    assert namespaces == set(SERVICE_NAMESPACES)


@pytest.mark.fast
def test_the_selector_reader_reads_names_and_matchers():
    assert selectors('sum(rate(grpc_server_handled_total{grpc_code=~"UNKNOWN|INTERNAL", grpc_type="unary"}[5m])) / up') == [
        ("grpc_server_handled_total", [("grpc_code", "=~", "UNKNOWN|INTERNAL"), ("grpc_type", "=", "unary")]),
        ("up", []),
    ]
    assert _matches({"status": "503"}, [("status", "=~", "5..")]) and not _matches({"status": "200"}, [("status", "=~", "5..")])
