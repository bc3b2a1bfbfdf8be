"""AgentsService over gRPC: each method translates the request and delegates to a use case (Agents, AgentExecutions)."""

from __future__ import annotations

from devops_hub.v1 import agents_pb2, agents_pb2_grpc, runtime_pb2
from google.protobuf import empty_pb2

from services.agents.agent_executions import AgentExecutions
from services.agents.agents import Agents
from services.common.runtime.grpc_calls import Context


class AgentsServicer(agents_pb2_grpc.AgentsServiceServicer):
    def __init__(self, agents: Agents, agent_executions: AgentExecutions) -> None:
        self._agents = agents
        self._agent_executions = agent_executions

    async def ListAgents(self, request: agents_pb2.ListAgentsRequest, context: Context) -> agents_pb2.ListAgentsResponse:
        return await self._agents.list(request)

    async def GetAgent(self, request: agents_pb2.GetAgentRequest, context: Context) -> bytes:
        # The Agent's wire bytes, as cached: the host sends bytes as they are (grpc_calls.py).
        return await self._agents.get_encoded(request.id)

    async def CreateAgent(self, request: agents_pb2.CreateAgentRequest, context: Context) -> agents_pb2.Agent:
        return await self._agents.create(request.agent)

    async def BatchCreateAgents(
        self, request: agents_pb2.BatchCreateAgentsRequest, context: Context
    ) -> agents_pb2.BatchCreateAgentsResponse:
        return await self._agents.batch_create([r.agent for r in request.requests])

    async def UpdateAgent(self, request: agents_pb2.UpdateAgentRequest, context: Context) -> agents_pb2.Agent:
        return await self._agents.update(request.agent, list(request.update_mask.paths))

    async def DeleteAgent(self, request: agents_pb2.DeleteAgentRequest, context: Context) -> empty_pb2.Empty:
        await self._agents.delete(request.id, request.etag)
        return empty_pb2.Empty()

    async def DiscoverAgents(
        self, request: agents_pb2.DiscoverAgentsRequest, context: Context
    ) -> agents_pb2.DiscoverAgentsResponse:
        return await self._agents.discover(request)

    async def ExecuteAgent(self, request: agents_pb2.ExecuteAgentRequest, context: Context) -> runtime_pb2.AgentResult:
        return await self._agent_executions.execute(request, context.time_remaining())
