"""ReportsService over gRPC: each method translates the request and delegates to Reports."""

from __future__ import annotations

import grpc
from devops_hub.v1 import reports_pb2, reports_pb2_grpc

from tests.support.new_service.reports import Reports


class ReportsServicer(reports_pb2_grpc.ReportsServiceServicer):
    def __init__(self, reports: Reports) -> None:
        self._reports = reports

    async def GetReport(self, request: reports_pb2.GetReportRequest, context: grpc.aio.ServicerContext) -> reports_pb2.Report:
        return await self._reports.get(request.id)

    async def CreateReport(
        self, request: reports_pb2.CreateReportRequest, context: grpc.aio.ServicerContext
    ) -> reports_pb2.Report:
        return await self._reports.create(request.report)
