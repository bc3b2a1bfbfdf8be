"""Hot reads through the edge cache while another agent is written: precise invalidation.

    python -m bench.edge_writes [--rounds 3] [--requests 10000] [--writes-per-second 20]

Starts `make run`'s stack (bench.run.started_stack) and a gateway beside it with the
edge cache on (bench.run.edge_gateway), makes one agent hot, then alternates rounds,
side by side: hey's GETs of the hot agent alone, and the same GETs while a writer
PATCHes *another* agent through the same gateway N times a second. A write drops
exactly the answers it made stale (the agent it wrote, the lists): the hot agent's
answer stays held, so its throughput should not fall (issue 17: at least 0.85 of the
read-only figure). Prints the table bench/RESULTS.md records.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench import load
from bench.run import ADMIN_KEY, AGENT_ID, edge_gateway, start, started_stack, stop
from devstack.ports import wait_for_port

WRITTEN = f"{AGENT_ID}-1"


def writer(gateway: str, per_second: float, stop_event: threading.Event, counts: list[int]) -> None:
    """PATCHes the other agent at a steady rate until told to stop."""
    with httpx.Client(base_url=gateway, headers={"x-api-key": ADMIN_KEY}, timeout=10) as http:
        n = 0
        next_at = time.monotonic()
        while not stop_event.is_set():
            n += 1
            answer = http.patch(f"/api/agents/{WRITTEN}", params={"updateMask": "description"}, json={"description": str(n)})
            counts[0 if answer.status_code == 200 else 1] += 1
            next_at += 1 / per_second
            time.sleep(max(0.0, next_at - time.monotonic()))


def reads(url: str, requests: int, clients: int) -> load.Figures:
    return load.hey(url, requests=requests, clients=clients)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--writes-per-second", type=float, default=20.0)
    args = parser.parse_args()
    if load.missing("hey"):
        print(load.missing("hey"), file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as directory, started_stack(Path(directory)) as stack:
        port, env, how = edge_gateway(stack.env)
        gateway = start([sys.executable, "-m", "gateway"], env)
        try:
            wait_for_port(port, timeout=60)
            edge = f"http://127.0.0.1:{port}"
            hot = f"{edge}/api/agents/{AGENT_ID}"
            for _ in range(50):
                httpx.get(hot, timeout=10)
            alone: list[load.Figures] = []
            written: list[load.Figures] = []
            writes = [0, 0]
            for _ in range(args.rounds):
                alone.append(reads(hot, args.requests, args.clients))
                stop_event = threading.Event()
                thread = threading.Thread(target=writer, args=(edge, args.writes_per_second, stop_event, writes))
                thread.start()
                try:
                    written.append(reads(hot, args.requests, args.clients))
                finally:
                    stop_event.set()
                    thread.join()
        finally:
            stop([gateway])
    print(f"edge gateway: {how}; {args.rounds} alternating rounds of hey -n {args.requests} -c {args.clients}")
    print("| side | req/s (median) | p95 ms | non-2xx |")
    print("|---|---|---|---|")
    for name, runs in (("hot GET alone", alone), (f"hot GET, another agent written {args.writes_per_second:g}/s", written)):
        print(f"| {name} | {statistics.median(r.rps for r in runs):,.0f} | {statistics.median(r.p95_ms for r in runs):.1f} "
              f"| {sum(r.errors for r in runs)} |")
    ratio = statistics.median(r.rps for r in written) / statistics.median(r.rps for r in alone)
    print(f"\nratio with writes / alone: {ratio:.2f} (target ≥ 0.85); writes answered 200: {writes[0]}, other: {writes[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
