"""All SQL about reports: what the template's Store asks of it for ReportsService's
two RPCs (a resource with Update and Delete RPCs adds replace() and delete())."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from devops_hub.v1 import reports_pb2
from google.protobuf import json_format

from services.common.data.db import Database
from services.common.data.db.database import Executor

Report = reports_pb2.Report

# Its migration: a numbered file in services/common/data/migrations/{postgresql,sqlite}/ in a
# real service, applied here by the scenario so that the project's own stay as they are.
SCHEMA = "CREATE TABLE reports (id TEXT PRIMARY KEY, body TEXT NOT NULL)"


class ReportRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, report_id: str) -> Report | None:
        row = await self.db.fetchrow("SELECT body FROM reports WHERE id = $1", report_id)
        return None if row is None else json_format.Parse(row["body"], Report())

    async def existing(self, ids: Sequence[str]) -> list[str]:
        placeholders = ", ".join(f"${i}" for i in range(1, len(ids) + 1))
        return [row["id"] for row in await self.db.fetch(f"SELECT id FROM reports WHERE id IN ({placeholders})", *ids)]

    async def insert(self, tx: Executor, reports: Sequence[Report], now: dt.datetime) -> list[Report]:
        for report in reports:
            await tx.execute("INSERT INTO reports (id, body) VALUES ($1, $2)", report.id, json_format.MessageToJson(report))
        return list(reports)
