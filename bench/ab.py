"""One part of the hub from this tree against the same part from a git revision.

    python -m bench.ab --part gateway --base <revision> [--rounds 6] [--requests 5000]
    python -m bench.ab --part agents  --base <revision> [--rounds 6] [--requests 10000]

(--base may also name a directory holding a tree with gateway/ and services/.)

A change to the hot path is kept when it pays, and on a shared machine only figures
taken side by side can say so. This starts one stack (as bench/run.py does) and a
second process of the part from `git archive <revision>`, in a temporary directory,
on the same database and cache, and loads both in alternating rounds (A B, B A, ...):
the gateway with `hey -c 100` on GET /api/agents and /api/agents/{id}, the agents
service with h2load on a hot gRPC GetAgent. It prints each process's own CPU time per
request (from /proc), its throughput and p95, and the ratios.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from devops_hub.v1 import agents_pb2

from bench import cpu, load
from bench.run import AGENT_ID, ROOT, process_named, start, started_stack
from devstack.ports import free_port, wait_for_port
from services.common.contract.api import method_path

GET_AGENT = method_path(agents_pb2.DESCRIPTOR.services_by_name["AgentsService"].methods_by_name["GetAgent"])


def archive(revision: str, into: Path) -> None:
    """The gateway and services packages as they were at `revision`."""
    data = subprocess.run(
        ["git", "archive", revision, "gateway", "services"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")


def compare(
    title: str, sides: dict[str, tuple[str, int]], run: Callable[[str], load.Figures], rounds: int
) -> None:
    for url, _ in sides.values():
        run(url)  # warm-up
    figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in sides}
    for round_ in range(rounds):
        for name, (url, pid) in list(sides.items())[:: 1 if round_ % 2 == 0 else -1]:
            before = cpu.cpu_seconds([pid])
            result = run(url)
            figures[name].append((result.rps, result.p95_ms, (cpu.cpu_seconds([pid]) - before) * 1000 / result.requests))
    medians = {name: [statistics.median(run_[i] for run_ in runs) for i in range(3)] for name, runs in figures.items()}
    for name, (rps, p95, cpu_ms) in medians.items():
        print(f"| {title} | {name} | {rps:,.0f} | {p95:.1f} | {cpu_ms:.3f} |")
    ours, base = medians.values()
    print(f"| {title} | this / base | {ours[0] / base[0]:.2f} | {ours[1] / base[1]:.2f} | {ours[2] / base[2]:.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["gateway", "agents"], required=True)
    parser.add_argument("--base", required=True, help="the git revision to compare with, or a directory holding its tree")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=100, help="hey's clients (gateway)")
    parser.add_argument("--clients", type=int, default=16, help="h2load connections (agents)")
    parser.add_argument("--streams", type=int, default=8, help="h2load streams per connection (agents)")
    args = parser.parse_args()
    why = load.missing("hey" if args.part == "gateway" else "h2load")
    if why:
        raise SystemExit(why)
    module = "gateway" if args.part == "gateway" else "services.agents"
    with tempfile.TemporaryDirectory(prefix="dh-ab-") as tmp, started_stack(Path(tmp)) as stack:
        base_tree = Path(args.base)
        if not base_tree.is_dir():
            base_tree = Path(tmp) / "base"
            archive(args.base, base_tree)
        port = free_port()
        env = dict(stack.env, PYTHONPATH=os.pathsep.join([str(base_tree), str(ROOT / "clients" / "python")]), AGENTS_METRICS_PORT="0")
        if args.part == "gateway":
            env["GATEWAY_PORT"] = str(port)
            ours_url, base_url = stack.gateway, f"http://127.0.0.1:{port}"
        else:
            ours_url, base_url = f"http://{env['AGENTS_ADDR']}", f"http://127.0.0.1:{port}"
            env["AGENTS_ADDR"] = f"127.0.0.1:{port}"
        base = start([sys.executable, "-m", module], env, cwd=base_tree)
        try:
            wait_for_port(port)
            ours_pid = process_named(stack.pids, module)
            if ours_pid is None:
                raise SystemExit(f"no {module} process in the stack started")
            sides = {"this tree": (ours_url, ours_pid), f"base {args.base}": (base_url, base.pid)}
            print(f"# {args.part} A/B: {args.rounds} alternating rounds of {args.requests} requests\n")
            print(f"| load | {args.part} | req/s | p95 ms | {args.part} CPU ms / request |")
            print("|---|---|---|---|---|")
            if args.part == "gateway":
                for path in ("/api/agents", f"/api/agents/{AGENT_ID}"):
                    paths = {name: (url + path, pid) for name, (url, pid) in sides.items()}
                    compare(f"hey -c {args.concurrency} GET {path}", paths,
                            lambda url: load.hey(url, requests=args.requests, clients=args.concurrency), args.rounds)
            else:
                body = load.grpc_frame(agents_pb2.GetAgentRequest(id=AGENT_ID))
                paths = {name: (url + GET_AGENT, pid) for name, (url, pid) in sides.items()}
                compare(f"h2load {args.clients} x {args.streams} gRPC GetAgent", paths,
                        lambda url: load.run(url, requests=args.requests, clients=args.clients, streams=args.streams, body=body),
                        args.rounds)
        finally:
            base.terminate()
            base.wait(timeout=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
