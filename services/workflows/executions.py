"""Execution use cases: start, read, list, cancel and watch executions."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from devops_hub.v1 import events_pb2, workflows_pb2

from services.common.contract import pagination
from services.common.contract.errors import FailedPrecondition, invalid_fields
from services.common.usecases.resource import not_found
from services.workflows.engine import Engine
from services.workflows.events import Events, resume_position
from services.workflows.repository import ExecutionRepository
from services.workflows.statuses import ACTIVE_EXECUTION, FINAL_EXECUTION, execution_event
from services.workflows.workflows import Workflows

Execution = workflows_pb2.Execution
MAX_INPUT_BYTES = 1024 * 1024
_TERMINAL_EVENTS = frozenset(execution_event(status) for status in FINAL_EXECUTION)


class Executions:
    def __init__(self, workflows: Workflows, repository: ExecutionRepository, engine: Engine, events: Events) -> None:
        self._workflows = workflows
        self._repository = repository
        self._engine = engine
        self._events = events

    async def execute(self, workflow_id: str, input: dict[str, Any], idempotency_key: str) -> Execution:
        if len(json.dumps(input)) > MAX_INPUT_BYTES:
            raise invalid_fields([("input", f"must be at most {MAX_INPUT_BYTES} bytes of JSON")])
        workflow = await self._workflows.get(workflow_id)
        return await self._engine.submit(workflow, input, idempotency_key)

    async def get(self, execution_id: str) -> Execution:
        execution = await self._repository.get(execution_id)
        if execution is None:
            raise not_found("execution", execution_id)
        return execution

    async def list(self, request: workflows_pb2.ListExecutionsRequest) -> workflows_pb2.ListExecutionsResponse:
        if request.status not in Execution.Status.values():
            raise invalid_fields([("status", f"unknown value {request.status}")])
        def load(after: str | None, limit: int) -> Awaitable[list[Execution]]:
            return self._repository.list(request.workflow_id, request.status, _decode_position(after) if after else None, limit)

        executions, token = await pagination.page(request, load, _encode_position)
        return workflows_pb2.ListExecutionsResponse(executions=executions, next_page_token=token)

    async def cancel(self, execution_id: str) -> Execution:
        current = await self.get(execution_id)
        if current.status not in ACTIVE_EXECUTION:
            raise FailedPrecondition(
                f"execution {execution_id!r} has ended ({Execution.Status.Name(current.status)}); there is nothing to cancel",
                reason="EXECUTION_ENDED",
                metadata={"id": execution_id, "status": Execution.Status.Name(current.status)},
            )
        await self._engine.cancel(execution_id)
        return await self.get(execution_id)

    async def watch(self, execution_id: str, after: str = "") -> AsyncIterator[events_pb2.Event]:
        """The execution's transitions so far (after `after`, if given), then live
        ones, until it ends."""
        execution = await self.get(execution_id)
        position = resume_position(after)
        if position is not None and execution.status not in ACTIVE_EXECUTION:
            # Resumed past its end, the stream would wait for an end that has come.
            newest = (await self._events.list(events_pb2.ListEventsRequest(correlation_id=execution_id, page_size=1))).events
            if newest and newest[0].type in _TERMINAL_EVENTS and int(newest[0].id) <= position:
                return
        async for event in self._events.follow({"correlation_id": execution_id}, position or 0):
            yield event
            if event.type in _TERMINAL_EVENTS:
                return


def _encode_position(execution: Execution) -> str:
    """The page's last key; pagination.py makes the token of it."""
    return json.dumps([execution.create_time.ToJsonString(), execution.id])


def _decode_position(after: str) -> tuple[str, str]:
    try:
        created, execution_id = json.loads(after)
        return created.replace("Z", "+00:00"), execution_id
    except (ValueError, TypeError, AttributeError):
        raise invalid_fields([("page_token", "is not a token this service issued")]) from None
