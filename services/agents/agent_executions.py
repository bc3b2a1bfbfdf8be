"""ExecuteAgent: check the agent can take the work, then run it through its runtime.

The runtime is the agent's `endpoint`: "builtin" runs in this process, host:port is
an AgentRuntime server reached over a pooled channel. The call gets the smaller of
the requested timeout and the caller's remaining deadline. An agent that fails or
runs out of time is a FAILED or TIMED_OUT result, not an RPC error: the RPC failed
only if the request itself was wrong.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

import grpc
from devops_hub.v1 import agents_pb2, runtime_pb2, runtime_pb2_grpc
from google.protobuf import json_format
from opentelemetry import trace

from services.agents import builtins
from services.agents.agents import Agents
from services.common.contract.errors import FailedPrecondition, Unavailable, invalid_fields
from services.common.contract.request_checks import json_violations
from services.common.foundation.background import spawn
from services.common.transport.channels import open_channel

Agent = agents_pb2.Agent
AgentResult = runtime_pb2.AgentResult
DEFAULT_TIMEOUT = 30.0
RESULT_MARGIN = 0.1
MAX_RUNTIME_CHANNELS = 256


class RuntimeChannels:
    """One channel per agent endpoint, reused; the least recently used is closed past the bound."""

    def __init__(self, *, tracer: trace.Tracer | None = None) -> None:
        self._tracer = tracer
        self._stubs: OrderedDict[str, tuple[grpc.aio.Channel, runtime_pb2_grpc.AgentRuntimeStub]] = OrderedDict()

    def stub(self, endpoint: str) -> runtime_pb2_grpc.AgentRuntimeStub:
        if endpoint in self._stubs:
            self._stubs.move_to_end(endpoint)
            return self._stubs[endpoint][1]
        channel = open_channel(endpoint, tracer=self._tracer)
        self._stubs[endpoint] = (channel, runtime_pb2_grpc.AgentRuntimeStub(channel))
        if len(self._stubs) > MAX_RUNTIME_CHANNELS:
            _, (old, _) = self._stubs.popitem(last=False)
            spawn(old.close(grace=5), name="runtime-channel-close")
        return self._stubs[endpoint][1]

    async def close(self) -> None:
        for channel, _ in self._stubs.values():
            await channel.close()
        self._stubs.clear()


class AgentExecutions:
    def __init__(self, agents: Agents, channels: RuntimeChannels) -> None:
        self._agents = agents
        self._channels = channels

    async def execute(self, request: agents_pb2.ExecuteAgentRequest, time_remaining: float | None) -> AgentResult:
        if request.timeout.seconds < 0 or request.timeout.nanos < 0:
            raise invalid_fields([("timeout", "must not be negative")])
        agent = await self._agents.get(request.id)
        _check_can_run(agent, request.capability)
        timeout = request.timeout.ToTimedelta().total_seconds() or DEFAULT_TIMEOUT
        if time_remaining is not None:
            # Keep a little of the caller's deadline to send the TIMED_OUT result back in.
            timeout = min(timeout, max(0.0, time_remaining - min(RESULT_MARGIN, time_remaining / 10)))
        started = time.monotonic()
        if agent.endpoint == builtins.BUILTIN_ENDPOINT:
            result = await self._run_builtin(agent, request, timeout)
        else:
            result = await self._run_remote(agent, request, timeout)
        unfit = json_violations(result.output, "output")
        if unfit:
            path, problem = unfit[0]
            result = AgentResult(outcome=AgentResult.FAILED, error=f"the agent answered a value no JSON can carry: {path} {problem}")
        result.duration.FromNanoseconds(int((time.monotonic() - started) * 1e9))
        return result

    async def _run_builtin(self, agent: Agent, request: agents_pb2.ExecuteAgentRequest, timeout: float) -> AgentResult:
        capability = builtins.find(agent.id, request.capability)
        if capability is None:
            return AgentResult(outcome=AgentResult.FAILED, error=f"the built-in runtime has no {request.capability!r} for {agent.id!r}")
        call = builtins.Call(input=json_format.MessageToDict(request.input), attempt=request.attempt or 1)
        try:
            async with asyncio.timeout(timeout):
                output = await capability(call)
        except TimeoutError:
            return AgentResult(outcome=AgentResult.TIMED_OUT, error=f"ran past its deadline of {timeout:g}s")
        except builtins.AgentFailure as exc:
            return AgentResult(outcome=AgentResult.FAILED, error=str(exc))
        result = AgentResult(outcome=AgentResult.SUCCEEDED)
        json_format.ParseDict(output, result.output)
        return result

    async def _run_remote(self, agent: Agent, request: agents_pb2.ExecuteAgentRequest, timeout: float) -> AgentResult:
        runtime_request = runtime_pb2.RuntimeExecuteRequest(
            agent_id=agent.id,
            capability=request.capability,
            input=request.input,
            attempt=request.attempt or 1,
            correlation_id=request.correlation_id,
        )
        try:
            return await self._channels.stub(agent.endpoint).Execute(runtime_request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return AgentResult(outcome=AgentResult.TIMED_OUT, error=f"ran past its deadline of {timeout:g}s")
            return AgentResult(
                outcome=AgentResult.FAILED,
                error=f"the runtime at {agent.endpoint} answered {exc.code().name}: {exc.details()}",
            )


def _check_can_run(agent: Agent, capability: str) -> None:
    status = Agent.Status.Name(agent.status)
    metadata = {"id": agent.id, "status": status}
    if agent.status == Agent.MAINTENANCE:
        raise Unavailable(f"agent {agent.id!r} is in MAINTENANCE; try again later", reason="AGENT_IN_MAINTENANCE", metadata=metadata)
    if agent.status != Agent.ACTIVE:
        raise FailedPrecondition(f"agent {agent.id!r} is {status} and takes no work", reason="AGENT_NOT_ACTIVE", metadata=metadata)
    if capability not in agent.capabilities:
        offered = ", ".join(agent.capabilities) or "none"
        raise invalid_fields([("capability", f"agent {agent.id!r} has no capability {capability!r} (it has: {offered})")])
    if not agent.endpoint:
        raise FailedPrecondition(f"agent {agent.id!r} has no runtime endpoint to run on", reason="AGENT_NO_ENDPOINT", metadata=metadata)
