"""One step of an execution: what an attempt does by the step's type (StepActions),
and the attempts themselves under the step's timeout and retry policy (StepRunner)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from devops_hub.client import Client
from devops_hub.errors import ApiError
from devops_hub.v1 import agents_pb2
from devops_hub.v1.runtime_pb2 import AgentResult
from devops_hub.v1.workflows_pb2 import Execution, Step, StepRun
from google.protobuf import duration_pb2, json_format

from services.workflows import references
from services.workflows.progress import ExecutionProgress
from services.workflows.statuses import step_event

log = logging.getLogger(__name__)


DEFAULT_STEP_TIMEOUT = 30.0
DEFAULT_BACKOFF = 1.0
DEFAULT_MULTIPLIER = 2.0
DEFAULT_MAX_BACKOFF = 30.0
MAX_PARALLEL_ITEMS = 1000

# gRPC codes after which another attempt may succeed.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL}

# What an execution has so far, {"input": ..., "steps": {step_id: output}}: what the
# references in a step's input ("$.steps.<id>.output...", references.py) resolve against.
Context = dict[str, Any]


class StepFailed(Exception):
    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def seconds(duration: duration_pb2.Duration, default: float) -> float:
    """A duration field in seconds; unset (or not positive) means `default`."""
    value = duration.seconds + duration.nanos / 1e9
    return value if value > 0 else default


class StepActions:
    def __init__(self, agents: Client, *, max_parallel: int) -> None:
        self._agents = agents
        self._max_parallel = max_parallel

    async def attempt(self, step: Step, context: Context, attempt: int, correlation_id: str, timeout: float) -> Any:
        try:
            if step.type == Step.CONDITIONAL:
                return {"value": bool(references.lookup(references.parse(step.condition), context))}
            if step.type == Step.PARALLEL:
                return await self._fan_out(step, context, attempt, correlation_id, timeout)
            input = references.resolve(json_format.MessageToDict(step.input), context)
            if step.type == Step.TRANSFORM:
                return input
            if step.type == Step.WAIT:
                await asyncio.sleep(seconds(step.duration, 0))
                return input
            return await self._call_agent(step, input, attempt, correlation_id, timeout)
        except references.UnresolvedReference as exc:
            raise StepFailed(str(exc), retryable=False) from None

    async def _fan_out(self, step: Step, context: Context, attempt: int, correlation_id: str, timeout: float) -> dict[str, Any]:
        """Runs the agent once per item, concurrently and bounded; outputs keep the items' order."""
        items = references.lookup(references.parse(step.for_each), context)
        if not isinstance(items, list):
            raise StepFailed(f"for_each {step.for_each} is not a list", retryable=False)
        if len(items) > MAX_PARALLEL_ITEMS:
            raise StepFailed(f"for_each yields {len(items)} items; at most {MAX_PARALLEL_ITEMS}", retryable=False)
        template = json_format.MessageToDict(step.input)
        gate = asyncio.Semaphore(self._max_parallel)

        async def one(item: Any) -> dict[str, Any]:
            async with gate:
                item_input = references.resolve(template, {**context, "item": item})
                return await self._call_agent(step, item_input, attempt, correlation_id, timeout)

        try:
            # A failed item cancels its siblings: the step has failed already.
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(item)) for item in items]
        except BaseExceptionGroup as failures:
            raise failures.exceptions[0] from None
        return {"items": [task.result() for task in tasks]}

    async def _call_agent(self, step: Step, input: dict[str, Any], attempt: int, correlation_id: str, timeout: float) -> dict[str, Any]:
        request = agents_pb2.ExecuteAgentRequest(
            id=step.agent_id, capability=step.capability, attempt=attempt, correlation_id=correlation_id
        )
        json_format.ParseDict(input, request.input)
        request.timeout.FromNanoseconds(int(timeout * 1e9))
        try:
            result = await self._agents.execute_agent(request, timeout=timeout + 1)
        except ApiError as exc:
            if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError() from None
            raise StepFailed(str(exc), retryable=exc.code in _RETRYABLE) from None
        if result.outcome == AgentResult.SUCCEEDED:
            return json_format.MessageToDict(result.output)
        if result.outcome == AgentResult.TIMED_OUT:
            raise TimeoutError()
        raise StepFailed(result.error or "the agent failed", retryable=True)


class StepRunner:
    """Each transition is saved as it happens."""

    def __init__(self, actions: StepActions, progress: ExecutionProgress) -> None:
        self._actions = actions
        self._progress = progress

    async def run(self, execution: Execution, step: Step, run: StepRun, context: Context, gate: asyncio.Semaphore) -> None:
        async with gate:
            run.status = StepRun.RUNNING
            run.start_time.GetCurrentTime()
            await self._progress.save(execution, "step.running", {"step_id": step.id}, step.id)
            timeout = seconds(step.timeout, DEFAULT_STEP_TIMEOUT)
            attempts = max(1, step.retry.max_attempts or 1)
            backoff = seconds(step.retry.initial_backoff, DEFAULT_BACKOFF)
            status, error = StepRun.FAILED, ""
            try:
                for attempt in range(1, attempts + 1):
                    run.attempts = attempt
                    try:
                        async with asyncio.timeout(timeout):
                            output = await self._actions.attempt(step, context, attempt, execution.id, timeout)
                        json_format.ParseDict(output if isinstance(output, dict) else {"value": output}, run.output)
                    except TimeoutError:  # the step's deadline here, or the agent's
                        status, error, retryable = StepRun.TIMED_OUT, f"attempt {attempt} ran past {timeout:g}s", True
                    except StepFailed as exc:
                        status, error, retryable = StepRun.FAILED, str(exc), exc.retryable
                    except Exception as exc:  # noqa: BLE001 - recorded on the step, not lost with its task
                        log.exception("step %r of execution %s failed unexpectedly", step.id, execution.id)
                        run.ClearField("output")
                        status, error, retryable = StepRun.FAILED, f"the step failed unexpectedly: {exc}", False
                    else:
                        context["steps"][step.id] = output
                        status, error = StepRun.SUCCEEDED, ""
                        break
                    if not retryable or attempt == attempts:
                        break
                    run.error = error
                    await self._progress.save(
                        execution, "step.retrying", {"step_id": step.id, "attempt": attempt, "error": error}, step.id
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * (step.retry.multiplier or DEFAULT_MULTIPLIER), seconds(step.retry.max_backoff, DEFAULT_MAX_BACKOFF))
            except asyncio.CancelledError:
                run.status = StepRun.CANCELLED
                run.end_time.GetCurrentTime()
                raise
            run.status, run.error = status, error
            run.end_time.GetCurrentTime()
            data: dict[str, Any] = {"step_id": step.id, "attempts": run.attempts}
            if error:
                data["error"] = error
            await self._progress.save(execution, step_event(status), data, step.id)
