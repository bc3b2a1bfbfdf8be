"""An execution's progress: each transition saved, then emitted as an event.

Saving comes first so that a reader who sees an event finds the row at least that far
along; events of one execution are emitted in the order its transitions were saved.
"""

from __future__ import annotations

from typing import Any

from devops_hub.v1.workflows_pb2 import Execution

from services.common.usecases.events import EventWriter
from services.workflows.cancellation import LocalExecutions
from services.workflows.repository import ExecutionRepository


class ExecutionProgress:
    def __init__(self, repository: ExecutionRepository, events: EventWriter, local: LocalExecutions) -> None:
        self._repository = repository
        self._events = events
        self._local = local

    async def save(self, execution: Execution, event: str, data: dict[str, Any], subject: str = "") -> bool:
        """Saves the execution and emits the transition; False if it ended elsewhere."""
        saved = await self._repository.save(execution)
        if saved:
            self.emit(execution, event, data, subject)
        else:
            # Cancelled or reaped by someone else: stop working on it.
            self._local.abandon(execution.id)
        return saved

    def emit(self, execution: Execution, event: str, data: dict[str, Any], subject: str = "") -> None:
        """An event about the execution (or one of its steps: `subject`), correlated to it."""
        self._events.emit(event, subject or execution.id, {"execution_id": execution.id, **data}, correlation_id=execution.id)
