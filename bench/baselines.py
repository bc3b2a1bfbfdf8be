"""The yardsticks the real services are measured against, each in its own process.

`grpc`: a bare grpc.aio AgentsService whose GetAgent returns a constant agent: the
cost of gRPC itself in Python, with no cache, database or interceptor.
`http`: a bare Starlette handler that makes one gRPC GetAgent call to that servicer
and returns its JSON: the cost of an HTTP hop plus one gRPC call, with no routing
table, transcoding or middleware.
"""

from __future__ import annotations

import argparse

import grpc
import uvloop
from google.protobuf import json_format

from devops_hub.v1 import agents_pb2, agents_pb2_grpc

CONSTANT = agents_pb2.Agent(
    id="bench-agent",
    name="Bench agent",
    version="1.0.0",
    domain="bench",
    type=agents_pb2.Agent.TASK,
    status=agents_pb2.Agent.ACTIVE,
    capabilities=["lint", "test"],
    metadata={"team": "bench"},
    etag="1",
)


class ConstantAgents(agents_pb2_grpc.AgentsServiceServicer):
    async def GetAgent(self, request, context):
        return CONSTANT


async def serve_grpc(port: int) -> None:
    server = grpc.aio.server()
    agents_pb2_grpc.add_AgentsServiceServicer_to_server(ConstantAgents(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"bare grpc listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def serve_http(port: int, grpc_target: str) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    state: dict[str, agents_pb2_grpc.AgentsServiceStub] = {}

    async def get_agent(request):
        stub = state.get("stub")
        if stub is None:
            stub = state["stub"] = agents_pb2_grpc.AgentsServiceStub(grpc.aio.insecure_channel(grpc_target))
        agent = await stub.GetAgent(agents_pb2.GetAgentRequest(id=request.path_params["id"]), timeout=10)
        return Response(json_format.MessageToJson(agent), media_type="application/json")

    app = Starlette(routes=[Route("/api/agents/{id}", get_agent)])
    print(f"bare http listening on 127.0.0.1:{port}", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, loop="uvloop", http="httptools")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["grpc", "http"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--grpc-target", default="")
    args = parser.parse_args()
    if args.kind == "grpc":
        uvloop.run(serve_grpc(args.port))
    else:
        serve_http(args.port, args.grpc_target)


if __name__ == "__main__":
    main()
