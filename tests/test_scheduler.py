"""The DAG scheduler (services/workflows/scheduler.py) on its own: a fake step runner
whose steps take a scripted time on a fake clock, so that which step starts when, how
many run at once, and what a failure or a false condition does are exact, in
milliseconds and with no services. The real StepRunner is tested through the
services in test_workflows.py."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass

import pytest
from devops_hub.v1 import workflows_pb2

from services.workflows.scheduler import DagScheduler, end_unfinished

pytestmark = pytest.mark.fast

Execution = workflows_pb2.Execution
Step = workflows_pb2.Step
StepRun = workflows_pb2.StepRun
Workflow = workflows_pb2.Workflow

# Enough turns of the loop for every task the last tick woke to run until it waits on
# the clock again: a finished step wakes the scheduler, which starts the next ones,
# each of which takes the gate and sleeps; a handful of turns each.
SETTLE_TURNS = 50


class FakeClock:
    """Time that moves only when every task waits on it: `drive` runs a coroutine to its
    end, jumping from one timer to the next."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now + seconds, next(self._order), future))
        await future

    async def drive(self, coroutine):
        task = asyncio.get_running_loop().create_task(coroutine)
        while True:
            for _ in range(SETTLE_TURNS):
                await asyncio.sleep(0)
            if task.done():
                return task.result()
            live = [timer for timer in self._timers if not timer[2].done()]
            assert live, "the schedule waits on nothing: it would hang"
            self._timers = live
            heapq.heapify(self._timers)
            self.now, _, future = heapq.heappop(self._timers)
            future.set_result(None)


@dataclass
class Script:
    """What a step does when run: take `duration`, then end with `status`; a
    conditional step's output is {"value": value}."""

    duration: float = 1.0
    status: StepRun.Status = StepRun.SUCCEEDED
    value: bool = True


class FakeStepRunner:
    """StepRunner's contract (services/workflows/steps.py), minus the agent: takes the
    gate, is RUNNING, sleeps its scripted time on the clock, then records its output in
    the context and its final status, or CANCELLED when cancelled."""

    def __init__(self, clock: FakeClock, scripts: dict[str, Script]) -> None:
        self.clock = clock
        self.scripts = scripts
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.cancelled: dict[str, float] = {}
        self.running = 0
        self.most_at_once = 0

    async def run(self, execution, step, run, context, gate) -> None:
        script = self.scripts.get(step.id, Script())
        async with gate:
            self.started[step.id] = self.clock.now
            run.status = StepRun.RUNNING
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            try:
                await self.clock.sleep(script.duration)
            except asyncio.CancelledError:
                run.status = StepRun.CANCELLED
                self.cancelled[step.id] = self.clock.now
                raise
            finally:
                self.running -= 1
            self.ended[step.id] = self.clock.now
            if script.status == StepRun.SUCCEEDED:
                context["steps"][step.id] = {"value": script.value} if step.type == Step.CONDITIONAL else {"ran": step.id}
            else:
                run.error = "boom"
            run.status = script.status


class FakeProgress:
    """ExecutionProgress without the repository: the transitions, in order."""

    def __init__(self) -> None:
        self.saved: list[tuple[str, str]] = []

    async def save(self, execution, event, data, subject="") -> bool:
        self.saved.append((event, subject))
        return True


def workflow(*steps: tuple[str, list[str]] | tuple[str, list[str], Step.Type]) -> Workflow:
    """Steps as (id, depends_on[, type]); AGENT unless said."""
    return Workflow(
        id="wf",
        steps=[Step(id=s[0], depends_on=s[1], type=s[2] if len(s) > 2 else Step.AGENT, agent_id="a", capability="c") for s in steps],
    )


async def schedule(flow: Workflow, scripts: dict[str, Script] | None = None, *, max_parallel: int = 10):
    """Runs the flow's DAG on the fakes: (outcome, runs, the step runner, the progress)."""
    clock = FakeClock()
    steps = FakeStepRunner(clock, scripts or {})
    progress = FakeProgress()
    scheduler = DagScheduler(steps, progress, max_parallel=max_parallel)
    execution = Execution(id="ex", steps=[StepRun(step_id=s.id, status=StepRun.PENDING) for s in flow.steps])
    runs = {run.step_id: run for run in execution.steps}
    outcome = await clock.drive(scheduler.schedule(execution, flow, runs, {"input": {}, "steps": {}}))
    return outcome, runs, steps, progress


def statuses(runs: dict[str, StepRun]) -> dict[str, str]:
    return {step_id: StepRun.Status.Name(run.status) for step_id, run in runs.items()}


async def test_a_step_starts_when_its_last_dependency_succeeds_and_not_before():
    flow = workflow(("a", []), ("b", ["a"]), ("c", ["a"]), ("d", ["b", "c"]), ("e", []))
    scripts = {"a": Script(2), "b": Script(5), "c": Script(3), "d": Script(1), "e": Script(4)}
    outcome, runs, steps, _ = await schedule(flow, scripts)
    assert outcome == (Execution.SUCCEEDED, "")
    # Roots at once; b and c when a ends; d when the later of b and c ends.
    assert steps.started == {"a": 0, "e": 0, "b": 2, "c": 2, "d": 7}
    assert set(statuses(runs).values()) == {"SUCCEEDED"}


async def test_at_most_max_parallel_steps_run_at_once_and_the_others_queue_in_order():
    flow = workflow(*[(f"s{i}", []) for i in range(5)])
    outcome, _, steps, _ = await schedule(flow, {f"s{i}": Script(10) for i in range(5)}, max_parallel=2)
    assert outcome == (Execution.SUCCEEDED, "")
    assert steps.most_at_once == 2
    assert steps.started == {"s0": 0, "s1": 0, "s2": 10, "s3": 10, "s4": 20}


async def test_the_first_failed_step_ends_the_execution_and_cancels_the_running_ones():
    flow = workflow(("slow", []), ("bad", []), ("after_bad", ["bad"]), ("after_slow", ["slow"]))
    scripts = {"slow": Script(100), "bad": Script(3, StepRun.FAILED)}
    outcome, runs, steps, _ = await schedule(flow, scripts)
    assert outcome == (Execution.FAILED, "step 'bad' failed: boom")
    # Cancelled the moment bad failed, and awaited before schedule() returned.
    assert steps.cancelled == {"slow": 3}
    assert steps.running == 0
    assert "after_bad" not in steps.started and "after_slow" not in steps.started
    assert statuses(runs) == {"slow": "CANCELLED", "bad": "FAILED", "after_bad": "PENDING", "after_slow": "PENDING"}


async def test_a_timed_out_step_times_out_the_execution():
    outcome, _, _, _ = await schedule(workflow(("a", []), ("b", ["a"])), {"a": Script(1, StepRun.TIMED_OUT)})
    assert outcome == (Execution.TIMED_OUT, "step 'a' timed_out: boom")


async def test_a_false_condition_skips_its_dependents_and_theirs_and_nothing_else():
    flow = workflow(
        ("check", [], Step.CONDITIONAL),
        ("then", ["check"]),
        ("after_then", ["then"]),
        ("other", []),
        ("join", ["other", "after_then"]),
    )
    outcome, runs, steps, progress = await schedule(flow, {"check": Script(1, value=False)})
    assert outcome == (Execution.SUCCEEDED, "")
    assert statuses(runs) == {"check": "SUCCEEDED", "then": "SKIPPED", "after_then": "SKIPPED", "other": "SUCCEEDED", "join": "SKIPPED"}
    assert set(steps.started) == {"check", "other"}
    # Each skip is saved and emitted, in dependency order.
    assert [subject for event, subject in progress.saved if event == "step.skipped"] == ["then", "after_then", "join"]


async def test_a_true_condition_lets_its_dependents_run():
    flow = workflow(("check", [], Step.CONDITIONAL), ("then", ["check"]))
    outcome, runs, steps, progress = await schedule(flow, {"check": Script(1, value=True)})
    assert outcome == (Execution.SUCCEEDED, "")
    assert steps.started == {"check": 0, "then": 1}
    assert not [event for event, _ in progress.saved if event == "step.skipped"]


async def test_cancelling_the_schedule_cancels_and_awaits_every_running_step():
    clock = FakeClock()
    steps = FakeStepRunner(clock, {"a": Script(50), "b": Script(50)})
    flow = workflow(("a", []), ("b", []), ("c", ["a"]))
    execution = Execution(id="ex", steps=[StepRun(step_id=s.id, status=StepRun.PENDING) for s in flow.steps])
    runs = {run.step_id: run for run in execution.steps}
    scheduler = DagScheduler(steps, FakeProgress(), max_parallel=10)
    task = asyncio.create_task(scheduler.schedule(execution, flow, runs, {"input": {}, "steps": {}}))
    while len(steps.started) < 2:
        await asyncio.sleep(0)
    task.cancel()
    # Bounded: a step left running would hold schedule() forever (nothing moves the clock here).
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert set(steps.cancelled) == {"a", "b"} and steps.running == 0
    assert statuses(runs) == {"a": "CANCELLED", "b": "CANCELLED", "c": "PENDING"}


def test_end_unfinished_ends_running_steps_with_the_status_and_unstarted_ones_as_cancelled():
    runs = {
        "done": StepRun(step_id="done", status=StepRun.SUCCEEDED),
        "skipped": StepRun(step_id="skipped", status=StepRun.SKIPPED),
        "running": StepRun(step_id="running", status=StepRun.RUNNING),
        "pending": StepRun(step_id="pending", status=StepRun.PENDING),
    }
    end_unfinished(runs, StepRun.TIMED_OUT)
    assert statuses(runs) == {"done": "SUCCEEDED", "skipped": "SKIPPED", "running": "TIMED_OUT", "pending": "CANCELLED"}
    # Only the step that was running gets an end time: the others either have theirs or never started.
    assert runs["running"].HasField("end_time") and not runs["pending"].HasField("end_time")
