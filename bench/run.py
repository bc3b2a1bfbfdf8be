"""`make bench`: the stack against bare baselines, side by side in one run.

Starts the whole stack (launcher, SQLite, memory cache) and the two baselines of
bench/baselines.py, then loads each pair in alternating rounds so that machine
noise hits both sides alike, and prints the medians and their ratios.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from devops_hub.v1 import agents_pb2

from bench import load
from services.common.auth import keys

ROOT = Path(__file__).resolve().parent.parent
AGENT_ID = "bench-agent"
ADMIN_KEY = keys.new_key()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def median_figures(runs: list[load.Figures]) -> load.Figures:
    return load.Figures(
        requests=sum(r.requests for r in runs),
        rps=statistics.median(r.rps for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p95_ms=statistics.median(r.p95_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        errors=sum(r.errors for r in runs),
    )


def row(name: str, f: load.Figures) -> str:
    return f"| {name} | {f.requests} | {f.rps:,.0f} | {f.p50_ms:.2f} | {f.p95_ms:.2f} | {f.p99_ms:.2f} | {f.errors} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20000, help="requests per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams per HTTP/2 connection")
    args = parser.parse_args()
    load.require_h2load()

    ports = {name: free_port() for name in ("agents", "workflows", "cache", "gateway", "bare_grpc", "bare_http")}
    tmp = tempfile.mkdtemp(prefix="dh-bench-")
    env = dict(os.environ)
    env.update(
        DATABASE_URL=f"sqlite:///{tmp}/bench.db",
        AGENTS_ADDR=f"127.0.0.1:{ports['agents']}",
        WORKFLOWS_ADDR=f"127.0.0.1:{ports['workflows']}",
        CACHE_ADDR=f"127.0.0.1:{ports['cache']}",
        GATEWAY_PORT=str(ports["gateway"]),
        LOG_LEVEL="WARNING",
        # The default access rules run (anonymous reads, key checks, token buckets),
        # with limits far above what the load can reach.
        BOOTSTRAP_ADMIN_KEY=ADMIN_KEY,
        RATE_LIMIT_REQUESTS="1000000000",
        RATE_LIMIT_EXECUTE_REQUESTS="1000000000",
        AGENTS_METRICS_PORT="0",
        WORKFLOWS_METRICS_PORT="0",
        CACHE_METRICS_PORT="0",
    )
    env.pop("REDIS_URL", None)
    processes = [
        start([sys.executable, "-m", "services.launcher"], env),
        start([sys.executable, "-m", "bench.baselines", "grpc", "--port", str(ports["bare_grpc"])], env),
        start(
            [sys.executable, "-m", "bench.baselines", "http", "--port", str(ports["bare_http"]),
             "--grpc-target", f"127.0.0.1:{ports['bare_grpc']}"],
            env,
        ),
    ]
    try:
        for name in ("gateway", "bare_grpc", "bare_http"):
            wait_port(ports[name])
        gateway = f"http://127.0.0.1:{ports['gateway']}"
        created = httpx.post(
            f"{gateway}/api/agents",
            json={"id": AGENT_ID, "name": "Bench agent", "domain": "bench", "capabilities": ["lint", "test"]},
            headers={"x-api-key": ADMIN_KEY},
            timeout=10,
        )
        created.raise_for_status()
        body = load.grpc_frame(agents_pb2.GetAgentRequest(id=AGENT_ID))
        pairs = {
            "gRPC GetAgent (cached)": (
                f"http://127.0.0.1:{ports['agents']}/devops_hub.v1.AgentsService/GetAgent",
                f"http://127.0.0.1:{ports['bare_grpc']}/devops_hub.v1.AgentsService/GetAgent",
                dict(body=body, streams=args.streams),
            ),
            "HTTP GET /api/agents/{id}": (
                f"{gateway}/api/agents/{AGENT_ID}",
                f"http://127.0.0.1:{ports['bare_http']}/api/agents/{AGENT_ID}",
                dict(http1=True, streams=1),
            ),
        }
        print(f"# DevOps Hub bench: {args.rounds} rounds x {args.requests} requests per side, "
              f"{args.clients} clients, {os.cpu_count()} cores\n")
        print("| path | requests | req/s | p50 ms | p95 ms | p99 ms | errors |")
        print("|---|---|---|---|---|---|---|")
        ratios = []
        for title, (ours_url, bare_url, options) in pairs.items():
            # Warm-up: connections, caches, JIT-less but allocator-warm.
            load.run(ours_url, requests=2000, clients=args.clients, **options)
            load.run(bare_url, requests=2000, clients=args.clients, **options)
            ours, bare = [], []
            for _ in range(args.rounds):
                ours.append(load.run(ours_url, requests=args.requests, clients=args.clients, **options))
                bare.append(load.run(bare_url, requests=args.requests, clients=args.clients, **options))
            ours_f, bare_f = median_figures(ours), median_figures(bare)
            print(row(f"{title}: DevOps Hub", ours_f))
            print(row(f"{title}: bare baseline", bare_f))
            ratios.append((title, ours_f, bare_f))
        print("\n| path | req/s ratio (hub / bare) | p99 ratio (hub / bare) |")
        print("|---|---|---|")
        for title, ours_f, bare_f in ratios:
            print(f"| {title} | {ours_f.rps / bare_f.rps:.2f} | {ours_f.p99_ms / bare_f.p99_ms:.2f} |")
    finally:
        for proc in processes:
            proc.send_signal(signal.SIGTERM)
        for proc in processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
