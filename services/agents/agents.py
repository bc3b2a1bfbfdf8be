"""The agents use cases: the resource template (services/common/usecases/resource.py) with the
agents' rules, their list and discovery reads, and batch create.

Each cached read lives as long as its RPC's cache_max_age in the protos says; a write
makes stale that agent's key and every list and discovery page (any may include it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from devops_hub.v1 import agents_pb2

from services.agents import validation
from services.agents.repository import AgentFilter, AgentRepository
from services.cache.client.decorators import cached
from services.common.contract import pagination
from services.common.contract.errors import invalid_fields
from services.common.usecases.resource import Resource, Violations

Agent = agents_pb2.Agent

_METHODS = agents_pb2.DESCRIPTOR.services_by_name["AgentsService"].methods_by_name


class Agents(Resource[Agent]):
    label = "agent"
    _repository: AgentRepository

    async def list(self, request: agents_pb2.ListAgentsRequest) -> agents_pb2.ListAgentsResponse:
        pagination.page_size(request.page_size)
        pagination.decode_token(request)
        _check_filters(_list_filter(request))
        return await self._page(request)

    async def discover(self, request: agents_pb2.DiscoverAgentsRequest) -> agents_pb2.DiscoverAgentsResponse:
        pagination.page_size(request.page_size)
        _check_filters(_discover_filter(request))
        return await self._discovery(request)

    async def batch_create(self, agents: Sequence[Agent]) -> agents_pb2.BatchCreateAgentsResponse:
        return await self.create_all(agents, "requests[{i}].agent", lambda created: agents_pb2.BatchCreateAgentsResponse(agents=created))

    # The cached reads: keys from their arguments, made stale by Resource.made_stale().

    @cached(method=_METHODS["GetAgent"], key_prefix="agents:get")
    async def _stored(self, agent_id: str) -> Agent | None:
        # A "not found" is cached too (shortly): a create invalidates it like any write.
        return await self._repository.get(agent_id)

    @cached(method=_METHODS["ListAgents"], key_prefix="agents:list")
    async def _page(self, request: agents_pb2.ListAgentsRequest) -> agents_pb2.ListAgentsResponse:
        filters = _list_filter(request)
        agents, token = await pagination.page(request, lambda after, limit: self._repository.list(filters, after, limit), lambda a: a.id)
        return agents_pb2.ListAgentsResponse(agents=agents, next_page_token=token)

    @cached(method=_METHODS["DiscoverAgents"], key_prefix="agents:discover")
    async def _discovery(self, request: agents_pb2.DiscoverAgentsRequest) -> agents_pb2.DiscoverAgentsResponse:
        filters = _discover_filter(request)
        agents, facets = await asyncio.gather(
            self._repository.list(filters, None, pagination.page_size(request.page_size)), self._repository.facets(filters)
        )
        return agents_pb2.DiscoverAgentsResponse(agents=agents, total_size=facets.total, facets=agents_pb2.Facets(**facets.counts))

    lists = (_page, _discovery)

    # The agents' rules.

    async def check(self, agent: Agent, path: str, violations: Violations) -> None:
        validation.check(agent, path, violations)

    def normalise(self, agent: Agent) -> None:
        validation.normalise(agent)

    def event_data(self, agent: Agent) -> dict[str, str]:
        return {"domain": agent.domain}


def _list_filter(request: agents_pb2.ListAgentsRequest) -> AgentFilter:
    return AgentFilter(request.domain, request.status, request.type, [request.capability] if request.capability else [])


def _discover_filter(request: agents_pb2.DiscoverAgentsRequest) -> AgentFilter:
    return AgentFilter(request.domain, request.status, request.type, list(request.capability))


def _check_filters(filters: AgentFilter) -> None:
    violations: Violations = []
    if filters.status not in Agent.Status.values():
        violations.append(("status", f"unknown value {filters.status}"))
    if filters.type not in Agent.Type.values():
        violations.append(("type", f"unknown value {filters.type}"))
    if violations:
        raise invalid_fields(violations)
