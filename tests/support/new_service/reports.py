"""The use case behind ReportsService, written as docs/design.md says a resource's is:
the resource template (services/common/usecases/resource.py) and the reports' own rules; the
template brings the id rule, the field-by-field errors, the unit of work with the
report.created event, the cached Get and its NOT_FOUND."""

from __future__ import annotations

from devops_hub.v1 import reports_pb2

from services.cache.client.decorators import cached
from services.common.usecases.resource import Resource, Violations
from tests.support.new_service.repository import ReportRepository

Report = reports_pb2.Report

_METHODS = reports_pb2.DESCRIPTOR.services_by_name["ReportsService"].methods_by_name


class Reports(Resource[Report]):
    label = "report"
    _repository: ReportRepository
    # ReportsService lists nothing: a write makes stale only the report's own key.
    lists = ()

    @cached(method=_METHODS["GetReport"], key_prefix="reports:get")
    async def _stored(self, report_id: str) -> Report | None:
        return await self._repository.get(report_id)

    async def check(self, report: Report, path: str, violations: Violations) -> None:
        # Its REQUIRED title the template checks (request_checks.py checks only the
        # request's own fields): what the proto cannot say is the reports' to check.
        if len(report.title) > 200:
            violations.append((f"{path}.title", "must be at most 200 characters"))

    def normalise(self, report: Report) -> None:
        report.title = report.title.strip()
