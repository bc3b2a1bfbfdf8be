"""What a write costs: CPU per PATCH /api/agents/{id} through the gateway, every process.

Starts the stack as bench/run.py does (launcher, SQLite, memory cache) and, in
alternating rounds so that machine noise hits both alike, loads it with hey:

- PATCH /api/agents/{id} (an admin key, a JSON body, an update mask): the row, its
  event and its invalidation log entry in one transaction, the relay's Sync of the
  sidecar, the sidecar's Watch to every near-cache;
- GET /api/agents/{id} with `cache-control: no-cache` (a read of the same row from the
  database, every cache layer bypassed and refilled), the yardstick: what one request
  through the same gateway and service, with one SQLite statement, costs.

Each round reads from /proc the CPU time of every process of the stack (gateway,
agents service, cache sidecar, workflows service, launcher) per request, and prints
the medians by process, the PATCH / GET ratio and the target (issue 18:
≤ 1.5 ms per PATCH). --profile adds a py-spy profile of each process under the PATCH
load: the frames that were on CPU themselves, by share.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import load
from bench.run import (
    ADMIN_KEY,
    AGENT_ID,
    HUB_PROCESSES,
    Measured,
    Side,
    compare,
    own_time,
    process_named,
    record_profile,
    started_stack,
)

CPU_TARGET_MS = 1.5
# A change that touches a column, so every PATCH really writes (and emits its event).
BODY = json.dumps({"description": "patched by bench/write_cpu.py"})


def hey_patch(url: str, requests: int, clients: int) -> load.Figures:
    command = ["hey", "-n", str(requests), "-c", str(clients), "-m", "PATCH", "-d", BODY,
               "-T", "application/json", "-H", f"x-api-key: {ADMIN_KEY}", url]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600).stdout
    return load.hey_figures(output, requests)


def hey_fresh_get(url: str, requests: int, clients: int) -> load.Figures:
    return load.hey(url, requests=requests, clients=clients, headers={"cache-control": "no-cache"})


def profile(pids: list[int], url: str, args: argparse.Namespace) -> None:
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        print("\nNo profile: py-spy is not installed (pip install py-spy).")
        return
    targets = {module: process_named(pids, module) for module in HUB_PROCESSES[:3]}
    with tempfile.TemporaryDirectory() as tmp:
        recorders = [
            record_profile(py_spy, pid, Path(f"{tmp}/{pid}.txt"), args.profile_seconds) for pid in targets.values() if pid is not None
        ]
        time.sleep(1)
        deadline = time.monotonic() + args.profile_seconds - 1
        while time.monotonic() < deadline:
            hey_patch(url, 500, args.concurrency)
        for recorder in recorders:
            recorder.wait(timeout=60)
        print(f"\n## Where a PATCH's CPU goes: py-spy, {args.profile_seconds}s under hey -c {args.concurrency}\n")
        for module, pid in targets.items():
            path = Path(f"{tmp}/{pid}.txt")
            if pid is None or not path.exists():
                print(f"{module}: no profile recorded\n")
                continue
            print(f"{module} (own time of the top frames):\n\n| share | frame |\n|---|---|")
            for frame, share in own_time(path.read_text(), args.profile_top):
                print(f"| {share:.1%} | `{frame}` |")
            print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per round and side")
    parser.add_argument("--concurrency", type=int, default=8, help="hey's concurrent clients")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="add a py-spy profile of the PATCH load")
    parser.add_argument("--profile-seconds", type=int, default=10)
    parser.add_argument("--profile-top", type=int, default=20)
    args = parser.parse_args()
    if why := load.missing("hey"):
        raise SystemExit(why)
    directory = Path(tempfile.mkdtemp(prefix="dh-write-bench-"))
    try:
        with started_stack(directory) as stack:
            url = f"{stack.gateway}/api/agents/{AGENT_ID}"
            sides = [
                Side("PATCH /api/agents/{id} ?updateMask=description", f"{url}?updateMask=description", lambda: stack.pids),
                Side("GET /api/agents/{id}, cache-control: no-cache", url, lambda: stack.pids),
            ]
            runs = {sides[0].url: hey_patch, sides[1].url: hey_fresh_get}
            patch, get = compare(
                sides,
                lambda target: runs[target](target, args.requests, args.concurrency),
                args.rounds,
                lambda target: runs[target](target, 300, args.concurrency),
            )
            report(sides, [patch, get], args)
            if args.profile:
                profile(stack.pids, sides[0].url, args)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


def report(sides: list[Side], results: list[Measured], args: argparse.Namespace) -> None:
    print(f"# Write CPU: {args.rounds} alternating rounds of hey -n {args.requests} -c {args.concurrency} per side\n")
    print("| side | req/s | p50 ms | p95 ms | non-2xx | CPU ms / request | " + " | ".join(HUB_PROCESSES) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(HUB_PROCESSES))
    for side, m in zip(sides, results):
        f = m.figures
        print(f"| {side.name} | {f.rps:,.0f} | {f.p50_ms:.2f} | {f.p95_ms:.2f} | {f.errors} | {m.cpu_ms:.3f} | "
              + " | ".join(f"{m.by_process.get(name, 0.0):.3f}" for name in HUB_PROCESSES) + " |")
    patch, get = results
    print("\n| figure | measured | target |\n|---|---|---|")
    print(f"| PATCH CPU per request, every process | {patch.cpu_ms:.3f} ms | ≤ {CPU_TARGET_MS} ms "
          f"({'met' if patch.cpu_ms <= CPU_TARGET_MS else '**missed**'}) |")
    print(f"| PATCH CPU / fresh GET CPU | {patch.cpu_ms / max(get.cpu_ms, 1e-9):.2f} | |")
    print(f"| PATCH CPU / target | {patch.cpu_ms / CPU_TARGET_MS:.2f} | ≤ 1 |")


if __name__ == "__main__":
    sys.exit(main())
