"""The use case behind ReportsService: the rules the annotations cannot say, and where
reports are kept (in memory: the guide's point is what surrounds a use case, not storage)."""

from __future__ import annotations

import uuid

from devops_hub.v1 import reports_pb2

from services.common import field_behavior
from services.common.errors import NotFound, invalid_fields


class Reports:
    def __init__(self) -> None:
        self._reports: dict[str, reports_pb2.Report] = {}

    async def get(self, report_id: str) -> reports_pb2.Report:
        report = self._reports.get(report_id)
        if report is None:
            raise NotFound(f"report {report_id!r} not found")
        return report

    async def create(self, report: reports_pb2.Report) -> reports_pb2.Report:
        # A resource's REQUIRED fields are the create's to check (request_checks.py checks
        # only the request's own), through the same field_behavior.py.
        missing = field_behavior.missing(report)
        if missing:
            raise invalid_fields(field_behavior.violations(missing, prefix="report"))
        created = reports_pb2.Report(id=uuid.uuid4().hex, title=report.title, agent_ids=report.agent_ids)
        self._reports[created.id] = created
        return created
