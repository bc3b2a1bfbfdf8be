"""Metrics, traces, logs and profiles, against real servers (docs/observability.md)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import grpc
import httpx
import pytest
from devops_hub.v1 import agents_pb2, cache_pb2, cache_pb2_grpc, workflows_pb2
from google.protobuf import empty_pb2
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY, CollectorRegistry

from services.cache.sidecar.metrics import CacheMetrics, CacheStatsRefresher
from services.cache.sidecar.server import build as build_sidecar
from services.common.data.db import connect
from services.common.foundation.settings import Settings
from services.common.runtime.grpc_host import GrpcHost
from services.common.runtime.process import running
from services.common.telemetry import logs, profiling, tracing
from services.common.telemetry.endpoint import MetricsEndpoint
from services.common.telemetry.grpc_server import outcome
from services.common.telemetry.metrics import ServiceMetrics, service_metrics
from services.common.transport.channels import call_tracing, open_channel
from tests.support import eventually
from tests.support.metrics import parse_samples, scrape
from tests.support.processes import launched_stack
from tests.support.stack import gateway_client, make_settings, running_stack

# --------------------------------------------------------------------------- helpers


def sample(name: str, **labels: str) -> float:
    """A sample of this process's default registry (0 when it does not exist yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels` (a pid label in
    multiprocess mode is summed over)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    provider = TracerProvider()
    try:
        yield provider
    finally:
        provider.shutdown()


@pytest.fixture
def spans(provider: TracerProvider) -> InMemorySpanExporter:
    """What `tracer` records, in memory."""
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def tracer(provider: TracerProvider) -> trace.Tracer | None:
    """The tracer a test hands to what it builds, as the wiring hands the process's."""
    return tracing.tracer_of(provider)


@pytest.fixture
def slow_profiler() -> profiling.SlowRequestProfiler | None:
    return profiling.configure(Settings(profiling_enabled=True, profiling_threshold=0.2))


class Captured:
    """The records one logger emits, formatted as the process would format them."""

    def __init__(self, logger_name: str, formatter: logging.Formatter) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.addFilter(logs.RequestContextFilter())
        self.handler.setFormatter(formatter)
        self.logger = logging.getLogger(logger_name)

    def __enter__(self) -> Captured:
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc_info) -> None:
        self.logger.removeHandler(self.handler)

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.lines() if line.startswith("{")]


def _echo_host(handlers: dict, **host_options) -> GrpcHost:
    host = GrpcHost("127.0.0.1:0", metrics=service_metrics().grpc, **host_options)

    def register(_servicer, server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))

    host.add(register, None, "test.Echo")
    return host


# --------------------------------------------------------------------------- gRPC metrics


async def test_grpc_calls_are_counted_by_service_method_type_and_code(stack):
    service, method = "devops_hub.v1.AgentsService", "GetAgent"
    await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=agents_pb2.Agent(id="m1", name="M", domain="ci")))
    labels = dict(grpc_service=service, grpc_method=method, grpc_type="unary")
    ok, missing = sample("grpc_server_handled_total", **labels, grpc_code="OK"), sample(
        "grpc_server_handled_total", **labels, grpc_code="NOT_FOUND"
    )
    timed = sample("grpc_server_handling_seconds_count", **labels)

    await stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="m1"))
    with pytest.raises(grpc.aio.AioRpcError):
        await stack.stub.GetAgent(agents_pb2.GetAgentRequest(id="no-such-agent"))

    # A call that ends in an error status reaches its client as soon as the status is
    # sent, a moment before the server counts it.
    await eventually(lambda: sample("grpc_server_handling_seconds_count", **labels) == timed + 2)
    assert sample("grpc_server_handled_total", **labels, grpc_code="OK") == ok + 1
    assert sample("grpc_server_handled_total", **labels, grpc_code="NOT_FOUND") == missing + 1
    # The cache sidecar's calls made for those reads are counted under its own service.
    assert sample("grpc_server_handled_total", grpc_service="devops_hub.v1.CacheService", grpc_method="Get",
                  grpc_type="unary", grpc_code="OK") > 0


async def test_streams_deadlines_and_crashes_get_the_code_the_client_sees():
    release = asyncio.Event()

    async def ticks(request: bytes, context):
        for n in range(3):
            yield bytes([n])
        await release.wait()

    async def slow(request: bytes, context) -> bytes:
        await asyncio.sleep(5)
        return b""

    async def crash(request: bytes, context) -> bytes:
        raise RuntimeError("boom")

    host = _echo_host(
        {
            "Ticks": grpc.unary_stream_rpc_method_handler(ticks),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
            "Crash": grpc.unary_unary_rpc_method_handler(crash),
        }
    )
    port = await host.start()

    def count(method: str, kind: str, code: str) -> float:
        return sample("grpc_server_handled_total", grpc_service="test.Echo", grpc_method=method, grpc_type=kind, grpc_code=code)

    before = (count("Ticks", "server_stream", "CANCELLED"), count("Slow", "unary", "DEADLINE_EXCEEDED"), count("Crash", "unary", "INTERNAL"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = channel.unary_stream("/test.Echo/Ticks")(b"")
            assert [await stream.read() for _ in range(3)] == [b"\x00", b"\x01", b"\x02"]
            stream.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await channel.unary_unary("/test.Echo/Slow")(b"", timeout=0.2)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(grpc.aio.AioRpcError) as crashed:
                await channel.unary_unary("/test.Echo/Crash")(b"")
            assert crashed.value.code() == grpc.StatusCode.INTERNAL
        def counts() -> tuple[float, ...]:
            return (count("Ticks", "server_stream", "CANCELLED"), count("Slow", "unary", "DEADLINE_EXCEEDED"),
                    count("Crash", "unary", "INTERNAL"))

        try:
            await eventually(lambda: counts() == tuple(b + 1 for b in before))
        except AssertionError:
            assert counts() == tuple(b + 1 for b in before)
    finally:
        release.set()
        await host.stop(0)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("remaining", "code"),
    [(None, "CANCELLED"), (5.0, "CANCELLED"), (0.0005, "DEADLINE_EXCEEDED"), (0.0, "DEADLINE_EXCEEDED"), (-1.0, "DEADLINE_EXCEEDED")],
)
def test_a_cancelled_call_is_a_deadline_when_its_deadline_has_come(remaining, code):
    """The client's cancellation at its deadline can reach the server just before the
    server's own deadline (it runs from receipt): a call cancelled then counts as the
    client saw it; one cancelled with time to spare, or without a deadline, does not."""

    class Cancelled:
        def time_remaining(self):
            return remaining

    assert outcome(asyncio.CancelledError(), Cancelled()).name == code


# --------------------------------------------------------------------------- pool metrics


async def test_pool_metrics_show_connections_in_use_and_waiters(database_url):
    metrics = ServiceMetrics(CollectorRegistry())
    db = await connect(database_url, pool_size=1, max_overflow=0, pools=metrics.pools)
    try:
        await db.fetch("SELECT 1")
        idle = db.pool_stats()
        assert idle.in_use == 0 and idle.waiters == 0 and idle.size >= 1 and idle.max >= idle.size
        async with db.transaction() as tx:
            await tx.fetch("SELECT 1")
            # The one writer (SQLite) or the one connection (PostgreSQL) is taken: a
            # second write has to wait for it.
            waiting = asyncio.ensure_future(db.execute("SELECT 1"))
            deadline = time.monotonic() + 5
            while db.pool_stats().waiters == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            busy = db.pool_stats()
            assert busy.waiters == 1 and busy.in_use >= 1
            metrics.refresh()
            assert metrics.registry.get_sample_value("devops_hub_db_pool_waiters") == 1
            assert metrics.registry.get_sample_value("devops_hub_db_pool_in_use") == busy.in_use
            assert metrics.registry.get_sample_value("devops_hub_db_pool_max") == busy.max
        await waiting
        assert db.pool_stats().waiters == 0 and db.pool_stats().in_use == 0
    finally:
        await db.close()


# --------------------------------------------------------------------------- cache metrics


async def test_cache_metrics_follow_the_sidecar_stats_and_are_served_on_metrics(sqlite_url):
    settings = make_settings(sqlite_url)
    async with running(await build_sidecar(settings)) as sidecar:
        metrics = ServiceMetrics(CollectorRegistry())
        endpoint = MetricsEndpoint(metrics=metrics, refreshers=[CacheStatsRefresher(sidecar.store, CacheMetrics(metrics.registry))])
        try:
            metrics_port = await endpoint.start("127.0.0.1", 0)
            async with grpc.aio.insecure_channel(sidecar.address) as channel:
                cache = cache_pb2_grpc.CacheServiceStub(channel)
                await cache.Set(cache_pb2.CacheSetRequest(entry=cache_pb2.CacheEntry(key="agents:get:a", value=b"x")))
                for _ in range(3):
                    await cache.Get(cache_pb2.CacheGetRequest(key="agents:get:a"))
                await cache.Get(cache_pb2.CacheGetRequest(key="agents:get:missing"))
                await cache.Get(cache_pb2.CacheGetRequest(key="workflows:get:missing"))
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{metrics_port}") as http:
                    first = parse_samples((await http.get("/metrics")).text)
                    # Counters advance by what happened since, not by the running totals again.
                    await cache.Get(cache_pb2.CacheGetRequest(key="agents:get:a"))
                    second = parse_samples((await http.get("/metrics")).text)
                    assert (await http.get("/other")).status_code == 404
                    assert (await http.post("/metrics")).status_code == 405
        finally:
            await endpoint.close()

    assert value(first, "devops_hub_cache_hits_total", namespace="agents") == 3
    assert value(first, "devops_hub_cache_misses_total", namespace="agents") == 1
    assert value(first, "devops_hub_cache_misses_total", namespace="workflows") == 1
    assert value(first, "devops_hub_cache_hit_ratio", namespace="agents") == pytest.approx(0.75)
    assert value(first, "devops_hub_cache_backend", backend="memory") == 1
    assert value(first, "devops_hub_cache_entries") == 1
    assert value(first, "devops_hub_cache_sets_total") == 1
    assert value(second, "devops_hub_cache_hits_total", namespace="agents") == 4
    assert value(second, "devops_hub_cache_hit_ratio", namespace="agents") == pytest.approx(0.8)


# --------------------------------------------------------------------------- workflow metrics


async def test_workflow_executions_and_steps_are_counted_by_status(sqlite_url):
    async with running_stack(make_settings(sqlite_url), with_workflows=True) as stack:
        workflow = workflows_pb2.Workflow(
            id="metered",
            name="Metered",
            steps=[workflows_pb2.Step(id="shape", type=workflows_pb2.Step.TRANSFORM)],
        )
        workflow.steps[0].input.update({"value": 1})
        await stack.workflows_stub.CreateWorkflow(workflows_pb2.CreateWorkflowRequest(workflow=workflow))
        executions = sample("devops_hub_workflow_executions_total", status="succeeded")
        steps = sample("devops_hub_workflow_steps_total", type="transform", status="succeeded")
        timed = sample("devops_hub_workflow_execution_duration_seconds_count", status="succeeded")

        started = await stack.workflows_stub.ExecuteWorkflow(workflows_pb2.ExecuteWorkflowRequest(id="metered"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            execution = await stack.workflows_stub.GetExecution(workflows_pb2.GetExecutionRequest(id=started.id))
            if execution.status == workflows_pb2.Execution.SUCCEEDED:
                break
            await asyncio.sleep(0.02)
        assert execution.status == workflows_pb2.Execution.SUCCEEDED

    assert sample("devops_hub_workflow_executions_total", status="succeeded") == executions + 1
    assert sample("devops_hub_workflow_steps_total", type="transform", status="succeeded") == steps + 1
    assert sample("devops_hub_workflow_execution_duration_seconds_count", status="succeeded") == timed + 1


# --------------------------------------------------------------------------- several workers


@pytest.mark.slow
def test_metrics_add_up_across_worker_processes(tmp_path):
    """WORKERS=2 with PROMETHEUS_MULTIPROC_DIR: two processes per service on one port,
    and whichever answers a scrape gives the totals of both."""
    multiproc = tmp_path / "metrics"
    multiproc.mkdir()
    with launched_stack(tmp_path, WORKERS="2", PROMETHEUS_MULTIPROC_DIR=str(multiproc), DATABASE_POOL_SIZE="2") as env:
        gateway = env["GATEWAY_PORT"]
        # Seeding made calls of its own: what follows is measured from here.
        got_before = value(scrape(env["AGENTS_METRICS_PORT"]), "grpc_server_handled_total", grpc_method="GetAgent")
        for _ in range(20):
            # New connections, so the kernel spreads them over both gateway workers; past
            # the gateways' edge caches, so that each reaches an agents worker.
            response = httpx.get(
                f"http://127.0.0.1:{gateway}/api/agents/builtin-text", headers={"connection": "close", "cache-control": "no-cache"}, timeout=10
            )
            assert response.status_code == 200, response.text

        async def list_on_fresh_channels() -> None:
            for _ in range(12):
                async with grpc.aio.insecure_channel(env["AGENTS_ADDR"]) as channel:
                    stub = channel.unary_unary(
                        "/devops_hub.v1.AgentsService/ListAgents",
                        request_serializer=agents_pb2.ListAgentsRequest.SerializeToString,
                        response_deserializer=agents_pb2.ListAgentsResponse.FromString,
                    )
                    await stub(agents_pb2.ListAgentsRequest(page_size=1))
                    await stub(agents_pb2.ListAgentsRequest(page_size=2))

        asyncio.run(list_on_fresh_channels())

        agents_dir = multiproc / "agents"
        pids = {name.rsplit("_", 1)[1].removesuffix(".db") for name in os.listdir(agents_dir) if name.startswith("counter_")}
        assert len(pids) == 2, f"both agents workers served calls: {sorted(os.listdir(agents_dir))}"
        assert {"agents", "workflows", "cache", "gateway"} <= set(os.listdir(multiproc))

        for _ in range(4):
            agents = scrape(env["AGENTS_METRICS_PORT"])
            assert value(agents, "grpc_server_handled_total", grpc_method="ListAgents", grpc_code="OK") == 24
            assert value(agents, "grpc_server_handled_total", grpc_method="GetAgent") == got_before + 20
            # Live gauges add up the live workers: two pools of one writer and 2 readers.
            assert value(agents, "devops_hub_db_pool_size") == 6
            # Each endpoint shows its own service only.
            assert value(agents, "grpc_server_handled_total", grpc_service="devops_hub.v1.WorkflowsService") == 0
            http = scrape(gateway)
            assert value(http, "http_requests_total", route="/api/agents/{id}", status="200") == 20
            # The cache's consistency checker reports from the start (services.cache.consistency).
            assert ("devops_hub_cache_consistency_checked_total", frozenset({("layer", "near")})) in agents
            assert ("devops_hub_cache_consistency_stale_total", frozenset({("layer", "sidecar"), ("after", "10s")})) in agents


# --------------------------------------------------------------------------- traces


async def _wait_for_span(exporter: InMemorySpanExporter, predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for span in exporter.get_finished_spans():
            if predicate(span):
                return span
        await asyncio.sleep(0.01)
    raise AssertionError(f"no such span among {[s.name for s in exporter.get_finished_spans()]}")


async def test_one_gateway_request_is_one_trace_through_service_cache_and_database(spans, tracer, sqlite_url):
    async with running_stack(make_settings(sqlite_url), with_workflows=True, tracer=tracer) as stack:
        async with gateway_client(stack.settings, tracer=tracer) as http:
            # A cold read each time (an agent no layer holds). On a loaded machine the
            # sidecar can miss the client's 0.25 s deadline, and the read is served
            # from the database without it: that trace has no sidecar span, so the
            # read is made again, a few times at most.
            for attempt in range(5):
                agent = agents_pb2.Agent(id=f"traced-{attempt}", name="T", domain="ci")
                await stack.stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=agent))
                await stack.cache_stub.Clear(empty_pb2.Empty())
                spans.clear()
                response = await http.get(f"/api/agents/{agent.id}", headers={"x-request-id": "trace-me"})
                assert response.status_code == 200, response.text
                root = await _wait_for_span(spans, lambda s: s.kind == trace.SpanKind.SERVER and s.name.startswith("GET "))
                in_trace = [s for s in spans.get_finished_spans() if s.context.trace_id == root.context.trace_id]
                if any(s.name == "devops_hub.v1.CacheService/Get" and s.kind == trace.SpanKind.SERVER for s in in_trace):
                    break

    in_trace = [s for s in spans.get_finished_spans() if s.context.trace_id == root.context.trace_id]
    by_id = {s.context.span_id: s for s in in_trace}

    assert root.name == "GET /api/agents/{id}" and root.parent is None
    assert root.attributes["http.route"] == "/api/agents/{id}"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["devops_hub.request_id"] == "trace-me"

    def only(name: str, kind: trace.SpanKind):
        found = [s for s in in_trace if s.name == name and s.kind == kind]
        assert found, f"no {kind.name} span {name!r} in the trace: {[(s.name, s.kind.name) for s in in_trace]}"
        return found

    (gateway_call,) = only("devops_hub.v1.AgentsService/GetAgent", trace.SpanKind.CLIENT)
    (served,) = only("devops_hub.v1.AgentsService/GetAgent", trace.SpanKind.SERVER)
    cache_calls = only("devops_hub.v1.CacheService/Get", trace.SpanKind.CLIENT)
    cache_served = only("devops_hub.v1.CacheService/Get", trace.SpanKind.SERVER)
    database = [s for s in in_trace if s.attributes.get("db.system.name") == "sqlite"]
    assert database and all(s.kind == trace.SpanKind.CLIENT for s in database)
    assert any(s.name.startswith("SELECT agents") for s in database), [s.name for s in database]

    # Linked through the W3C context in the gRPC metadata, hop by hop.
    assert gateway_call.parent.span_id == root.context.span_id
    assert served.parent.span_id == gateway_call.context.span_id and served.parent.is_remote
    assert {s.parent.span_id for s in cache_served} <= {c.context.span_id for c in cache_calls}
    assert all(c.parent.span_id == served.context.span_id for c in cache_calls)
    assert all(s.parent.span_id == served.context.span_id for s in database)
    # Nothing in the trace hangs off a span outside it.
    assert all(s.parent is None or s.parent.span_id in by_id for s in in_trace)
    assert served.attributes["rpc.grpc.status_code"] == 0


async def test_a_callers_trace_context_is_continued(spans, tracer, sqlite_url):
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with running_stack(make_settings(sqlite_url), tracer=tracer) as stack:
        async with gateway_client(stack.settings, tracer=tracer) as http:
            response = await http.get("/api/agents", headers={"traceparent": f"00-{caller_trace}-00f067aa0ba902b7-01"})
            assert response.status_code == 200
            root = await _wait_for_span(spans, lambda s: s.kind == trace.SpanKind.SERVER and s.name == "GET /api/agents")
    assert format(root.context.trace_id, "032x") == caller_trace
    assert format(root.parent.span_id, "016x") == "00f067aa0ba902b7" and root.parent.is_remote


async def test_the_channel_factory_traces_unary_calls_and_streams(spans, tracer):
    async def echo(request: bytes, context) -> bytes:
        return request

    async def ticks(request: bytes, context):
        for n in range(3):
            yield bytes([n])

    host = _echo_host(
        {"Echo": grpc.unary_unary_rpc_method_handler(echo), "Ticks": grpc.unary_stream_rpc_method_handler(ticks)},
        tracer=tracer,
    )
    port = await host.start()
    try:
        async with open_channel(f"127.0.0.1:{port}", connections=1, tracer=tracer) as channel:
            assert await channel.unary_unary("/test.Echo/Echo")(b"abc") == b"abc"
            assert [tick async for tick in channel.unary_stream("/test.Echo/Ticks")(b"")] == [b"\x00", b"\x01", b"\x02"]
        called = {
            name: await _wait_for_span(spans, lambda s, name=name: s.name == name and s.kind == trace.SpanKind.CLIENT)
            for name in ("test.Echo/Echo", "test.Echo/Ticks")
        }
        served = {
            name: await _wait_for_span(spans, lambda s, name=name: s.name == name and s.kind == trace.SpanKind.SERVER)
            for name in called
        }
        # A channel given no tracer adds no span of its own.
        async with open_channel(f"127.0.0.1:{port}", connections=1) as channel:
            spans.clear()
            assert await channel.unary_unary("/test.Echo/Echo")(b"x") == b"x"
            await _wait_for_span(spans, lambda s: s.kind == trace.SpanKind.SERVER)
            assert not [s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.CLIENT]
    finally:
        await host.stop(0)
    for name, span in called.items():
        assert span.attributes["rpc.grpc.status_code"] == 0 and span.attributes["server.port"] == port
        assert served[name].parent.span_id == span.context.span_id and served[name].parent.is_remote


async def test_only_what_is_given_the_tracer_is_traced(spans, tracer):
    """Two servers in one process, one of them given a tracer: the other's calls are not
    traced, as nothing reads a tracer of the process's own."""

    async def echo(request: bytes, context) -> bytes:
        return request

    plain = _echo_host({"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    traced = _echo_host({"Echo": grpc.unary_unary_rpc_method_handler(echo)}, tracer=tracer)
    ports = [await plain.start(), await traced.start()]
    try:
        for port, request in zip(ports, (b"plain", b"traced"), strict=True):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert await channel.unary_unary("/test.Echo/Echo")(request) == request
        await _wait_for_span(spans, lambda s: s.kind == trace.SpanKind.SERVER)
    finally:
        await plain.stop(0)
        await traced.stop(0)
    assert [s.name for s in spans.get_finished_spans()] == ["test.Echo/Echo"]


async def test_without_an_endpoint_nothing_is_traced_or_exported():
    assert tracing.configure(Settings(), "agents") is None
    assert tracing.tracer_of(None) is None
    assert not call_tracing("127.0.0.1:50051", None)
    # One shared no-op context: nothing is allocated per statement.
    assert tracing.db_span(None, "sqlite", "SELECT 1") is tracing.db_span(None, "postgresql", "SELECT 2")


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def _exported(requests) -> list[tuple[str, str]]:
    """(service.name, span name) of every exported span."""
    found = []
    for request in requests:
        for resource_spans in request.resource_spans:
            service = next(a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name")
            for scope_spans in resource_spans.scope_spans:
                found += [(service, span.name) for span in scope_spans.spans]
    return found


def test_spans_are_exported_over_otlp_grpc_when_an_endpoint_is_set():
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        settings = Settings(otel_exporter_otlp_endpoint=f"http://127.0.0.1:{port}")
        provider = tracing.configure(settings, "agents", env={})
        assert provider is not None
        tracer = tracing.tracer_of(provider)
        assert call_tracing("127.0.0.1:50051", tracer)
        with tracing.db_span(tracer, "postgresql", "SELECT id FROM agents WHERE id = $1"):
            assert trace.get_current_span().is_recording()
        provider.shutdown()
    finally:
        server.stop(0)
    assert ("devops-hub-agents", "SELECT agents") in _exported(collector.requests)


def test_spans_are_exported_over_otlp_http_when_asked():
    received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append((self.path, trace_service_pb2.ExportTraceServiceRequest.FromString(body)))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.end_headers()
            self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

        def log_message(self, *args) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        settings = Settings(
            otel_exporter_otlp_endpoint=f"http://127.0.0.1:{server.server_address[1]}",
            otel_exporter_otlp_protocol="http/protobuf",
        )
        provider = tracing.configure(settings, "gateway", env={"OTEL_SERVICE_NAME": "edge"})
        assert provider is not None
        with tracing.db_span(tracing.tracer_of(provider), "sqlite", "INSERT INTO events (id) VALUES ($1)"):
            assert trace.get_current_span().is_recording()
        provider.shutdown()
    finally:
        server.shutdown()
    assert [path for path, _ in received] and {path for path, _ in received} == {"/v1/traces"}
    assert ("edge", "INSERT events") in _exported(request for _, request in received)


@pytest.mark.fast
def test_an_unknown_otlp_protocol_is_refused():
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        tracing.configure(Settings(otel_exporter_otlp_endpoint="http://collector:4317", otel_exporter_otlp_protocol="thrift"), "agents")


# --------------------------------------------------------------------------- logs and profiles


async def test_json_logs_carry_the_request_id_and_the_trace_id(spans, tracer):
    async def echo(request: bytes, context) -> bytes:
        logging.getLogger("test.echo").warning("echoing %d bytes", len(request), extra={"echo_size": len(request)})
        return request

    host = _echo_host({"Echo": grpc.unary_unary_rpc_method_handler(echo)}, tracer=tracer)
    port = await host.start()
    try:
        with Captured("test.echo", logs.JsonFormatter("agents")) as captured:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert await channel.unary_unary("/test.Echo/Echo")(b"abc", metadata=(("x-request-id", "req-123"),)) == b"abc"
    finally:
        await host.stop(0)
    (line,) = captured.json_lines()
    served = await _wait_for_span(spans, lambda s: s.name == "test.Echo/Echo" and s.kind == trace.SpanKind.SERVER)
    assert line["message"] == "echoing 3 bytes" and line["level"] == "WARNING" and line["logger"] == "test.echo"
    assert line["service"] == "agents" and line["echo_size"] == 3
    assert line["request_id"] == "req-123"
    assert line["trace_id"] == format(served.context.trace_id, "032x")
    assert line["span_id"] == format(served.context.span_id, "016x")


@pytest.mark.fast
def test_log_configuration_follows_the_settings():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    try:
        logs.configure(Settings(log_format="json", log_level="warning"), "cache", stream)
        logging.getLogger("test.configured").info("not at INFO")
        logging.getLogger("test.configured").error("at ERROR")
        with pytest.raises(ValueError, match="LOG_FORMAT"):
            logs.configure(Settings(log_format="xml"), "cache", stream)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["message"] == "at ERROR" and line["service"] == "cache" and "request_id" not in line


def _burn_cpu(seconds: float) -> int:
    total, until = 0, time.perf_counter() + seconds
    while time.perf_counter() < until:
        total += 1
    return total


async def test_slow_grpc_calls_log_their_profile(slow_profiler):
    async def work(request: bytes, context) -> bytes:
        if request == b"slow":
            _burn_cpu(0.4)
        return request

    host = _echo_host({"Work": grpc.unary_unary_rpc_method_handler(work)}, profiler=slow_profiler)
    port = await host.start()
    try:
        with Captured("devops_hub.profiling", logging.Formatter(logs.TEXT_FORMAT)) as captured:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/test.Echo/Work")
                await call(b"fast", metadata=(("x-request-id", "quick-one"),))
                await call(b"slow", metadata=(("x-request-id", "slow-one"),))
    finally:
        await host.stop(0)
    text = "\n".join(captured.lines())
    assert "slow request test.Echo/Work took" in text
    assert "_burn_cpu" in text, "the profile names where the time went"
    assert "[slow-one]" in text and "quick-one" not in text


async def test_slow_http_requests_log_their_profile(slow_profiler, sqlite_url):
    slow_profiler.threshold = 0.0
    async with running_stack(make_settings(sqlite_url)) as stack:
        with Captured("devops_hub.profiling", logs.JsonFormatter("gateway")) as captured:
            async with gateway_client(stack.settings, profiler=slow_profiler) as http:
                response = await http.get("/api/agents/builtin-none", headers={"x-request-id": "profiled"})
                assert response.status_code == 404
    records = [line for line in captured.json_lines() if line.get("request") == "GET /api/agents/{id}"]
    assert records, captured.lines()
    assert records[0]["request_id"] == "profiled" and records[0]["duration_ms"] >= 0
    assert "cumulative" in records[0]["message"]
