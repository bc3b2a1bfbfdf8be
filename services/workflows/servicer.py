"""WorkflowsService and EventsService over gRPC: translate, then delegate to a use case
(Workflows, Executions, Events)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from devops_hub.v1 import events_pb2, events_pb2_grpc, workflows_pb2, workflows_pb2_grpc
from google.protobuf import empty_pb2, json_format

from services.common.runtime.grpc_calls import Context
from services.workflows.events import Events
from services.workflows.executions import Executions
from services.workflows.workflows import Workflows


class WorkflowsServicer(workflows_pb2_grpc.WorkflowsServiceServicer):
    def __init__(self, workflows: Workflows, executions: Executions) -> None:
        self._workflows = workflows
        self._executions = executions

    async def ListWorkflows(
        self, request: workflows_pb2.ListWorkflowsRequest, context: Context
    ) -> workflows_pb2.ListWorkflowsResponse:
        return await self._workflows.list(request)

    async def GetWorkflow(self, request: workflows_pb2.GetWorkflowRequest, context: Context) -> workflows_pb2.Workflow:
        return await self._workflows.get(request.id)

    async def CreateWorkflow(self, request: workflows_pb2.CreateWorkflowRequest, context: Context) -> workflows_pb2.Workflow:
        return await self._workflows.create(request.workflow)

    async def UpdateWorkflow(self, request: workflows_pb2.UpdateWorkflowRequest, context: Context) -> workflows_pb2.Workflow:
        return await self._workflows.update(request.workflow, list(request.update_mask.paths))

    async def DeleteWorkflow(self, request: workflows_pb2.DeleteWorkflowRequest, context: Context) -> empty_pb2.Empty:
        await self._workflows.delete(request.id, request.etag)
        return empty_pb2.Empty()

    async def ExecuteWorkflow(self, request: workflows_pb2.ExecuteWorkflowRequest, context: Context) -> workflows_pb2.Execution:
        key = request.request_id or request.idempotency_key  # the second: request_id's older name
        return await self._executions.execute(request.id, json_format.MessageToDict(request.input), key)

    async def ListExecutions(
        self, request: workflows_pb2.ListExecutionsRequest, context: Context
    ) -> workflows_pb2.ListExecutionsResponse:
        return await self._executions.list(request)

    async def GetExecution(self, request: workflows_pb2.GetExecutionRequest, context: Context) -> workflows_pb2.Execution:
        return await self._executions.get(request.id)

    async def CancelExecution(self, request: workflows_pb2.CancelExecutionRequest, context: Context) -> workflows_pb2.Execution:
        return await self._executions.cancel(request.id)

    async def WatchExecution(
        self, request: workflows_pb2.WatchExecutionRequest, context: Context
    ) -> AsyncIterator[events_pb2.Event]:
        async for event in self._executions.watch(request.id, request.after):
            yield event


class EventsServicer(events_pb2_grpc.EventsServiceServicer):
    def __init__(self, events: Events) -> None:
        self._events = events

    async def ListEvents(self, request: events_pb2.ListEventsRequest, context: Context) -> events_pb2.ListEventsResponse:
        return await self._events.list(request)

    async def PublishEvent(self, request: events_pb2.PublishEventRequest, context: Context) -> events_pb2.Event:
        return await self._events.publish(request.event)

    async def StreamEvents(self, request: events_pb2.StreamEventsRequest, context: Context) -> AsyncIterator[events_pb2.Event]:
        async for event in self._events.stream(request):
            yield event
