"""The yardsticks the real services are measured against, each in its own process, all
on uvloop, all serving the very answers the hub gave (files written by bench/run.py).

`grpc`: a bare grpc.aio AgentsService whose GetAgent and ListAgents return constant
messages: the cost of gRPC itself in Python, with no cache, database or wrapper.
`http`: a bare uvicorn ASGI handler that makes one gRPC call to that servicer and
returns its JSON: the cost of an HTTP hop plus one gRPC call, with no routing table,
transcoding or middleware.
`json`: a bare uvicorn ASGI handler returning constant bytes: the physical floor of
the HTTP front, with no work at all behind it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc
import uvicorn
import uvloop
from devops_hub.v1 import agents_pb2, agents_pb2_grpc
from google.protobuf import json_format

# The answers, as bench/run.py writes them into the --answers directory.
AGENT_PB, LIST_PB = "agent.pb", "list.pb"
AGENT_JSON, LIST_JSON = "agent.json", "list.json"
LIST_PATH, AGENT_PREFIX = "/api/agents", "/api/agents/"

_JSON_HEADERS = [(b"content-type", b"application/json")]


class ConstantAgents(agents_pb2_grpc.AgentsServiceServicer):
    def __init__(self, agent: agents_pb2.Agent, listed: agents_pb2.ListAgentsResponse) -> None:
        self._agent = agent
        self._listed = listed

    async def GetAgent(self, request, context):
        return self._agent

    async def ListAgents(self, request, context):
        return self._listed


async def serve_grpc(port: int, answers: Path) -> None:
    servicer = ConstantAgents(
        agents_pb2.Agent.FromString((answers / AGENT_PB).read_bytes()),
        agents_pb2.ListAgentsResponse.FromString((answers / LIST_PB).read_bytes()),
    )
    server = grpc.aio.server()
    agents_pb2_grpc.add_AgentsServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"bare grpc listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


async def _respond(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON_HEADERS})
    await send({"type": "http.response.body", "body": body})


def hop_app(grpc_target: str):
    """GET /api/agents and /api/agents/{id}, each one gRPC call to `grpc_target`."""
    state: dict[str, agents_pb2_grpc.AgentsServiceStub] = {}

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        stub = state.get("stub")
        if stub is None:
            stub = state["stub"] = agents_pb2_grpc.AgentsServiceStub(grpc.aio.insecure_channel(grpc_target))
        path = scope["path"]
        if path == LIST_PATH:
            reply = await stub.ListAgents(agents_pb2.ListAgentsRequest(), timeout=10)
        elif path.startswith(AGENT_PREFIX):
            reply = await stub.GetAgent(agents_pb2.GetAgentRequest(id=path[len(AGENT_PREFIX) :]), timeout=10)
        else:
            await _respond(send, 404, b"{}")
            return
        await _respond(send, 200, json_format.MessageToJson(reply, indent=None).encode())

    return app


def constant_app(answers: Path):
    """GET /api/agents and /api/agents/{id}: the hub's own answers, as constant bytes."""
    listed, agent = (answers / LIST_JSON).read_bytes(), (answers / AGENT_JSON).read_bytes()

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == LIST_PATH:
            await _respond(send, 200, listed)
        elif path.startswith(AGENT_PREFIX):
            await _respond(send, 200, agent)
        else:
            await _respond(send, 404, b"{}")

    return app


def serve_http(app, port: int, name: str) -> None:
    print(f"bare {name} listening on 127.0.0.1:{port}", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, loop="uvloop", http="httptools")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["grpc", "http", "json"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--answers", type=Path, required=True, help="the directory bench/run.py wrote the answers to")
    parser.add_argument("--grpc-target", default="")
    args = parser.parse_args()
    if args.kind == "grpc":
        uvloop.run(serve_grpc(args.port, args.answers))
    elif args.kind == "http":
        serve_http(hop_app(args.grpc_target), args.port, "http -> grpc hop")
    else:
        serve_http(constant_app(args.answers), args.port, "json")


if __name__ == "__main__":
    main()
