"""Workflow definitions: the resource template (services/common/usecases/resource.py) with the
workflows' rules, which check the steps' agents against the live agents service.

Each cached read lives as long as its RPC's cache_max_age in the protos says; a write
makes stale that workflow's key and every list page.
"""

from __future__ import annotations

import asyncio

from devops_hub import errors
from devops_hub.client import Client
from devops_hub.v1 import agents_pb2, workflows_pb2

from services.cache.client.decorators import CacheManager, cached
from services.cache.log.outbox import Outbox
from services.common.contract import pagination
from services.common.contract.errors import Unavailable
from services.common.usecases.resource import Resource, Violations
from services.workflows import validation
from services.workflows.repository import WorkflowRepository

Workflow = workflows_pb2.Workflow

_METHODS = workflows_pb2.DESCRIPTOR.services_by_name["WorkflowsService"].methods_by_name


class Workflows(Resource[Workflow]):
    label = "workflow"
    _repository: WorkflowRepository

    def __init__(self, repository: WorkflowRepository, agents: Client, cache: CacheManager, outbox: Outbox) -> None:
        super().__init__(repository, cache, outbox)
        self._agents = agents

    async def list(self, request: workflows_pb2.ListWorkflowsRequest) -> workflows_pb2.ListWorkflowsResponse:
        pagination.page_size(request.page_size)
        pagination.decode_token(request)
        return await self._page(request)

    # The cached reads: keys from their arguments, made stale by Resource.made_stale().

    @cached(method=_METHODS["GetWorkflow"], key_prefix="workflows:get")
    async def _stored(self, workflow_id: str) -> Workflow | None:
        return await self._repository.get(workflow_id)

    @cached(method=_METHODS["ListWorkflows"], key_prefix="workflows:list")
    async def _page(self, request: workflows_pb2.ListWorkflowsRequest) -> workflows_pb2.ListWorkflowsResponse:
        workflows, token = await pagination.page(request, self._repository.list, lambda w: w.id)
        return workflows_pb2.ListWorkflowsResponse(workflows=workflows, next_page_token=token)

    lists = (_page,)

    # The workflows' rules.

    async def check(self, workflow: Workflow, path: str, violations: Violations) -> None:
        validation.check_workflow(workflow, path, violations)
        agent_ids = sorted({s.agent_id for s in workflow.steps if s.agent_id})
        agents = dict(zip(agent_ids, await asyncio.gather(*(self._agent(a) for a in agent_ids))))
        validation.check_agents(workflow, path, agents, violations)

    def normalise(self, workflow: Workflow) -> None:
        workflow.name = workflow.name.strip()

    async def _agent(self, agent_id: str) -> agents_pb2.Agent | None:
        try:
            return await self._agents.get_agent(agent_id)
        except (errors.NotFound, errors.InvalidArgument):
            return None
        except errors.ApiError as exc:
            raise Unavailable(
                f"cannot check agent {agent_id!r}: the agents service answered {exc.code.name}", reason="AGENTS_UNAVAILABLE"
            ) from None
