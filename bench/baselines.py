"""The yardsticks the hub is measured against, each in its own process, serving the very
answers the hub gave (files bench/run.py writes into --answers).

`asgi`: a raw ASGI callable (no Starlette, no routing table, no middleware) that sends
the hub's own bytes and headers for GET /api/agents and /api/agents/{id}, served as
the gateway serves: uvicorn with the gateway's connection options (its httptools
protocol with the head and read limits, keep-alive, no Server header, no access log),
on a SO_REUSEPORT socket bound as the gateway binds its own, on uvloop. bench/run.py
starts as many of these processes on one port as the hub has gateway processes
(WORKERS), so that only the work behind the socket differs between the two sides.
`grpc`: a bare grpc.aio AgentsService whose GetAgent and ListAgents return constant
messages: the cost of gRPC itself in Python, with no cache, database or wrapper.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import grpc
import uvicorn
import uvloop
from devops_hub.v1 import agents_pb2, agents_pb2_grpc

from gateway.connections import connection_options
from gateway.server import _listening_socket
from services.common.foundation.settings import Settings

# The answers, as bench/run.py writes them into the --answers directory: the gRPC
# messages, and each HTTP answer's body and headers.
AGENT_PB, LIST_PB = "agent.pb", "list.pb"
AGENT_JSON, LIST_JSON = "agent.json", "list.json"
HEADERS = "headers.json"
LIST_PATH, AGENT_PREFIX = "/api/agents", "/api/agents/"
# uvicorn adds its own Date (as it does for the gateway); the request id is new on
# every answer, here as in the hub, so each side pays for making one.
OWN_HEADERS = ("date", "x-request-id")


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
    await server.wait_for_termination()


def write_answer(answers: Path, name: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """Keeps one of the hub's HTTP answers for asgi_app: its body, and its headers but
    OWN_HEADERS (which asgi_app makes per answer, as the hub does)."""
    (answers / name).write_bytes(body)
    path = answers / HEADERS
    kept = json.loads(path.read_text()) if path.exists() else {}
    own = {header.encode() for header in OWN_HEADERS}
    kept[name] = [[key.decode("latin-1"), value.decode("latin-1")] for key, value in headers if key.lower() not in own]
    path.write_text(json.dumps(kept))


def asgi_app(answers: Path):
    """GET /api/agents and /api/agents/{id}: the hub's own answers, bytes and headers."""
    kept = json.loads((answers / HEADERS).read_text())

    def answer(name: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
        return [(key.encode("latin-1"), value.encode("latin-1")) for key, value in kept[name]], (answers / name).read_bytes()

    listed, agent = answer(LIST_JSON), answer(AGENT_JSON)
    not_found: tuple[list[tuple[bytes, bytes]], bytes] = ([(b"content-type", b"application/json"), (b"content-length", b"2")], b"{}")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == LIST_PATH:
            status, (headers, body) = 200, listed
        elif path.startswith(AGENT_PREFIX):
            status, (headers, body) = 200, agent
        else:
            status, (headers, body) = 404, not_found
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"x-request-id", os.urandom(16).hex().encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


async def serve_asgi(port: int, answers: Path) -> None:
    settings = Settings.from_env()
    config = uvicorn.Config(
        asgi_app(answers),
        **connection_options(settings),
        lifespan="off",
        access_log=False,
        log_config=None,
        log_level="warning",
        server_header=False,
    )
    await uvicorn.Server(config).serve(sockets=[_listening_socket("127.0.0.1", port)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["asgi", "grpc"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--answers", type=Path, required=True, help="the directory bench/run.py wrote the answers to")
    args = parser.parse_args()
    uvloop.run((serve_asgi if args.kind == "asgi" else serve_grpc)(args.port, args.answers))


if __name__ == "__main__":
    main()
