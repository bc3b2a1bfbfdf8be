"""Runs workflow executions, one asyncio task each: takes them in, cancels them, and
keeps them owned; a graceful stop fails the local ones with a reason. The parts that
do the work, one job each, are listed in docs/design.md, "Layout"."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from devops_hub.client import Client
from devops_hub.v1.workflows_pb2 import Execution, StepRun, Workflow
from google.protobuf import json_format

from services.common.foundation.background import spawn
from services.common.foundation.clock import utc_now
from services.common.runtime import idempotency
from services.common.usecases.events import EventWriter
from services.workflows.cancellation import BY_REQUEST, PROCESS_STOPPING, LocalExecutions
from services.workflows.leases import Leases
from services.workflows.metrics import WorkflowMetrics
from services.workflows.progress import ExecutionProgress
from services.workflows.repository import ExecutionRepository
from services.workflows.runner import ExecutionRunner
from services.workflows.scheduler import DagScheduler
from services.workflows.statuses import execution_event
from services.workflows.steps import StepActions, StepRunner


class Engine:
    def __init__(
        self, executions: ExecutionRepository, agents: Client, events: EventWriter, metrics: WorkflowMetrics, *, max_parallel: int, lease_ttl: float
    ) -> None:
        # The parts are built here, not in server.py: they share one LocalExecutions
        # and one ExecutionProgress, and nothing outside the engine calls them.
        # At least one: a gate of zero would let no step (and no item) run.
        max_parallel = max(1, max_parallel)
        self._executions = executions
        self._metrics = metrics
        self._local = LocalExecutions()
        self._progress = ExecutionProgress(executions, events, self._local)
        self._leases = Leases(executions, self._local, self._progress, metrics, ttl=lease_ttl)
        steps = StepRunner(StepActions(agents, max_parallel=max_parallel), self._progress)
        scheduler = DagScheduler(steps, self._progress, max_parallel=max_parallel)
        self._runner = ExecutionRunner(scheduler, self._progress, self._local, metrics)

    async def start(self) -> None:
        self._metrics.declare()
        await self._leases.start()

    async def stop(self) -> None:
        await self._leases.stop()
        for execution_id in self._local.ids():
            await self._local.stop(execution_id, PROCESS_STOPPING)

    async def submit(self, workflow: Workflow, input: Mapping[str, Any], idempotency_key: str) -> Execution:
        """Returns at once. A call whose request_id was used already never gets here (idempotency.py)."""
        execution = Execution(
            id=str(uuid.uuid4()),
            workflow_id=workflow.id,
            status=Execution.PENDING,
            idempotency_key=idempotency_key,
            steps=[StepRun(step_id=step.id, status=StepRun.PENDING) for step in workflow.steps],
        )
        json_format.ParseDict(dict(input), execution.input)
        async with self._executions.db.transaction() as tx:
            await idempotency.claim(tx)
            created = await self._executions.create(tx, execution, workflow, self._leases.owner, self._leases.expiry(), utc_now())
            await idempotency.answer(tx, created)
        self._progress.emit(created, "execution.pending", {"workflow_id": workflow.id})
        definition = Workflow()
        definition.CopyFrom(workflow)
        # Runs on after the request that submitted it: not in its context.
        self._local.track(created.id, spawn(self._runner.run(created, definition), name=f"execution-{created.id}"))
        return created

    async def cancel(self, execution_id: str) -> Execution | None:
        """Cancels an active execution; returns it as it ends, or None if it had ended."""
        if execution_id in self._local:
            await self._local.stop(execution_id, BY_REQUEST)
            return await self._executions.get(execution_id)
        # Not ours: end it in the database; its runner (if any) sees it within lease_ttl/3.
        ended = await self._executions.finish_if_active(execution_id, Execution.Status.Name(BY_REQUEST.status), BY_REQUEST.error, utc_now())
        if ended is not None:
            self._progress.emit(ended, execution_event(BY_REQUEST.status), {"error": BY_REQUEST.error})
        return ended
