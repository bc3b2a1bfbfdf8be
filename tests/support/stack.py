"""The services in the test's own process, as production starts them: test settings,
a running stack of real servers on ephemeral ports, the agents it is seeded with, and
an HTTP client to a gateway in front of it."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
from devops_hub.v1 import agents_pb2, agents_pb2_grpc, cache_pb2_grpc, events_pb2_grpc, workflows_pb2_grpc
from google.protobuf import empty_pb2
from opentelemetry import trace

from devstack.ports import free_port
from gateway.server import build as build_gateway
from services.agents.builtins import builtin_agent_records
from services.agents.server import AgentsService
from services.agents.server import build as build_agents
from services.cache.sidecar.server import build as build_sidecar
from services.common.foundation.settings import Settings
from services.common.runtime.process import running
from services.common.telemetry.profiling import SlowRequestProfiler
from services.workflows.server import WorkflowsService
from services.workflows.server import build as build_workflows


def make_settings(database_url: str, **overrides) -> Settings:
    base = Settings(
        database_url=database_url,
        database_pool_size=2,
        database_max_overflow=4,
        agents_addr="127.0.0.1:0",
        workflows_addr="127.0.0.1:0",
        cache_addr="127.0.0.1:0",
        gateway_port=0,
        shutdown_grace=1.0,
        workflow_lease_ttl=1.5,
        events_flush_interval=0.02,
        events_poll_interval=0.05,
        # Access rules have tests of their own (test_auth.py); the rest test behaviour.
        auth_enabled=False,
        rate_limit_requests=0,
        rate_limit_execute_requests=0,
    )
    return base.replace(**overrides)


@dataclass
class Stack:
    settings: Settings
    agents: AgentsService
    channel: grpc.aio.Channel
    stub: agents_pb2_grpc.AgentsServiceStub
    cache_stub: cache_pb2_grpc.CacheServiceStub | None
    workflows: WorkflowsService | None = None
    workflows_stub: workflows_pb2_grpc.WorkflowsServiceStub | None = None
    events_stub: events_pb2_grpc.EventsServiceStub | None = None


@asynccontextmanager
async def running_stack(
    settings: Settings, *, with_sidecar: bool = True, with_workflows: bool = False, tracer: trace.Tracer | None = None
) -> AsyncIterator[Stack]:
    """The cache sidecar, the agents service and (optionally) the workflows service,
    seeded with the built-in agents, on ephemeral ports, as real servers, each
    started and closed as production does it (services/common/runtime/process.py), and
    traced into `tracer` when given one.

    Whatever started is stopped again, also when a later part fails to start.
    """
    if settings.auth_enabled and settings.agents_addr.endswith(":0"):
        # The sidecar checks keys with the agents service, so it must know its address
        # before either starts: reserve one now.
        settings = settings.replace(agents_addr=f"127.0.0.1:{free_port()}")
    async with contextlib.AsyncExitStack() as started:
        # A stack still up after 4 minutes is hung (the test's timeout is 5): say where
        # every task waits, which the timeout's own traceback (the loop's select) cannot.
        started.callback(asyncio.get_running_loop().call_later(240, _print_tasks).cancel)
        cache_stub = None
        if with_sidecar:
            sidecar = await started.enter_async_context(running(await build_sidecar(settings, tracer=tracer)))
            # What the services' relay does for a new cache: a position in their
            # invalidation log (empty when a test stack starts), so it takes fills.
            await sidecar.store.sync(0, 0, (), False)
            settings = settings.replace(cache_addr=sidecar.address)
            cache_channel = grpc.aio.insecure_channel(settings.cache_addr)
            started.push_async_callback(cache_channel.close)
            cache_stub = cache_pb2_grpc.CacheServiceStub(cache_channel)
        elif settings.cache_addr.endswith(":0"):
            settings = settings.replace(cache_addr=f"127.0.0.1:{free_port()}")
        agents = await started.enter_async_context(running(await build_agents(settings, tracer=tracer)))
        settings = settings.replace(agents_addr=agents.address)
        channel = grpc.aio.insecure_channel(settings.agents_addr)
        started.push_async_callback(channel.close)
        stack = Stack(settings, agents, channel, agents_pb2_grpc.AgentsServiceStub(channel), cache_stub)
        if cache_stub is not None:
            await _positioned(cache_stub, settings)
        if with_workflows:
            await create_builtin_agents(stack.stub, _key_metadata(settings))
            workflows = await started.enter_async_context(running(await build_workflows(settings, tracer=tracer)))
            stack.settings = settings = settings.replace(workflows_addr=workflows.address)
            workflows_channel = grpc.aio.insecure_channel(settings.workflows_addr)
            started.push_async_callback(workflows_channel.close)
            stack.workflows = workflows
            stack.workflows_stub = workflows_pb2_grpc.WorkflowsServiceStub(workflows_channel)
            stack.events_stub = events_pb2_grpc.EventsServiceStub(workflows_channel)
        yield stack


@asynccontextmanager
async def running_gateway(settings: Settings, **app_options: Any) -> AsyncIterator[str]:
    """The base URL (`http://127.0.0.1:PORT`) of the real gateway, built, started and
    stopped as `python -m gateway` does it (real uvicorn on a real socket, in the
    test's event loop), on an ephemeral port; `app_options` go to create_app."""
    gateway = await build_gateway(settings.replace(gateway_host="127.0.0.1", gateway_port=0), **app_options)
    async with running(gateway, settings.shutdown_grace):
        yield gateway.listening


@asynccontextmanager
async def gateway_client(
    settings: Settings, *, tracer: trace.Tracer | None = None, profiler: SlowRequestProfiler | None = None, **client_options
) -> AsyncIterator[httpx.AsyncClient]:
    """A real gateway (running_gateway) in front of the services `settings` name,
    traced into `tracer` and profiled by `profiler` when given them, and an HTTP client
    to it; `client_options` (timeout, headers) go to httpx."""
    async with running_gateway(settings, tracer=tracer, profiler=profiler) as base_url:
        async with httpx.AsyncClient(base_url=base_url, **client_options) as http:
            yield http


async def create_builtin_agents(stub: agents_pb2_grpc.AgentsServiceStub, metadata: Sequence[tuple[str, str]] = ()) -> None:
    """What the launcher's seeding does for the workflows: the built-in agents, created."""
    for agent in builtin_agent_records():
        await stub.CreateAgent(agents_pb2.CreateAgentRequest(agent=agent), metadata=metadata)


def _key_metadata(settings: Settings) -> tuple[tuple[str, str], ...]:
    key = settings.service_api_key or settings.bootstrap_admin_key
    return (("x-api-key", key),) if key else ()


async def _positioned(cache_stub: cache_pb2_grpc.CacheServiceStub, settings: Settings, timeout: float = 20.0) -> None:
    """Waits for the agents service's relay to give the new sidecar its position in the
    invalidation log: until then the sidecar takes no fills, and a test that counts
    cache hits would depend on how loaded the machine is."""
    metadata = _key_metadata(settings)
    deadline = asyncio.get_running_loop().time() + timeout
    while (await cache_stub.GetSyncState(empty_pb2.Empty(), metadata=metadata, timeout=timeout)).fresh:
        assert asyncio.get_running_loop().time() < deadline, "the relay never gave the sidecar a position"
        await asyncio.sleep(0.02)


def new_agent(i: int | str, **fields) -> agents_pb2.Agent:
    values = dict(
        id=f"agent-{i}" if isinstance(i, int) else i,
        name=f"Agent {i}",
        version="1.0.0",
        domain="ci",
        type=agents_pb2.Agent.TASK,
        status=agents_pb2.Agent.ACTIVE,
        capabilities=["lint", "test"],
        metadata={"team": "platform"},
    )
    values.update(fields)
    return agents_pb2.Agent(**values)


def _print_tasks() -> None:
    for task in asyncio.all_tasks():
        print(f"--- {task!r}", file=sys.stderr)
        task.print_stack(file=sys.stderr)
