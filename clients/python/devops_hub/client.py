"""A small asyncio client for DevOps Hub: thin methods over the generated stubs.

    async with Client.connect(api_key=key) as hub:
        agent = await hub.get_agent("py-linter")
        async for event in hub.watch_execution(execution.id):
            ...

Messages are the generated ones (devops_hub.v1.*_pb2); a method takes the request's
fields as keywords where it has filters. A failed call raises an ApiError subclass
(devops_hub.errors) with the AIP-193 details read; server streams and paged lists are
async iterators. The stubs stay reachable (`hub.agents`, `hub.workflows`, ...) for
what the methods leave out; their calls raise grpc.aio.AioRpcError, which
errors.from_rpc_error() turns into an ApiError.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from functools import cached_property
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, json_format, struct_pb2

from devops_hub.channels import DEFAULT_TIMEOUT, SERVICES, addresses_from_env, backend_of, open_channel
from devops_hub.errors import from_rpc_error
from devops_hub.v1 import (
    agents_pb2,
    agents_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    cache_pb2,
    cache_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    runtime_pb2,
    workflows_pb2,
    workflows_pb2_grpc,
)

T = TypeVar("T")


class Client:
    """Calls to every service of one DevOps Hub, over one channel per part (`backend`).

    `Client.connect()` opens the channels (key, retries, deadlines); a part of the
    system that has channels of its own (tracing, its service key) wraps them in
    `Client(channels)`, with `timeout` as the deadline of calls given none.
    """

    def __init__(self, channels: Mapping[str, grpc.aio.Channel], *, timeout: float | None = None) -> None:
        self._channels = dict(channels)
        self._timeout = timeout

    @classmethod
    def connect(
        cls, addresses: Mapping[str, str] | None = None, api_key: str = "", *, timeout: float = DEFAULT_TIMEOUT
    ) -> Client:
        """A client with its own channels: one per distinct address of `addresses` (a
        part → host:port mapping; by default addresses_from_env()), presenting `api_key`."""
        addresses = addresses if addresses is not None else addresses_from_env()
        opened = {address: open_channel(address, api_key, timeout=timeout) for address in set(addresses.values())}
        return cls({backend: opened[address] for backend, address in addresses.items()})

    async def close(self) -> None:
        for channel in {id(c): c for c in self._channels.values()}.values():
            await channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # The generated stubs, each on the channel of the part its proto names.
    @cached_property
    def agents(self) -> agents_pb2_grpc.AgentsServiceStub:
        return agents_pb2_grpc.AgentsServiceStub(self._channel("AgentsService"))

    @cached_property
    def api_keys(self) -> auth_pb2_grpc.ApiKeysServiceStub:
        return auth_pb2_grpc.ApiKeysServiceStub(self._channel("ApiKeysService"))

    @cached_property
    def workflows(self) -> workflows_pb2_grpc.WorkflowsServiceStub:
        return workflows_pb2_grpc.WorkflowsServiceStub(self._channel("WorkflowsService"))

    @cached_property
    def events(self) -> events_pb2_grpc.EventsServiceStub:
        return events_pb2_grpc.EventsServiceStub(self._channel("EventsService"))

    @cached_property
    def cache(self) -> cache_pb2_grpc.CacheServiceStub:
        return cache_pb2_grpc.CacheServiceStub(self._channel("CacheService"))

    # AgentsService
    async def get_agent(self, id: str) -> agents_pb2.Agent:
        return await self._unary(self.agents.GetAgent, agents_pb2.GetAgentRequest(id=id))

    def list_agents(self, **filters: Any) -> AsyncGenerator[agents_pb2.Agent, None]:
        """Every agent that `filters` (ListAgentsRequest fields) select, page after page."""
        return self._pages(self.agents.ListAgents, agents_pb2.ListAgentsRequest(**filters), "agents")

    async def create_agent(self, agent: agents_pb2.Agent) -> agents_pb2.Agent:
        return await self._unary(self.agents.CreateAgent, agents_pb2.CreateAgentRequest(agent=agent))

    async def update_agent(self, agent: agents_pb2.Agent, paths: Iterable[str]) -> agents_pb2.Agent:
        request = agents_pb2.UpdateAgentRequest(agent=agent)
        request.update_mask.paths.extend(paths)
        return await self._unary(self.agents.UpdateAgent, request)

    async def delete_agent(self, id: str, etag: str = "") -> None:
        await self._unary(self.agents.DeleteAgent, agents_pb2.DeleteAgentRequest(id=id, etag=etag))

    async def discover_agents(self, **filters: Any) -> agents_pb2.DiscoverAgentsResponse:
        return await self._unary(self.agents.DiscoverAgents, agents_pb2.DiscoverAgentsRequest(**filters))

    async def execute_agent(self, request: agents_pb2.ExecuteAgentRequest, *, timeout: float | None = None) -> runtime_pb2.AgentResult:
        """Runs an agent's capability; `timeout` is the call's deadline, beside the
        request's own `timeout` (how long the agent may run)."""
        return await self._unary(self.agents.ExecuteAgent, request, timeout)

    # ApiKeysService
    async def whoami(self) -> auth_pb2.ApiKey:
        return await self._unary(self.api_keys.WhoAmI, empty_pb2.Empty())

    async def create_api_key(self, api_key: auth_pb2.ApiKey) -> auth_pb2.CreateApiKeyResponse:
        """The new key's record and, shown this once, the key itself."""
        return await self._unary(self.api_keys.CreateApiKey, auth_pb2.CreateApiKeyRequest(api_key=api_key))

    def list_api_keys(self, **filters: Any) -> AsyncGenerator[auth_pb2.ApiKey, None]:
        return self._pages(self.api_keys.ListApiKeys, auth_pb2.ListApiKeysRequest(**filters), "api_keys")

    async def revoke_api_key(self, id: str) -> auth_pb2.ApiKey:
        return await self._unary(self.api_keys.RevokeApiKey, auth_pb2.RevokeApiKeyRequest(id=id))

    # WorkflowsService
    async def get_workflow(self, id: str) -> workflows_pb2.Workflow:
        return await self._unary(self.workflows.GetWorkflow, workflows_pb2.GetWorkflowRequest(id=id))

    def list_workflows(self, **filters: Any) -> AsyncGenerator[workflows_pb2.Workflow, None]:
        return self._pages(self.workflows.ListWorkflows, workflows_pb2.ListWorkflowsRequest(**filters), "workflows")

    async def create_workflow(self, workflow: workflows_pb2.Workflow) -> workflows_pb2.Workflow:
        return await self._unary(self.workflows.CreateWorkflow, workflows_pb2.CreateWorkflowRequest(workflow=workflow))

    async def delete_workflow(self, id: str, etag: str = "") -> None:
        await self._unary(self.workflows.DeleteWorkflow, workflows_pb2.DeleteWorkflowRequest(id=id, etag=etag))

    async def execute_workflow(
        self, id: str, input: Mapping[str, Any] | None = None, idempotency_key: str = ""
    ) -> workflows_pb2.Execution:
        """Starts an execution (PENDING) and returns it at once; watch_execution() follows it."""
        request = workflows_pb2.ExecuteWorkflowRequest(id=id, idempotency_key=idempotency_key, input=_struct(input))
        return await self._unary(self.workflows.ExecuteWorkflow, request)

    async def get_execution(self, id: str) -> workflows_pb2.Execution:
        return await self._unary(self.workflows.GetExecution, workflows_pb2.GetExecutionRequest(id=id))

    def list_executions(self, **filters: Any) -> AsyncGenerator[workflows_pb2.Execution, None]:
        return self._pages(self.workflows.ListExecutions, workflows_pb2.ListExecutionsRequest(**filters), "executions")

    async def cancel_execution(self, id: str) -> workflows_pb2.Execution:
        return await self._unary(self.workflows.CancelExecution, workflows_pb2.CancelExecutionRequest(id=id))

    def watch_execution(self, id: str, after: str = "") -> AsyncGenerator[events_pb2.Event, None]:
        """The execution's events (replayed after `after`, then live), ending with its final one."""
        return self._stream(self.workflows.WatchExecution, workflows_pb2.WatchExecutionRequest(id=id, after=after))

    # EventsService
    def list_events(self, **filters: Any) -> AsyncGenerator[events_pb2.Event, None]:
        return self._pages(self.events.ListEvents, events_pb2.ListEventsRequest(**filters), "events")

    async def publish_event(self, event: events_pb2.Event) -> events_pb2.Event:
        return await self._unary(self.events.PublishEvent, events_pb2.PublishEventRequest(event=event))

    def stream_events(self, **filters: Any) -> AsyncGenerator[events_pb2.Event, None]:
        """Events as they are stored, from now (or after the event id `after`), until closed."""
        return self._stream(self.events.StreamEvents, events_pb2.StreamEventsRequest(**filters))

    # CacheService (admin keys only)
    async def cache_stats(self) -> cache_pb2.CacheStats:
        return await self._unary(self.cache.Stats, empty_pb2.Empty())

    # How every call is made.
    def _channel(self, service: str) -> grpc.aio.Channel:
        backend = backend_of(SERVICES[service])
        if backend not in self._channels:
            raise ValueError(f"{service} is served by the {backend!r} part, and this client has no channel to it")
        return self._channels[backend]

    async def _unary(self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None = None) -> T:
        try:
            return await method(request, timeout=timeout or self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def _stream(self, method: Callable[..., Any], request: Any) -> AsyncGenerator[Any, None]:
        call = method(request)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def _pages(self, method: Callable[..., Awaitable[Any]], request: Any, field: str) -> AsyncGenerator[Any, None]:
        while True:
            page = await self._unary(method, request)
            for item in getattr(page, field):
                yield item
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token


def _struct(values: Mapping[str, Any] | None) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    json_format.ParseDict(dict(values or {}), struct)
    return struct
