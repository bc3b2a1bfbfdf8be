"""Workflow definitions: validation against the live agents service, caching, invalidation.

Cache rules: as long as the protos' cache_max_age says (the workflow list 60 s, a
single workflow 300 s); a write invalidates that workflow's key and every list page.
The invalidations and the event are recorded in the write's own transaction
(cache/log/outbox.py) and sent to the cache after it commits.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

from devops_hub import errors
from devops_hub.client import Client
from devops_hub.v1 import agents_pb2, workflows_pb2

from services.cache.client.decorators import CacheManager, cached, every, stale
from services.cache.log.outbox import Outbox, Write
from services.common import field_behavior, idempotency, pagination
from services.common.errors import Aborted, NotFound, Unavailable, invalid_fields
from services.common.etags import revision_of
from services.workflows import validation
from services.workflows.repository import WorkflowRepository

Workflow = workflows_pb2.Workflow

# Each cached read lives as long as its RPC's cache_max_age in the protos says.
_METHODS = workflows_pb2.DESCRIPTOR.services_by_name["WorkflowsService"].methods_by_name
# The fields a client may write through UpdateWorkflow's mask, read from the proto.
WRITABLE = field_behavior.writable_fields(Workflow)


class Workflows:
    def __init__(
        self,
        repository: WorkflowRepository,
        agents: Client,
        cache: CacheManager,
        outbox: Outbox,
    ) -> None:
        self._repository = repository
        self._agents = agents
        # The @cached reads below find their manager here.
        self.cache = cache
        self._outbox = outbox

    async def get(self, workflow_id: str) -> Workflow:
        workflow = await self._stored(workflow_id)
        if workflow is None:
            raise NotFound(f"workflow {workflow_id!r} not found", reason="WORKFLOW_NOT_FOUND", metadata={"id": workflow_id})
        return workflow

    async def list(self, request: workflows_pb2.ListWorkflowsRequest) -> workflows_pb2.ListWorkflowsResponse:
        pagination.page_size(request.page_size)
        pagination.decode_token(request)
        return await self._page(request)

    # The cached reads: keys from their arguments, write_of by _record().

    @cached(method=_METHODS["GetWorkflow"], key_prefix="workflows:get")
    async def _stored(self, workflow_id: str) -> Workflow | None:
        return await self._repository.get(workflow_id)

    @cached(method=_METHODS["ListWorkflows"], key_prefix="workflows:list")
    async def _page(self, request: workflows_pb2.ListWorkflowsRequest) -> workflows_pb2.ListWorkflowsResponse:
        size = pagination.page_size(request.page_size)
        workflows = await self._repository.list(pagination.decode_token(request), size + 1)
        response = workflows_pb2.ListWorkflowsResponse(workflows=workflows[:size])
        if len(workflows) > size:
            response.next_page_token = pagination.encode_token(workflows[size - 1].id, request)
        return response

    async def create(self, requested: Workflow) -> Workflow:
        workflow = Workflow()
        workflow.CopyFrom(requested)
        for name in ("create_time", "update_time", "etag"):
            workflow.ClearField(name)
        if not workflow.id:
            workflow.id = str(uuid.uuid4())
        violations: validation.Violations = []
        if not validation.ID.match(workflow.id):
            violations.append(("workflow.id", "must be 1-128 letters, digits, '.', '_' or '-'"))
        await self._validate(workflow, violations)
        workflow.name = workflow.name.strip()
        async with self._outbox.write() as write:
            await idempotency.claim(write.tx)
            created = await self._repository.insert(write.tx, workflow, write.time)
            _record(write, created.id, "workflow.created")
            await idempotency.answer(write.tx, created)
        return created

    async def update(self, requested: Workflow, mask: Sequence[str]) -> Workflow:
        if not requested.id:
            raise invalid_fields([("workflow.id", "is required")])
        paths = list(mask) or [name for name in WRITABLE if field_behavior.is_set(requested, name)]
        unknown = [(f"update_mask.paths[{i}]", f"{p!r} is not one of {', '.join(WRITABLE)}") for i, p in enumerate(paths) if p not in WRITABLE]
        if unknown:
            raise invalid_fields(unknown)
        current = await self._repository.get(requested.id)
        if current is None:
            raise NotFound(f"workflow {requested.id!r} not found", reason="WORKFLOW_NOT_FOUND", metadata={"id": requested.id})
        merged = Workflow()
        merged.CopyFrom(current)
        for name in paths:
            merged.ClearField(name)
            if name == "steps":
                merged.steps.extend(requested.steps)
            elif name == "timeout":
                if requested.HasField("timeout"):
                    merged.timeout.CopyFrom(requested.timeout)
            else:
                setattr(merged, name, getattr(requested, name))
        await self._validate(merged, [])
        # Without an etag, the revision just read guards the read-modify-write.
        expected = _revision(requested.etag) if requested.etag else int(current.etag)
        async with self._outbox.write() as write:
            updated = await self._repository.replace(write.tx, merged, expected, write.time)
            if updated is not None:
                _record(write, updated.id, "workflow.updated")
        if updated is None:
            raise Aborted(
                f"workflow {requested.id!r} was changed since it was read; read it again and retry",
                reason="ETAG_MISMATCH",
                metadata={"id": requested.id},
            )
        return updated

    async def delete(self, workflow_id: str, etag: str) -> None:
        async with self._outbox.write() as write:
            deleted = await self._repository.delete(write.tx, workflow_id, _revision(etag) if etag else None)
            if deleted:
                _record(write, workflow_id, "workflow.deleted")
        if not deleted:
            if etag and await self._repository.exists(workflow_id):
                raise Aborted(f"workflow {workflow_id!r} was changed since etag {etag!r}", reason="ETAG_MISMATCH", metadata={"id": workflow_id})
            raise NotFound(f"workflow {workflow_id!r} not found", reason="WORKFLOW_NOT_FOUND", metadata={"id": workflow_id})

    async def _validate(self, workflow: Workflow, violations: validation.Violations) -> None:
        validation.check_workflow(workflow, "workflow", violations)
        agent_ids = sorted({s.agent_id for s in workflow.steps if s.agent_id})
        agents = dict(zip(agent_ids, await asyncio.gather(*(self._agent(a) for a in agent_ids))))
        validation.check_agents(workflow, "workflow", agents, violations)
        if violations:
            raise invalid_fields(violations)

    async def _agent(self, agent_id: str) -> agents_pb2.Agent | None:
        try:
            return await self._agents.get_agent(agent_id)
        except (errors.NotFound, errors.InvalidArgument):
            return None
        except errors.ApiError as exc:
            raise Unavailable(
                f"cannot check agent {agent_id!r}: the agents service answered {exc.code.name}", reason="AGENTS_UNAVAILABLE"
            ) from None


def _record(write: Write, workflow_id: str, event: str) -> None:
    """What a write to one workflow makes stale (named through the reads' own
    declarations: its key and every list page), and its event."""
    write.made_stale(stale(Workflows._stored, workflow_id), every(Workflows._page))
    write.emit(event, workflow_id, {"workflow_id": workflow_id})


def _revision(etag: str) -> int:
    # An etag this service never issued matches no revision.
    revision = revision_of(etag)
    return -1 if revision is None else revision
