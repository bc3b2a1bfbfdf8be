"""Which statuses of an execution and of a step are still moving and which are final.

Written once here because the runner, the lease reaper, the metrics, the watch stream
and the SQL (repository.py) must agree on them: an execution is active until its row
holds a final status, and nothing writes over a final status.
"""

from __future__ import annotations

from devops_hub.v1.workflows_pb2 import Execution, StepRun

ACTIVE_EXECUTION = frozenset({Execution.PENDING, Execution.RUNNING})
FINAL_EXECUTION = frozenset({Execution.SUCCEEDED, Execution.FAILED, Execution.CANCELLED, Execution.TIMED_OUT})
FINAL_STEP = frozenset({StepRun.SUCCEEDED, StepRun.FAILED, StepRun.SKIPPED, StepRun.CANCELLED, StepRun.TIMED_OUT})


def execution_event(status: Execution.Status) -> str:
    """The event type an execution emits on entering `status` ("execution.timed_out")."""
    return f"execution.{Execution.Status.Name(status).lower()}"


def step_event(status: StepRun.Status) -> str:
    """The event type a step emits on entering `status` ("step.succeeded")."""
    return f"step.{StepRun.Status.Name(status).lower()}"
