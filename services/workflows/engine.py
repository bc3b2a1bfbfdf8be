"""Runs workflow executions: a DAG scheduler with deadlines, retries and cancellation.

One asyncio task per execution. Steps whose dependencies have succeeded run at once,
at most WORKFLOW_MAX_PARALLEL at a time per execution; a step that fails ends the
execution (the steps still running are cancelled). Every transition is saved and
emitted as an event, in order.

Executions outlive no process silently: the engine holds a lease on each execution
it runs and renews all of them in one statement every lease_ttl/3; any replica's
maintenance loop fails the executions whose lease ran out (their runner died), and
a graceful stop fails the local ones with a reason. Cancels written by another
replica are picked up by the same loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from devops_hub.v1 import agents_pb2, agents_pb2_grpc, runtime_pb2, workflows_pb2
from google.protobuf import duration_pb2, json_format

from services.common.background import spawn
from services.common.clock import utc_now
from services.common.errors import Aborted, Unavailable
from services.common.events import EventWriter
from services.common.telemetry.metrics import enum_label, service_metrics
from services.workflows import references
from services.workflows.repository import ExecutionRepository

Workflow = workflows_pb2.Workflow
Step = workflows_pb2.Step
Execution = workflows_pb2.Execution
StepRun = workflows_pb2.StepRun
AgentResult = runtime_pb2.AgentResult

DEFAULT_STEP_TIMEOUT = 30.0
DEFAULT_WORKFLOW_TIMEOUT = 3600.0
DEFAULT_BACKOFF = 1.0
DEFAULT_MULTIPLIER = 2.0
DEFAULT_MAX_BACKOFF = 30.0
MAX_PARALLEL_ITEMS = 1000

# gRPC codes after which another attempt may succeed.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL}
_FINAL_STEP = {StepRun.SUCCEEDED, StepRun.FAILED, StepRun.SKIPPED, StepRun.CANCELLED, StepRun.TIMED_OUT}
_FINAL_EXECUTION = {Execution.SUCCEEDED, Execution.FAILED, Execution.CANCELLED, Execution.TIMED_OUT}


class StepFailed(Exception):
    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class StepTimedOut(Exception):
    """An attempt ran past its deadline."""


@dataclass(frozen=True)
class _Stop:
    """Why a running execution is being cancelled: its final status and error."""

    status: Execution.Status
    error: str


def seconds(duration: duration_pb2.Duration, default: float) -> float:
    value = duration.seconds + duration.nanos / 1e9
    return value if value > 0 else default


class Engine:
    def __init__(
        self,
        executions: ExecutionRepository,
        agents: agents_pb2_grpc.AgentsServiceStub,
        events: EventWriter,
        *,
        max_parallel: int,
        lease_ttl: float,
    ) -> None:
        self._executions = executions
        self._agents = agents
        self._events = events
        self._max_parallel = max(1, max_parallel)
        self._lease_ttl = lease_ttl
        self.owner = uuid.uuid4().hex
        self._tasks: dict[str, asyncio.Task] = {}
        self._stops: dict[str, _Stop] = {}
        self._maintenance: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        service_metrics().workflows.declare(
            [enum_label(Execution.Status.DESCRIPTOR, status) for status in _FINAL_EXECUTION],
            [enum_label(Step.Type.DESCRIPTOR, kind) for kind in Step.Type.values() if kind != Step.TYPE_UNSPECIFIED],
            [enum_label(StepRun.Status.DESCRIPTOR, status) for status in _FINAL_STEP],
        )
        try:
            await self._reap()
        except Exception:  # noqa: BLE001 - the maintenance loop tries again shortly
            logging.getLogger(__name__).exception("failing executions left by a stopped process failed; will retry")
        self._maintenance = spawn(self._maintain(), name="engine-maintenance", essential=True)

    async def stop(self) -> None:
        """Fails what this process still runs, with the reason, before it exits."""
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
        for execution_id in list(self._tasks):
            await self._cancel_local(execution_id, _Stop(Execution.FAILED, "the workflows service stopped while this execution ran"))

    # -- submitting and cancelling -------------------------------------------------

    async def submit(self, workflow: Workflow, input: Mapping[str, Any], idempotency_key: str) -> Execution:
        """Stores a PENDING execution and starts running it; returns it at once."""
        if idempotency_key:
            existing = await self._executions.by_idempotency_key(workflow.id, idempotency_key)
            if existing is not None:
                return existing
        execution = Execution(
            id=str(uuid.uuid4()),
            workflow_id=workflow.id,
            status=Execution.PENDING,
            idempotency_key=idempotency_key,
            steps=[StepRun(step_id=step.id, status=StepRun.PENDING) for step in workflow.steps],
        )
        json_format.ParseDict(dict(input), execution.input)
        created = await self._executions.create(
            execution, workflow, self.owner, utc_now() + dt.timedelta(seconds=self._lease_ttl), utc_now()
        )
        if created is None:
            # The same key raced in through another request: that one is the execution.
            existing = await self._executions.by_idempotency_key(workflow.id, idempotency_key)
            if existing is None:
                raise Aborted("another request with this idempotency key is being stored; retry", reason="IDEMPOTENCY_RACE")
            return existing
        self._emit(created, "execution.pending", {"workflow_id": workflow.id})
        definition = Workflow()
        definition.CopyFrom(workflow)
        # Runs on after the request that submitted it: not in its context.
        task = spawn(self._run(created, definition), name=f"execution-{created.id}")
        self._tasks[created.id] = task
        execution_id = created.id
        task.add_done_callback(lambda _task: self._tasks.pop(execution_id, None))
        return created

    async def cancel(self, execution_id: str) -> Execution | None:
        """Cancels an active execution; returns it as it ends, or None if it had ended."""
        stop = _Stop(Execution.CANCELLED, "cancelled by request")
        if execution_id in self._tasks:
            await self._cancel_local(execution_id, stop)
            return await self._executions.get(execution_id)
        # Not ours: end it in the database; its runner (if any) sees it within lease_ttl/3.
        ended = await self._executions.finish_if_active(execution_id, "CANCELLED", stop.error, utc_now())
        if ended is not None:
            self._emit(ended, "execution.cancelled", {"error": stop.error})
        return ended

    async def _cancel_local(self, execution_id: str, stop: _Stop) -> None:
        task = self._tasks.get(execution_id)
        if task is None:
            return
        self._stops[execution_id] = stop
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # -- maintenance -------------------------------------------------------------------

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ttl / 3)
            try:
                await self._executions.renew_leases(self.owner, utc_now() + dt.timedelta(seconds=self._lease_ttl))
                for execution_id in await self._executions.cancelled_among(list(self._tasks)):
                    await self._cancel_local(execution_id, _Stop(Execution.CANCELLED, "cancelled by request"))
                await self._reap()
            except Exception as exc:  # noqa: BLE001 - try again next round
                # A database that is away was logged once, by services.common.outages.
                if not isinstance(exc, Unavailable):
                    logging.getLogger(__name__).exception("execution maintenance failed")

    async def _reap(self) -> None:
        reason = "the service running this execution stopped (its lease expired)"
        for execution in await self._executions.reap_expired(utc_now(), reason):
            service_metrics().workflows.execution_ended(execution)
            self._emit(execution, "execution.failed", {"error": reason})

    # -- running -------------------------------------------------------------------------

    async def _run(self, execution: Execution, workflow: Workflow) -> None:
        execution.status = Execution.RUNNING
        execution.start_time.GetCurrentTime()
        if not await self._save(execution, "execution.running", {}):
            return
        runs = {run.step_id: run for run in execution.steps}
        context: dict[str, Any] = {"input": json_format.MessageToDict(execution.input), "steps": {}}
        outcome: tuple[Execution.Status, str]
        try:
            async with asyncio.timeout(seconds(workflow.timeout, DEFAULT_WORKFLOW_TIMEOUT)):
                outcome = await self._schedule(execution, workflow, runs, context)
            # After a failure, the steps that never started will not run.
            self._end_unfinished(execution, runs, StepRun.CANCELLED)
        except TimeoutError:
            outcome = (Execution.TIMED_OUT, f"the workflow ran past its timeout of {seconds(workflow.timeout, DEFAULT_WORKFLOW_TIMEOUT):g}s")
            self._end_unfinished(execution, runs, StepRun.TIMED_OUT)
        except asyncio.CancelledError:
            stop = self._stops.pop(execution.id, _Stop(Execution.CANCELLED, "cancelled"))
            outcome = (stop.status, stop.error)
            self._end_unfinished(execution, runs, StepRun.CANCELLED)
        execution.status, execution.error = outcome
        for step_id, output in context["steps"].items():
            execution.output.get_or_create_struct(step_id).update(output if isinstance(output, dict) else {"value": output})
        execution.end_time.GetCurrentTime()
        # Every step is final now too (_end_unfinished): count them all, once.
        metrics = service_metrics().workflows
        metrics.execution_ended(execution)
        for step in workflow.steps:
            metrics.step_ended(step, runs[step.id])
        kind = Execution.Status.Name(execution.status).lower()
        await self._save(execution, f"execution.{kind}", {"error": execution.error} if execution.error else {})

    async def _schedule(self, execution: Execution, workflow: Workflow, runs: dict[str, StepRun], context: dict) -> tuple[Execution.Status, str]:
        steps = {step.id: step for step in workflow.steps}
        pending = [step.id for step in workflow.steps]
        running: dict[asyncio.Task, str] = {}
        gate = asyncio.Semaphore(self._max_parallel)
        try:
            while pending or running:
                for step_id in list(pending):
                    verdict = self._readiness(steps[step_id], steps, runs, context)
                    if verdict == "wait":
                        continue
                    pending.remove(step_id)
                    if verdict == "skip":
                        run = runs[step_id]
                        run.status = StepRun.SKIPPED
                        await self._save(execution, "step.skipped", {"step_id": step_id}, step_id)
                    else:
                        task = asyncio.get_running_loop().create_task(
                            self._run_step(execution, steps[step_id], runs[step_id], context, gate)
                        )
                        running[task] = step_id
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

    def _readiness(self, step: Step, steps: Mapping[str, Step], runs: Mapping[str, StepRun], context: dict) -> str:
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

    async def _run_step(self, execution: Execution, step: Step, run: StepRun, context: dict, gate: asyncio.Semaphore) -> None:
        async with gate:
            run.status = StepRun.RUNNING
            run.start_time.GetCurrentTime()
            await self._save(execution, "step.running", {"step_id": step.id}, step.id)
            timeout = seconds(step.timeout, DEFAULT_STEP_TIMEOUT)
            attempts = max(1, step.retry.max_attempts or 1)
            backoff = seconds(step.retry.initial_backoff, DEFAULT_BACKOFF)
            status, error = StepRun.FAILED, ""
            try:
                for attempt in range(1, attempts + 1):
                    run.attempts = attempt
                    try:
                        async with asyncio.timeout(timeout):
                            output = await self._attempt(step, context, attempt, execution.id, timeout)
                    except (TimeoutError, StepTimedOut):
                        status, error, retryable = StepRun.TIMED_OUT, f"attempt {attempt} ran past {timeout:g}s", True
                    except StepFailed as exc:
                        status, error, retryable = StepRun.FAILED, str(exc), exc.retryable
                    else:
                        context["steps"][step.id] = output
                        json_format.ParseDict(output if isinstance(output, dict) else {"value": output}, run.output)
                        status, error = StepRun.SUCCEEDED, ""
                        break
                    if not retryable or attempt == attempts:
                        break
                    run.error = error
                    await self._save(execution, "step.retrying", {"step_id": step.id, "attempt": attempt, "error": error}, step.id)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * (step.retry.multiplier or DEFAULT_MULTIPLIER), seconds(step.retry.max_backoff, DEFAULT_MAX_BACKOFF))
            except asyncio.CancelledError:
                run.status = StepRun.CANCELLED
                run.end_time.GetCurrentTime()
                raise
            run.status, run.error = status, error
            run.end_time.GetCurrentTime()
            data = {"step_id": step.id, "attempts": run.attempts}
            if error:
                data["error"] = error
            await self._save(execution, f"step.{StepRun.Status.Name(status).lower()}", data, step.id)

    async def _attempt(self, step: Step, context: dict, attempt: int, correlation_id: str, timeout: float) -> Any:
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

    async def _fan_out(self, step: Step, context: dict, attempt: int, correlation_id: str, timeout: float) -> dict:
        """Runs the agent once per item, concurrently and bounded; outputs keep the items' order."""
        items = references.lookup(references.parse(step.for_each), context)
        if not isinstance(items, list):
            raise StepFailed(f"for_each {step.for_each} is not a list", retryable=False)
        if len(items) > MAX_PARALLEL_ITEMS:
            raise StepFailed(f"for_each yields {len(items)} items; at most {MAX_PARALLEL_ITEMS}", retryable=False)
        template = json_format.MessageToDict(step.input)
        gate = asyncio.Semaphore(self._max_parallel)

        async def one(item: Any) -> dict:
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

    async def _call_agent(self, step: Step, input: dict, attempt: int, correlation_id: str, timeout: float) -> dict:
        request = agents_pb2.ExecuteAgentRequest(
            id=step.agent_id, capability=step.capability, attempt=attempt, correlation_id=correlation_id
        )
        json_format.ParseDict(input, request.input)
        request.timeout.FromNanoseconds(int(timeout * 1e9))
        try:
            result = await self._agents.ExecuteAgent(request, timeout=timeout + 1)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise StepTimedOut() from None
            raise StepFailed(f"{exc.code().name}: {exc.details()}", retryable=exc.code() in _RETRYABLE) from None
        if result.outcome == AgentResult.SUCCEEDED:
            return json_format.MessageToDict(result.output)
        if result.outcome == AgentResult.TIMED_OUT:
            raise StepTimedOut()
        raise StepFailed(result.error or "the agent failed", retryable=True)

    def _end_unfinished(self, execution: Execution, runs: Mapping[str, StepRun], status: StepRun.Status) -> None:
        for run in runs.values():
            if run.status not in _FINAL_STEP:
                was_running = run.status == StepRun.RUNNING
                run.status = status if was_running else StepRun.CANCELLED
                if was_running:
                    run.end_time.GetCurrentTime()

    # -- persistence and events ----------------------------------------------------------

    async def _save(self, execution: Execution, event: str, data: dict, subject: str = "") -> bool:
        """Saves the execution and emits the transition; False if it ended elsewhere."""
        saved = await self._executions.save(execution)
        if saved:
            self._emit(execution, event, data, subject)
        elif execution.id in self._tasks and execution.id not in self._stops:
            # Cancelled or reaped by someone else: stop working on it.
            self._stops[execution.id] = _Stop(Execution.CANCELLED, "cancelled by request")
            self._tasks[execution.id].cancel()
        return saved

    def _emit(self, execution: Execution, event: str, data: dict, subject: str = "") -> None:
        self._events.emit(event, subject or execution.id, {"execution_id": execution.id, **data}, correlation_id=execution.id)
