"""The workflow engine's Prometheus metrics: executions and steps that ended, made on
the process's registry by server.py (their meaning: docs/observability.md)."""

from __future__ import annotations

from devops_hub.v1.workflows_pb2 import Execution, Step, StepRun
from google.protobuf.descriptor import EnumDescriptor
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.workflows.statuses import FINAL_EXECUTION, FINAL_STEP

# Workflow executions run from milliseconds (transforms) to their one-hour default limit.
WORKFLOW_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


def enum_label(enum: EnumDescriptor, number: int) -> str:
    value = enum.values_by_number.get(number)
    return value.name.lower() if value is not None else "unknown"


class WorkflowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._executions = Counter(
            "devops_hub_workflow_executions", "Workflow executions that ended, by final status.", ["status"], registry=registry
        )
        self._execution_seconds = Histogram(
            "devops_hub_workflow_execution_duration_seconds", "Time from an execution's start to its end, by final status.",
            ["status"], buckets=WORKFLOW_BUCKETS, registry=registry,
        )
        self._steps = Counter(
            "devops_hub_workflow_steps", "Workflow steps that ended, by step type and final status.", ["type", "status"], registry=registry
        )
        self._step_seconds = Histogram(
            "devops_hub_workflow_step_duration_seconds", "Time from a step's start to its end (all attempts), by step type and final status.",
            ["type", "status"], buckets=WORKFLOW_BUCKETS, registry=registry,
        )

    def declare(self) -> None:
        """Exports every final status (and step type) at zero before the first
        execution ends, so the dashboard's panels have series from the start."""
        for status in FINAL_EXECUTION:
            label = enum_label(Execution.Status.DESCRIPTOR, status)
            self._executions.labels(label)
            self._execution_seconds.labels(label)
        for kind in set(Step.Type.values()) - {Step.TYPE_UNSPECIFIED}:
            for step_status in FINAL_STEP:
                labels = (enum_label(Step.Type.DESCRIPTOR, kind), enum_label(StepRun.Status.DESCRIPTOR, step_status))
                self._steps.labels(*labels)
                self._step_seconds.labels(*labels)

    def execution_ended(self, execution: Execution) -> None:
        _count(self._executions, self._execution_seconds, execution, enum_label(Execution.Status.DESCRIPTOR, execution.status))

    def step_ended(self, step: Step, run: StepRun) -> None:
        labels = (enum_label(Step.Type.DESCRIPTOR, step.type), enum_label(StepRun.Status.DESCRIPTOR, run.status))
        _count(self._steps, self._step_seconds, run, *labels)


def _count(ended: Counter, seconds: Histogram, run: Execution | StepRun, *labels: str) -> None:
    ended.labels(*labels).inc()
    start, end = run.start_time, run.end_time
    if start.seconds or start.nanos:
        seconds.labels(*labels).observe(max(0.0, (end.ToNanoseconds() - start.ToNanoseconds()) / 1e9))
