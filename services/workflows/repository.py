"""All SQL about workflows and their executions.

Definition writes run in the transaction they are given (the use case's, see
cache/log/outbox.py). Definitions and step runs are stored as the JSON of their protos,
so the proto stays the one description of their shape.
"""

from __future__ import annotations

import builtins
import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from devops_hub.v1 import workflows_pb2
from google.protobuf import json_format

from services.common.data.db import Database
from services.common.data.db.database import Executor, Row, as_datetime
from services.workflows.statuses import ACTIVE_EXECUTION

Workflow = workflows_pb2.Workflow
Execution = workflows_pb2.Execution
StepRun = workflows_pb2.StepRun

# An active execution, as SQL: one whose status is still to change.
_ACTIVE = "status IN ({})".format(", ".join(sorted(f"'{Execution.Status.Name(status)}'" for status in ACTIVE_EXECUTION)))
_WORKFLOW_COLUMNS = "id, name, description, definition, revision, create_time, update_time"
_EXECUTION_COLUMNS = "id, workflow_id, status, input, output, error, steps, idempotency_key, create_time, start_time, end_time"


def _definition(workflow: Workflow) -> str:
    body = Workflow(steps=workflow.steps)
    if workflow.HasField("timeout"):
        body.timeout.CopyFrom(workflow.timeout)
    return json_format.MessageToJson(body, indent=None)


def _to_workflow(row: Row) -> Workflow:
    workflow = json_format.Parse(row["definition"], Workflow())
    workflow.id = row["id"]
    workflow.name = row["name"]
    workflow.description = row["description"]
    workflow.etag = str(row["revision"])
    workflow.create_time.FromDatetime(as_datetime(row["create_time"]))
    workflow.update_time.FromDatetime(as_datetime(row["update_time"]))
    return workflow


def _to_execution(row: Row) -> Execution:
    execution = Execution(
        id=row["id"],
        workflow_id=row["workflow_id"],
        status=row["status"],
        error=row["error"],
        idempotency_key=row["idempotency_key"] or "",
    )
    json_format.ParseDict(json.loads(row["input"]), execution.input)
    json_format.ParseDict(json.loads(row["output"]), execution.output)
    for step in json.loads(row["steps"]):
        json_format.ParseDict(step, execution.steps.add())
    for name in ("create_time", "start_time", "end_time"):
        if row[name] is not None:
            getattr(execution, name).FromDatetime(as_datetime(row[name]))
    return execution


def _steps_json(steps: Sequence[StepRun]) -> str:
    return json.dumps([json_format.MessageToDict(step, preserving_proto_field_name=True) for step in steps])


class WorkflowRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, workflow_id: str) -> Workflow | None:
        row = await self.db.fetchrow(f"SELECT {_WORKFLOW_COLUMNS} FROM workflows WHERE id = $1", workflow_id)
        return None if row is None else _to_workflow(row)

    async def list(self, after_id: str | None, limit: int) -> list[Workflow]:
        # Every id sorts after "", the first page's start.
        rows = await self.db.fetch(
            f"SELECT {_WORKFLOW_COLUMNS} FROM workflows WHERE id > $1 ORDER BY id LIMIT $2", after_id or "", limit
        )
        return [_to_workflow(row) for row in rows]

    async def existing(self, ids: Sequence[str]) -> builtins.list[str]:
        placeholders = ", ".join(f"${i}" for i in range(1, len(ids) + 1))
        return [row["id"] for row in await self.db.fetch(f"SELECT id FROM workflows WHERE id IN ({placeholders})", *ids)]

    async def insert(self, tx: Executor, workflows: Sequence[Workflow], now: dt.datetime) -> builtins.list[Workflow]:
        """UniqueViolation when an id is taken."""
        return [
            _to_workflow(
                await tx.fetchrow(
                    f"INSERT INTO workflows (id, name, description, definition, revision, create_time, update_time)"
                    f" VALUES ($1, $2, $3, $4, 1, $5, $5) RETURNING {_WORKFLOW_COLUMNS}",
                    workflow.id, workflow.name, workflow.description, _definition(workflow), now,
                )
            )
            for workflow in workflows
        ]

    async def replace(self, tx: Executor, workflow: Workflow, stored: Workflow, now: dt.datetime) -> Workflow | None:
        revision = int(stored.etag)
        row = await tx.fetchrow(
            f"UPDATE workflows SET name = $3, description = $4, definition = $5, update_time = $6,"
            f" revision = revision + 1 WHERE id = $1 AND revision = $2 RETURNING {_WORKFLOW_COLUMNS}",
            workflow.id, revision, workflow.name, workflow.description, _definition(workflow), now,
        )
        return None if row is None else _to_workflow(row)

    async def delete(self, tx: Executor, workflow_id: str, expected_revision: int | None) -> bool:
        if expected_revision is None:
            return await tx.execute("DELETE FROM workflows WHERE id = $1", workflow_id) > 0
        return await tx.execute("DELETE FROM workflows WHERE id = $1 AND revision = $2", workflow_id, expected_revision) > 0


class ExecutionRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(
        self, tx: Executor, execution: Execution, definition: Workflow, owner: str, lease_until: dt.datetime, now: dt.datetime
    ) -> Execution:
        row = await tx.fetchrow(
            "INSERT INTO workflow_executions (id, workflow_id, status, input, steps, definition,"
            " idempotency_key, owner, lease_expires_at, create_time)"
            f" VALUES ($1, $2, 'PENDING', $3, $4, $5, $6, $7, $8, $9) RETURNING {_EXECUTION_COLUMNS}",
            execution.id,
            execution.workflow_id,
            json_format.MessageToJson(execution.input, indent=None),
            _steps_json(execution.steps),
            _definition(definition),
            execution.idempotency_key or None,
            owner,
            lease_until,
            now,
        )
        return _to_execution(row)

    async def get(self, execution_id: str) -> Execution | None:
        row = await self.db.fetchrow(f"SELECT {_EXECUTION_COLUMNS} FROM workflow_executions WHERE id = $1", execution_id)
        return None if row is None else _to_execution(row)

    async def list(self, workflow_id: str, status: int, before: tuple[str, str] | None, limit: int) -> list[Execution]:
        """Newest first; `before` is the (create_time, id) the previous page ended on."""
        clauses: list[str] = []
        args: list[Any] = []
        if workflow_id:
            args.append(workflow_id)
            clauses.append(f"workflow_id = ${len(args)}")
        if status:
            args.append(Execution.Status.Name(status))
            clauses.append(f"status = ${len(args)}")
        if before is not None:
            args += [dt.datetime.fromisoformat(before[0]), before[1]]
            n = len(args)
            clauses.append(f"(create_time < ${n - 1} OR (create_time = ${n - 1} AND id < ${n}))")
        args.append(limit)
        where = " AND ".join(clauses) or "TRUE"
        rows = await self.db.fetch(
            f"SELECT {_EXECUTION_COLUMNS} FROM workflow_executions WHERE {where}"
            f" ORDER BY create_time DESC, id DESC LIMIT ${len(args)}",
            *args,
        )
        return [_to_execution(row) for row in rows]

    async def save(self, execution: Execution) -> bool:
        """False when refused: a runner never overwrites a final status with another. It may
        write the one the row holds (its steps, after a cancel that another replica wrote)."""
        status = Execution.Status.Name(execution.status)
        changed = await self.db.execute(
            "UPDATE workflow_executions SET status = $2, steps = $3, output = $4, error = $5,"
            f" start_time = $6, end_time = $7 WHERE id = $1 AND ({_ACTIVE} OR status = $2)",
            execution.id,
            status,
            _steps_json(execution.steps),
            json_format.MessageToJson(execution.output, indent=None),
            execution.error,
            execution.start_time.ToDatetime(dt.UTC) if execution.HasField("start_time") else None,
            execution.end_time.ToDatetime(dt.UTC) if execution.HasField("end_time") else None,
        )
        return changed > 0

    async def finish_if_active(self, execution_id: str, status: str, error: str, now: dt.datetime) -> Execution | None:
        """Ends an active execution (cancel, reap); None when it had ended already."""
        async with self.db.transaction() as tx:
            row = await tx.fetchrow(
                "UPDATE workflow_executions SET status = $2, error = $3, end_time = $4"
                f" WHERE id = $1 AND {_ACTIVE} RETURNING {_EXECUTION_COLUMNS}",
                execution_id,
                status,
                error,
                now,
            )
        return None if row is None else _to_execution(row)

    async def renew_leases(self, owner: str, until: dt.datetime) -> None:
        """Extends the leases of every active execution this owner runs: one statement."""
        await self.db.execute(
            f"UPDATE workflow_executions SET lease_expires_at = $2 WHERE owner = $1 AND {_ACTIVE}",
            owner,
            until,
        )

    async def reap_expired(self, now: dt.datetime, reason: str) -> builtins.list[Execution]:
        """Fails the active executions whose runner stopped renewing its lease."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch(
                "UPDATE workflow_executions SET status = 'FAILED', error = $2, end_time = $1"
                f" WHERE {_ACTIVE} AND lease_expires_at < $1"
                f" RETURNING {_EXECUTION_COLUMNS}",
                now,
                reason,
            )
        return [_to_execution(row) for row in rows]

    async def cancelled_among(self, ids: Sequence[str]) -> builtins.list[str]:
        """Which of these executions were cancelled through another replica."""
        if not ids:
            return []
        placeholders = ", ".join(f"${i}" for i in range(1, len(ids) + 1))
        rows = await self.db.fetch(
            f"SELECT id FROM workflow_executions WHERE status = 'CANCELLED' AND id IN ({placeholders})", *ids
        )
        return [row["id"] for row in rows]
