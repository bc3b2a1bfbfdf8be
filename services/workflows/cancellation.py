"""The executions this process runs, and how one of them is stopped with a reason.

An execution runs as one asyncio task. Cancelling the task is how it is stopped,
whatever the cause (a cancel request, another replica's cancel or reap, the process
stopping); the task learns *why* from the Stop recorded before the cancel, and ends
the execution with that status and error (runner.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from devops_hub.v1.workflows_pb2 import Execution

from services.common.foundation.background import cancel_and_wait


@dataclass(frozen=True)
class Stop:
    status: Execution.Status
    error: str


BY_REQUEST = Stop(Execution.CANCELLED, "cancelled by request")
PROCESS_STOPPING = Stop(Execution.FAILED, "the workflows service stopped while this execution ran")
# A cancel that came with no recorded reason (none of ours does).
UNEXPLAINED = Stop(Execution.CANCELLED, "cancelled")


class LocalExecutions:
    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stops: dict[str, Stop] = {}

    def __contains__(self, execution_id: str) -> bool:
        return execution_id in self._tasks

    def ids(self) -> list[str]:
        return list(self._tasks)

    def track(self, execution_id: str, task: asyncio.Task[None]) -> None:
        """Holds the execution's task until it ends."""
        self._tasks[execution_id] = task
        task.add_done_callback(lambda _task: self._tasks.pop(execution_id, None))

    async def stop(self, execution_id: str, stop: Stop) -> None:
        """Cancels the execution with this reason and waits until it has saved its end."""
        task = self._tasks.get(execution_id)
        if task is None:
            return
        self._stops[execution_id] = stop
        await cancel_and_wait(task)

    def abandon(self, execution_id: str) -> None:
        """Stops working on an execution that ended elsewhere (cancelled or reaped by
        another replica), unless it is being stopped already. Does not wait: the
        execution's own task may be the caller."""
        task = self._tasks.get(execution_id)
        if task is not None and execution_id not in self._stops:
            self._stops[execution_id] = BY_REQUEST
            task.cancel()

    def reason(self, execution_id: str) -> Stop:
        """Why the execution's task was cancelled; asked once, by the task itself."""
        return self._stops.pop(execution_id, UNEXPLAINED)
