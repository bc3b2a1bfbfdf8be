"""The scenario of tests/test_adding_a_service.py, run as

    PYTHONPATH=<stubs generated with reports.proto>:<repository> python -m tests.support.new_service OUT.json DATABASE_URL

ReportsService, written as the guide says (reports.proto, servicer.py, reports.py,
repository.py), is hosted by the agents process it names as its backend: what a
newcomer adds to services/agents/server.py's build is its use case, on that process's
database, cache and outbox, and the `host.add(...)` below. The process is built
and started by the production code, and the gateway beside it is given nothing about
the new service. What the real interfaces (HTTP, gRPC, metrics, traces) then answer
is written to OUT.json for the test to judge.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
from devops_hub.v1 import auth_pb2_grpc, options_pb2, reports_pb2, reports_pb2_grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from devstack.ports import free_port
from services.agents.server import build as build_agents
from services.cache.client.manager import CacheManager
from services.cache.log.outbox import Outbox
from services.common.auth import keys
from services.common.auth.scopes import required_scopes, scope_name
from services.common.foundation.settings import Settings
from services.common.runtime.process import running
from services.common.telemetry import tracing
from services.common.telemetry.metrics import ServiceMetrics
from tests.support.auth import ADMIN_KEY, new_key
from tests.support.grpc_errors import failure_of
from tests.support.new_service.reports import Reports
from tests.support.new_service.repository import SCHEMA, ReportRepository
from tests.support.new_service.servicer import ReportsServicer
from tests.support.stack import running_gateway

SERVICE_NAME = reports_pb2.DESCRIPTOR.services_by_name["ReportsService"].full_name
# Generous: the machine may be loaded, and nothing here measures time.
TIMEOUT = 30.0


async def scenario(database_url: str) -> dict[str, Any]:
    spans, tracer = _trace_into_memory()
    registry = CollectorRegistry()
    settings = Settings(
        database_url=database_url,
        database_pool_size=2,
        agents_addr="127.0.0.1:0",
        # No sidecar: the services read the database without one.
        cache_addr=f"127.0.0.1:{free_port()}",
        auth_enabled=True,
        allow_anonymous_read=True,
        bootstrap_admin_key=ADMIN_KEY,
        service_api_key=keys.new_key(),
        rate_limit_requests=1000,
        rate_limit_window=60.0,
        shutdown_grace=1.0,
        log_level="WARNING",
    )
    agents = await build_agents(settings, ServiceMetrics(registry), tracer=tracer)
    await agents.db.execute(SCHEMA)
    # What a newcomer adds to services/agents/server.py's build, beside the agents' own servicers.
    reports = Reports(ReportRepository(agents.db), CacheManager(agents.cache), Outbox(agents.db, agents.cache, agents.relay, "reports"))
    agents.host.add(reports_pb2_grpc.add_ReportsServiceServicer_to_server, ReportsServicer(reports), SERVICE_NAME)
    seen: dict[str, Any] = {
        "scopes": {path: scope_name(scope) for path, scope in required_scopes().items() if SERVICE_NAME in path}
    }
    async with running(agents, settings.shutdown_grace):
        seen["series_at_start"] = _grpc_series(registry)
        # The gateway is told where the agents process listens, nothing about ReportsService.
        settings = settings.replace(agents_addr=agents.address)
        async with (
            grpc.aio.insecure_channel(agents.address) as channel,
            running_gateway(settings, tracer=tracer) as base_url,
            httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT) as http,
        ):
            keys_stub = auth_pb2_grpc.ApiKeysServiceStub(channel)
            read_key, write_key = await new_key(keys_stub, options_pb2.SCOPE_READ), await new_key(keys_stub, options_pb2.SCOPE_WRITE)
            seen["http"] = await _over_http(http, read_key, write_key)
            seen["grpc"] = await _over_grpc(channel, write_key)
            seen["reflection"] = await _reflection(channel)
            seen["health"] = await _health(channel)
            seen["spans"] = await _spans(spans)
        seen["series_after_calls"] = _grpc_series(registry)
    return seen


async def _over_http(http: httpx.AsyncClient, read_key: str, write_key: str) -> dict[str, Any]:
    body = {"title": "weekly", "agentIds": ["deploy-bot"]}
    created = await http.post("/api/reports", json=body, headers={"x-api-key": write_key})
    got = await http.get(f"/api/reports/{created.json().get('id', 'none')}")
    calls = {
        "create_without_key": await http.post("/api/reports", json=body),
        "create_with_read_key": await http.post("/api/reports", json=body, headers={"x-api-key": read_key}),
        "create": created,
        "create_without_title": await http.post("/api/reports", json={"agentIds": ["a"]}, headers={"x-api-key": write_key}),
        "create_with_unknown_field": await http.post(
            "/api/reports", json={**body, "colour": "red"}, headers={"x-api-key": write_key}
        ),
        "get": got,
        "get_unknown": await http.get("/api/reports/no-such-report"),
        "create_with_bad_id": await http.post("/api/reports", json={**body, "id": "bad id!"}, headers={"x-api-key": write_key}),
        "create_again": await http.post(
            "/api/reports", json={**body, "id": created.json().get("id", "none")}, headers={"x-api-key": write_key}
        ),
        "openapi": await http.get("/openapi.json"),
        "metrics": await http.get("/metrics"),
    }
    seen: dict[str, Any] = {}
    for name, response in calls.items():
        seen[name] = {
            "status": response.status_code,
            "ratelimit_limit": response.headers.get("x-ratelimit-limit"),
            "body": response.text if name == "metrics" else response.json(),
        }
    return seen


async def _over_grpc(channel: grpc.aio.Channel, write_key: str) -> dict[str, Any]:
    stub = reports_pb2_grpc.ReportsServiceStub(channel)
    write = (("x-api-key", write_key),)
    refused: dict[str, Any] = {}
    for name, call in {
        "get_empty_id": lambda: stub.GetReport(reports_pb2.GetReportRequest(id=""), timeout=TIMEOUT),
        "create_without_report": lambda: stub.CreateReport(reports_pb2.CreateReportRequest(), metadata=write, timeout=TIMEOUT),
    }.items():
        try:
            await call()
            refused[name] = {"code": "OK"}
        except grpc.aio.AioRpcError as error:
            failure = failure_of(error)
            refused[name] = {"code": failure.code.name, "fields": failure.fields}
    return refused


async def _reflection(channel: grpc.aio.Channel) -> dict[str, Any]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
    ]
    listed, found = [response async for response in stub.ServerReflectionInfo(iter(requests), timeout=TIMEOUT)]
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw) for raw in found.file_descriptor_response.file_descriptor_proto]
    return {
        "services": [service.name for service in listed.list_services_response.service],
        "file_of_service": [f.name for f in files if any(s.name == "ReportsService" for s in f.service)],
    }


async def _health(channel: grpc.aio.Channel) -> str:
    stub = health_pb2_grpc.HealthStub(channel)
    answer = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


async def _spans(exporter: InMemorySpanExporter) -> list[list[str]]:
    """The spans of the gateway's GetReport call: its CLIENT span and the service's
    SERVER span, waited for (a span is exported as it ends, the server's a moment
    after the client has its answer)."""
    wanted = {f"{SERVICE_NAME}/GetReport"}
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while True:
        found = sorted({(span.name, span.kind.name) for span in exporter.get_finished_spans() if span.name in wanted})
        if len(found) >= 2 or asyncio.get_running_loop().time() > deadline:
            return [list(pair) for pair in found]
        await asyncio.sleep(0.05)


def _grpc_series(registry: CollectorRegistry) -> list[list[str]]:
    """[metric sample, method, code] of every gRPC server series of the new service."""
    return sorted(
        [sample.name, sample.labels["grpc_method"], sample.labels.get("grpc_code", ""), str(sample.value)]
        for metric in registry.collect()
        for sample in metric.samples
        if sample.labels.get("grpc_service") == SERVICE_NAME and sample.name in ("grpc_server_handled_total", "grpc_server_handling_seconds_count")
    )


def _trace_into_memory() -> tuple[InMemorySpanExporter, trace.Tracer | None]:
    """Tracing into memory: the tracer to hand to what is built, and what it records."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, tracing.tracer_of(provider)


def main(argv: list[str]) -> None:
    out, database_url = argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    Path(out).write_text(json.dumps(asyncio.run(scenario(database_url)), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
