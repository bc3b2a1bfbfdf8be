"""One execution from start to end: RUNNING, its steps under the workflow's timeout,
then its final status, output and metrics, saved and emitted last.

However it ends (done, a failed step, the timeout, a cancel with its reason from
cancellation.py), every step is final before the execution's end is saved, so a
reader never sees an ended execution with a step still running.
"""

from __future__ import annotations

import asyncio

from devops_hub.v1.workflows_pb2 import Execution, StepRun, Workflow
from google.protobuf import json_format

from services.workflows.cancellation import LocalExecutions
from services.workflows.metrics import WorkflowMetrics
from services.workflows.progress import ExecutionProgress
from services.workflows.scheduler import DagScheduler, end_unfinished
from services.workflows.statuses import execution_event
from services.workflows.steps import Context, seconds

DEFAULT_WORKFLOW_TIMEOUT = 3600.0


class ExecutionRunner:
    def __init__(
        self, scheduler: DagScheduler, progress: ExecutionProgress, local: LocalExecutions, metrics: WorkflowMetrics
    ) -> None:
        self._scheduler = scheduler
        self._progress = progress
        self._local = local
        self._metrics = metrics

    async def run(self, execution: Execution, workflow: Workflow) -> None:
        execution.status = Execution.RUNNING
        execution.start_time.GetCurrentTime()
        if not await self._progress.save(execution, "execution.running", {}):
            return
        runs = {run.step_id: run for run in execution.steps}
        context: Context = {"input": json_format.MessageToDict(execution.input), "steps": {}}
        timeout = seconds(workflow.timeout, DEFAULT_WORKFLOW_TIMEOUT)
        outcome: tuple[Execution.Status, str]
        try:
            async with asyncio.timeout(timeout):
                outcome = await self._scheduler.schedule(execution, workflow, runs, context)
            # After a failure, the steps that never started will not run.
            end_unfinished(runs, StepRun.CANCELLED)
        except TimeoutError:
            outcome = (Execution.TIMED_OUT, f"the workflow ran past its timeout of {timeout:g}s")
            end_unfinished(runs, StepRun.TIMED_OUT)
        except asyncio.CancelledError:
            stop = self._local.reason(execution.id)
            outcome = (stop.status, stop.error)
            end_unfinished(runs, StepRun.CANCELLED)
        execution.status, execution.error = outcome
        for step_id, output in context["steps"].items():
            execution.output.get_or_create_struct(step_id).update(output if isinstance(output, dict) else {"value": output})
        execution.end_time.GetCurrentTime()
        # Every step is final now too (end_unfinished): count them all, once.
        self._metrics.execution_ended(execution)
        for step in workflow.steps:
            self._metrics.step_ended(step, runs[step.id])
        await self._progress.save(execution, execution_event(execution.status), {"error": execution.error} if execution.error else {})
