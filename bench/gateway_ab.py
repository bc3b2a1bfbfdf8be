"""The gateway of this tree against the gateway of a git revision, in one run.

    python -m bench.gateway_ab --base <revision> [--rounds 5] [--requests 5000]

A change to the hot path is kept when it pays, and on a shared machine only figures
taken side by side can say so: this starts one stack (as bench/run.py does), a
second gateway process from `git archive <revision>` in a temporary directory,
pointed at the same services, and loads both gateways in alternating rounds of
`hey -c 100` on the same paths. It prints each gateway process's own CPU time per
request (from /proc) and its throughput, and their ratios.
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
from pathlib import Path

from bench import cpu, load
from bench.run import AGENT_ID, ROOT, free_port, process_named, started_stack, wait_port


def archive(revision: str, into: Path) -> None:
    """The gateway and services packages as they were at `revision`."""
    data = subprocess.run(
        ["git", "archive", revision, "gateway", "services"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the git revision whose gateway to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    why = load.missing("hey")
    if why:
        raise SystemExit(why)
    with tempfile.TemporaryDirectory(prefix="dh-ab-") as tmp, started_stack(Path(tmp)) as stack:
        base_tree = Path(tmp) / "base"
        archive(args.base, base_tree)
        port = free_port()
        env = dict(stack.env, GATEWAY_PORT=str(port), PYTHONPATH=os.pathsep.join([str(base_tree), str(ROOT / "gen")]))
        base = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=base_tree, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            wait_port(port)
            gateways = {
                "this tree": (stack.gateway, process_named(stack.pids, "gateway")),
                f"base {args.base}": (f"http://127.0.0.1:{port}", base.pid),
            }
            print(f"# gateway A/B: {args.rounds} alternating rounds of hey -n {args.requests} -c {args.concurrency}\n")
            print("| path | gateway | req/s | p95 ms | gateway CPU ms / request |")
            print("|---|---|---|---|---|")
            for path in ("/api/agents", f"/api/agents/{AGENT_ID}"):
                figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in gateways}
                for url, _ in gateways.values():
                    load.hey(url + path, requests=2000, clients=args.concurrency)
                for _ in range(args.rounds):
                    for name, (url, pid) in gateways.items():
                        before = cpu.cpu_seconds([pid])
                        result = load.hey(url + path, requests=args.requests, clients=args.concurrency)
                        used = (cpu.cpu_seconds([pid]) - before) * 1000 / result.requests
                        figures[name].append((result.rps, result.p95_ms, used))
                medians = {name: [statistics.median(run[i] for run in runs) for i in range(3)] for name, runs in figures.items()}
                for name, (rps, p95, cpu_ms) in medians.items():
                    print(f"| GET {path} | {name} | {rps:,.0f} | {p95:.1f} | {cpu_ms:.3f} |")
                (ours, base_figures) = medians.values()
                print(f"| GET {path} | this / base | {ours[0] / base_figures[0]:.2f} | {ours[1] / base_figures[1]:.2f} "
                      f"| {ours[2] / base_figures[2]:.2f} |")
        finally:
            base.terminate()
            base.wait(timeout=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
