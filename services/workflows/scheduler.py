"""The DAG of one execution: which step runs when.

Steps whose dependencies have succeeded run at once, at most max_parallel at a time;
a step after a skipped one, or after a condition that came out false, is skipped; the
first step that fails ends the execution, and the steps still running are cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Literal

from devops_hub.v1.workflows_pb2 import Execution, Step, StepRun, Workflow

from services.workflows.progress import ExecutionProgress
from services.workflows.statuses import FINAL_STEP
from services.workflows.steps import Context, StepRunner


class DagScheduler:
    def __init__(self, steps: StepRunner, progress: ExecutionProgress, *, max_parallel: int) -> None:
        self._steps = steps
        self._progress = progress
        self._max_parallel = max_parallel

    async def schedule(
        self, execution: Execution, workflow: Workflow, runs: Mapping[str, StepRun], context: Context
    ) -> tuple[Execution.Status, str]:
        """Runs the steps in dependency order; the execution's outcome and its error."""
        steps = {step.id: step for step in workflow.steps}
        pending = [step.id for step in workflow.steps]
        running: dict[asyncio.Task[None], str] = {}
        gate = asyncio.Semaphore(self._max_parallel)
        try:
            while pending or running:
                for step_id in list(pending):
                    verdict = _readiness(steps[step_id], steps, runs, context)
                    if verdict == "wait":
                        continue
                    pending.remove(step_id)
                    if verdict == "skip":
                        runs[step_id].status = StepRun.SKIPPED
                        await self._progress.save(execution, "step.skipped", {"step_id": step_id}, step_id)
                    else:
                        running[asyncio.create_task(self._steps.run(execution, steps[step_id], runs[step_id], context, gate))] = step_id
                if not running:
                    break
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    step_id = running.pop(task)
                    run = runs[step_id]
                    if run.status != StepRun.SUCCEEDED:
                        status = Execution.TIMED_OUT if run.status == StepRun.TIMED_OUT else Execution.FAILED
                        return status, f"step {step_id!r} {StepRun.Status.Name(run.status).lower()}: {run.error}"
            return Execution.SUCCEEDED, ""
        finally:
            # Fail fast, time-outs and cancels all end here: nothing is left running.
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)


def _readiness(step: Step, steps: Mapping[str, Step], runs: Mapping[str, StepRun], context: Context) -> Literal["run", "skip", "wait"]:
    """"run", "skip" (a dependency was skipped or its condition is false) or "wait"."""
    for dependency in step.depends_on:
        run = runs[dependency]
        if run.status == StepRun.SKIPPED:
            return "skip"
        if run.status != StepRun.SUCCEEDED:
            return "wait"
        if steps[dependency].type == Step.CONDITIONAL and not context["steps"][dependency].get("value"):
            return "skip"
    return "run"


def end_unfinished(runs: Mapping[str, StepRun], status: StepRun.Status) -> None:
    """Gives every step not yet final its end: `status` for one that was running (its
    end time is now), CANCELLED for one that never started."""
    for run in runs.values():
        if run.status not in FINAL_STEP:
            was_running = run.status == StepRun.RUNNING
            run.status = status if was_running else StepRun.CANCELLED
            if was_running:
                run.end_time.GetCurrentTime()
