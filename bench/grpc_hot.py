"""A hot gRPC GetAgent against a bare grpc.aio servicer answering the same bytes.

Starts the stack as bench/run.py does and, beside it, a bare grpc.aio servicer whose
GetAgent answers the very bytes the hub answered, through a serializer that passes
them as they are (no message built or serialised per call: the floor of a Python gRPC
answer). Then, in alternating rounds, h2load (gRPC framing) loads both with the same
GetAgent, and the bench prints throughput, CPU per call of every process of each side
(read from /proc), and the ratio (issue 18: hub / bare ≥ 0.85). --profile adds a
py-spy profile of the agents service under the same load.

    python -m bench.grpc_hot                      # the comparison
    python -m bench.grpc_hot bare --port P --answer FILE   # the bare servicer alone
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import uvloop
from devops_hub.v1 import agents_pb2, agents_pb2_grpc

from bench import load
from bench.run import (
    AGENT_ID,
    AGENTS_SERVICE,
    HUB_PROCESSES,
    Side,
    compare,
    own_time,
    process_named,
    record_profile,
    row,
    start,
    started_stack,
    stop,
)
from devstack.ports import free_port, wait_for_port
from services.common.contract.api import method_path
from services.common.foundation.settings import Settings
from services.common.transport.channels import service_address

RATIO_TARGET = 0.85
GET_AGENT = AGENTS_SERVICE.methods_by_name["GetAgent"]


async def serve_bare(port: int, answer: bytes) -> None:
    """GetAgent answering `answer` as it is: the request is decoded, the answer is not
    built or serialised."""

    async def get_agent(request: agents_pb2.GetAgentRequest, context: grpc.aio.ServicerContext) -> bytes:
        return answer

    handler = grpc.unary_unary_rpc_method_handler(
        get_agent, request_deserializer=agents_pb2.GetAgentRequest.FromString, response_serializer=lambda data: data
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(AGENTS_SERVICE.full_name, {"GetAgent": handler}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def profile(pid: int, url: str, body: bytes, args: argparse.Namespace) -> None:
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        print("\nNo profile: py-spy is not installed (pip install py-spy).")
        return
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "agents.txt"
        recorder = record_profile(py_spy, pid, output, args.profile_seconds)
        time.sleep(1)
        deadline = time.monotonic() + args.profile_seconds - 1
        while time.monotonic() < deadline:
            load.run(url, requests=4000, body=body, clients=args.clients, streams=args.streams)
        recorder.wait(timeout=60)
        print(f"\n## The agents service under hot GetAgent: py-spy, {args.profile_seconds}s\n\n| share | frame |\n|---|---|")
        if output.exists():
            for frame, share in own_time(output.read_text(), args.profile_top):
                print(f"| {share:.1%} | `{frame}` |")


def compare_sides(args: argparse.Namespace) -> None:
    directory = Path(tempfile.mkdtemp(prefix="dh-grpc-hot-"))
    bare: subprocess.Popen | None = None
    try:
        with started_stack(directory) as stack:
            agents = service_address(AGENTS_SERVICE, Settings.from_env(stack.env))
            with grpc.insecure_channel(agents) as channel:
                answer = agents_pb2_grpc.AgentsServiceStub(channel).GetAgent(agents_pb2.GetAgentRequest(id=AGENT_ID), timeout=10)
            (directory / "agent.pb").write_bytes(answer.SerializeToString())
            port = free_port()
            bare = start([sys.executable, "-m", "bench.grpc_hot", "bare", "--port", str(port),
                          "--answer", str(directory / "agent.pb")], stack.env)
            wait_for_port(port)
            body = load.grpc_frame(agents_pb2.GetAgentRequest(id=AGENT_ID))
            method = method_path(GET_AGENT)
            bare_pid = bare.pid
            sides = [
                Side("DevOps Hub agents service", f"http://{agents}{method}", lambda: stack.pids),
                Side("bare grpc.aio servicer, same bytes", f"http://127.0.0.1:{port}{method}", lambda: [bare_pid]),
            ]
            options = dict(body=body, clients=args.clients, streams=args.streams)
            ours, floor = compare(
                sides,
                lambda url: load.run(url, requests=args.requests, **options),
                args.rounds,
                lambda url: load.run(url, requests=2000, **options),
            )
            print(f"# Hot gRPC GetAgent: {args.rounds} alternating rounds of h2load -n {args.requests} "
                  f"-c {args.clients} -m {args.streams} per side\n")
            print("| side | requests | req/s | p50 ms | p95 ms | p99 ms | errors | CPU ms / request |")
            print("|---|---|---|---|---|---|---|---|")
            for side, result in zip(sides, (ours, floor)):
                print(row(side.name, result))
            print("\n| the hub's CPU ms per call, by process | " + " | ".join(HUB_PROCESSES) + " |")
            print("|---|" + "---|" * len(HUB_PROCESSES))
            print("| hot GetAgent | " + " | ".join(f"{ours.by_process.get(name, 0.0):.3f}" for name in HUB_PROCESSES) + " |")
            ratio = ours.figures.rps / floor.figures.rps
            print("\n| figure | measured | target |\n|---|---|---|")
            print(f"| req/s, hub / bare | {ratio:.2f} | ≥ {RATIO_TARGET} ({'met' if ratio >= RATIO_TARGET else '**missed**'}) |")
            print(f"| CPU per call, hub / bare | {ours.cpu_ms / max(floor.cpu_ms, 1e-9):.2f} | |")
            if args.profile:
                pid = process_named(stack.pids, "services.agents")
                if pid is not None:
                    profile(pid, sides[0].url, body, args)
    finally:
        if bare is not None:
            stop([bare])
        shutil.rmtree(directory, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=["compare", "bare"], default="compare")
    parser.add_argument("--port", type=int, help="bare: the port to serve on")
    parser.add_argument("--answer", type=Path, help="bare: the file holding the answer's bytes")
    parser.add_argument("--requests", type=int, default=20000, help="requests per round and side")
    parser.add_argument("--clients", type=int, default=16, help="h2load connections")
    parser.add_argument("--streams", type=int, default=8, help="h2load concurrent streams per connection")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="add a py-spy profile of the agents service")
    parser.add_argument("--profile-seconds", type=int, default=10)
    parser.add_argument("--profile-top", type=int, default=25)
    args = parser.parse_args()
    if args.mode == "bare":
        if args.port is None or args.answer is None:
            parser.error("bare needs --port and --answer")
        uvloop.run(serve_bare(args.port, args.answer.read_bytes()))
        return 0
    load.require_h2load()
    compare_sides(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
