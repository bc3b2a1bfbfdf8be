"""The agents use cases: validation, caching and invalidation around the repository.

Cache rules: as long as the protos' cache_max_age says (a single agent 300 s, a
list page 60 s, a discovery 300 s). A write invalidates exactly what it made stale: that agent's key,
and every list and discovery page (any of them may include it). A write records
these invalidations and its events in its own transaction (cache/log/outbox.py); the
cache is told after the commit, so a read that follows the write cannot refill the
old value from the database.
"""

from __future__ import annotations

import asyncio
import builtins
import uuid
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeVar

from devops_hub.v1 import agents_pb2

from services.agents import validation
from services.agents.repository import AgentFilter, AgentRepository
from services.cache.client.decorators import CacheManager, cached, encoded, every, stale
from services.cache.log.outbox import Outbox
from services.common import field_behavior, idempotency, pagination
from services.common.errors import Aborted, NotFound, invalid_fields
from services.common.etags import revision_of

Agent = agents_pb2.Agent
Answer = TypeVar("Answer", Agent, agents_pb2.BatchCreateAgentsResponse)

# Each cached read lives as long as its RPC's cache_max_age in the protos says.
_METHODS = agents_pb2.DESCRIPTOR.services_by_name["AgentsService"].methods_by_name


class Agents:
    def __init__(self, repository: AgentRepository, cache: CacheManager, outbox: Outbox) -> None:
        self._repository = repository
        # The @cached reads below find their manager here.
        self.cache = cache
        self._outbox = outbox

    async def get(self, agent_id: str) -> Agent:
        agent = await self._stored(agent_id)
        if agent is None:
            raise _not_found(agent_id)
        return agent

    async def get_encoded(self, agent_id: str) -> bytes:
        """get() as the Agent's wire bytes: a hot GetAgent answers the cached bytes."""
        agent = await encoded(self._stored, agent_id)
        if agent is None:
            raise _not_found(agent_id)
        return agent

    async def list(self, request: agents_pb2.ListAgentsRequest) -> agents_pb2.ListAgentsResponse:
        pagination.page_size(request.page_size)
        pagination.decode_token(request)
        _check_filters(_list_filter(request))
        return await self._page(request)

    async def discover(self, request: agents_pb2.DiscoverAgentsRequest) -> agents_pb2.DiscoverAgentsResponse:
        pagination.page_size(request.page_size)
        _check_filters(_discover_filter(request))
        return await self._discovery(request)

    # The cached reads: keys from their arguments, write_of by _made_stale().

    @cached(method=_METHODS["GetAgent"], key_prefix="agents:get")
    async def _stored(self, agent_id: str) -> Agent | None:
        # A "not found" is cached too (shortly): a create invalidates it like any write.
        return await self._repository.get(agent_id)

    @cached(method=_METHODS["ListAgents"], key_prefix="agents:list")
    async def _page(self, request: agents_pb2.ListAgentsRequest) -> agents_pb2.ListAgentsResponse:
        size = pagination.page_size(request.page_size)
        # One row more than the page tells whether another page follows.
        agents = await self._repository.list(_list_filter(request), pagination.decode_token(request), size + 1)
        response = agents_pb2.ListAgentsResponse(agents=agents[:size])
        if len(agents) > size:
            response.next_page_token = pagination.encode_token(agents[size - 1].id, request)
        return response

    @cached(method=_METHODS["DiscoverAgents"], key_prefix="agents:discover")
    async def _discovery(self, request: agents_pb2.DiscoverAgentsRequest) -> agents_pb2.DiscoverAgentsResponse:
        filters = _discover_filter(request)
        agents, facets = await asyncio.gather(
            self._repository.list(filters, None, pagination.page_size(request.page_size)), self._repository.facets(filters)
        )
        return agents_pb2.DiscoverAgentsResponse(agents=agents, total_size=facets.total, facets=agents_pb2.Facets(**facets.counts))

    async def create(self, agent: Agent) -> Agent:
        return await self._create([agent], "agent", lambda created: created[0])

    async def batch_create(self, agents: Sequence[Agent]) -> agents_pb2.BatchCreateAgentsResponse:
        return await self._create(agents, "requests[{i}].agent", lambda created: agents_pb2.BatchCreateAgentsResponse(agents=created))

    async def _create(self, agents: Sequence[Agent], prefix: str, answer: Callable[[builtins.list[Agent]], Answer]) -> Answer:
        """Creates all of `agents` or none of them; `answer` makes the RPC's answer of
        them, stored with them when the call carries a request_id."""
        if len(agents) > validation.MAX_BATCH:
            raise invalid_fields([("requests", f"at most {validation.MAX_BATCH} agents per call, got {len(agents)}")])
        violations: validation.Violations = []
        seen: dict[str, int] = {}
        new_agents = []
        for i, requested in enumerate(agents):
            path = prefix.format(i=i)
            agent = Agent()
            agent.CopyFrom(requested)
            agent.ClearField("create_time")
            agent.ClearField("update_time")
            agent.etag = ""
            if not agent.id:
                agent.id = str(uuid.uuid4())
            validation.check_id(agent.id, f"{path}.id", violations)
            validation.check_fields(agent, validation.WRITABLE_FIELDS, path, violations)
            if agent.id in seen:
                violations.append((f"{path}.id", f"repeats the id of {prefix.format(i=seen[agent.id])}"))
            seen.setdefault(agent.id, i)
            validation.normalise(agent)
            new_agents.append(agent)
        if violations:
            raise invalid_fields(violations)
        async with self._outbox.write() as write:
            await idempotency.claim(write.tx)
            created = await self._repository.insert(write.tx, new_agents, write.time)
            write.made_stale(*_made_stale(*(a.id for a in created)))
            for agent in created:
                write.emit("agent.created", agent.id, {"agent_id": agent.id, "domain": agent.domain})
            reply = answer(created)
            await idempotency.answer(write.tx, reply)
        return reply

    async def update(self, agent: Agent, mask: Sequence[str]) -> Agent:
        violations: validation.Violations = []
        validation.check_id(agent.id, "agent.id", violations)
        fields = _fields_to_update(agent, mask, violations)
        changes = Agent()
        changes.CopyFrom(agent)
        validation.check_fields(changes, fields, "agent", violations)
        if violations:
            raise invalid_fields(violations)
        validation.normalise(changes)
        expected = _expected_revision(agent.etag)
        async with self._outbox.write() as write:
            updated = await self._repository.update(write.tx, agent.id, changes, fields, expected, write.time)
            if updated is not None:
                write.made_stale(*_made_stale(agent.id))
                write.emit("agent.updated", agent.id, {"agent_id": agent.id, "fields": list(fields)})
        if updated is None:
            await self._raise_missing_or_stale(agent.id, agent.etag)
        return updated

    async def delete(self, agent_id: str, etag: str) -> None:
        async with self._outbox.write() as write:
            deleted = await self._repository.delete(write.tx, agent_id, _expected_revision(etag))
            if deleted:
                write.made_stale(*_made_stale(agent_id))
                write.emit("agent.deleted", agent_id, {"agent_id": agent_id})
        if not deleted:
            await self._raise_missing_or_stale(agent_id, etag)

    async def _raise_missing_or_stale(self, agent_id: str, etag: str) -> NoReturn:
        if etag and await self._repository.exists(agent_id):
            raise Aborted(
                f"agent {agent_id!r} was changed since etag {etag!r}; read it again and retry",
                reason="ETAG_MISMATCH",
                metadata={"id": agent_id},
            )
        raise _not_found(agent_id)


def _not_found(agent_id: str) -> NotFound:
    return NotFound(f"agent {agent_id!r} not found", reason="AGENT_NOT_FOUND", metadata={"id": agent_id})


def _made_stale(*agent_ids: str) -> tuple[str, ...]:
    """What a write to these agents makes stale, named through the reads' own
    declarations: their keys, and every list and discovery page (any may hold them)."""
    return (*(stale(Agents._stored, i) for i in agent_ids), every(Agents._page), every(Agents._discovery))


def _fields_to_update(agent: Agent, mask: Sequence[str], violations: validation.Violations) -> list[str]:
    """AIP-134: the mask's paths; "*" for every writable field; no mask for the fields set."""
    if not mask:
        fields = [name for name in validation.WRITABLE_FIELDS if field_behavior.is_set(agent, name)]
        if not fields:
            violations.append(("update_mask", "nothing to update: set update_mask or some fields of agent"))
        return fields
    if list(mask) == ["*"]:
        return list(validation.WRITABLE_FIELDS)
    fields = []
    for i, path in enumerate(mask):
        if path not in validation.WRITABLE_FIELDS:
            violations.append(
                (f"update_mask.paths[{i}]", f"{path!r} is not a writable field; one of {', '.join(validation.WRITABLE_FIELDS)}")
            )
        elif path not in fields:
            fields.append(path)
    return fields


def _expected_revision(etag: str) -> int | None:
    if not etag:
        return None
    # An etag this service never issued matches no revision: the write is refused as stale.
    revision = revision_of(etag)
    return -1 if revision is None else revision


def _list_filter(request: agents_pb2.ListAgentsRequest) -> AgentFilter:
    return AgentFilter(request.domain, request.status, request.type, [request.capability] if request.capability else [])


def _discover_filter(request: agents_pb2.DiscoverAgentsRequest) -> AgentFilter:
    return AgentFilter(request.domain, request.status, request.type, list(request.capability))


def _check_filters(filters: AgentFilter) -> None:
    violations: validation.Violations = []
    if filters.status not in Agent.Status.values():
        violations.append(("status", f"unknown value {filters.status}"))
    if filters.type not in Agent.Type.values():
        violations.append(("type", f"unknown value {filters.type}"))
    if violations:
        raise invalid_fields(violations)
