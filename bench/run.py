"""`make bench`: the stack against bare baselines, side by side in one run.

Starts the whole stack as `make run` does (launcher, SQLite, memory cache, the
default access rules and limits) and the baselines of bench/baselines.py, which
serve the very answers the stack gave. Then, in alternating rounds so that machine
noise hits every side alike:

- the performance guide's test, `hey -n 10000 -c 100`, on GET /api/agents and
  GET /api/agents/{id}: the hub through a second gateway with the edge cache on (its
  limits in Redis, BENCH_REDIS_URL), the hub through the launcher's gateway (edge
  cache off: limits in memory), a bare HTTP -> gRPC hop, and a bare uvicorn handler
  returning constant bytes (the floor of any HTTP front);
- a hot gRPC GetAgent, straight to the agents service, against a bare grpc.aio
  servicer (h2load with gRPC framing; both on uvloop).

Each run also reads, from /proc, the CPU time every process of its side used (all
of the hub's processes; both baseline processes for the hop), per request. It
prints the medians, the ratios and the targets; --profile adds where the hub's
processes spend their CPU during one more round (py-spy, sampling).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
from devops_hub.v1 import agents_pb2, agents_pb2_grpc

from bench import baselines, cpu, load
from services.common.api import method_path
from services.common.auth import keys
from services.common.channels import service_address
from services.common.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
AGENT_ID = "bench-agent"
# With the five built-in agents, a list of 14: the size of the guide's own list.
OTHER_AGENTS = 8
ADMIN_KEY = keys.new_key()
AGENTS_SERVICE = agents_pb2.DESCRIPTOR.services_by_name["AgentsService"]

HUB_PROCESSES = ("gateway", "services.agents", "services.cache.sidecar", "services.workflows", "services.launcher")

# The targets, for the last table.
CPU_TARGET_MS = 0.30
FLOOR_RATIO_TARGET = 0.6
P95_TARGET_MS = 30.0
GRPC_RATIO_TARGET = 0.8


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on (bound, then released); the tests use it too.

    Drawn below the kernel's ephemeral range (32768 and up), where outgoing connections
    and other programs' bind(0) take theirs, and never twice in one process: a port
    freed by bind(0) is soon handed to someone else, and the stack that was meant to
    listen there finds another server on it. Each pytest-xdist worker draws from a
    range of its own."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    low = 12000 + (worker % 8) * 2500
    while True:
        port = random.randrange(low, low + 2500)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port


def local_stack_env(database_url: str) -> dict[str, str]:
    """This environment with the whole stack on free loopback ports, on `database_url`
    and the memory cache (no REDIS_URL): what the bench, the load test and the tests
    that start `python -m services.launcher` each start from."""
    env = dict(os.environ)
    env.pop("REDIS_URL", None)
    env.update(
        DATABASE_URL=database_url,
        AGENTS_ADDR=f"127.0.0.1:{free_port()}",
        WORKFLOWS_ADDR=f"127.0.0.1:{free_port()}",
        CACHE_ADDR=f"127.0.0.1:{free_port()}",
        GATEWAY_PORT=str(free_port()),
    )
    return env


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def start(command: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen:
    """Each process in a session of its own, as the launcher starts the services: with
    the kernel's autogroup scheduling, a session is a share of the CPU, and every side
    must get the same kind of share for throughputs taken side by side to compare."""
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )


@dataclass
class Stack:
    env: dict[str, str]
    gateway: str
    # The launcher and every process it started.
    pids: list[int]


@contextlib.contextmanager
def started_stack(directory: Path) -> Iterator[Stack]:
    """The whole stack as `make run` starts it (on a database in `directory`), with the
    bench's agents created, stopped on the way out."""
    env = local_stack_env(f"sqlite:///{directory}/bench.db")
    env.update(
        LOG_LEVEL="WARNING",
        # Otherwise as `make run`: anonymous reads, key checks and the default limits.
        BOOTSTRAP_ADMIN_KEY=ADMIN_KEY,
        # Set here (the launcher would make one) so the bench's own gateway has it too.
        SERVICE_API_KEY=keys.new_key(),
        AGENTS_METRICS_PORT="0",
        WORKFLOWS_METRICS_PORT="0",
        CACHE_METRICS_PORT="0",
    )
    for name in ("RATE_LIMIT_REQUESTS", "RATE_LIMIT_WINDOW", "WORKERS"):
        env.pop(name, None)
    launcher = start([sys.executable, "-m", "services.launcher"], env)
    try:
        wait_port(int(env["GATEWAY_PORT"]), timeout=120)
        gateway = f"http://127.0.0.1:{env['GATEWAY_PORT']}"
        agents = [{"agent": {"id": AGENT_ID, "name": "Bench agent", "domain": "bench", "capabilities": ["lint", "test"]}}]
        agents += [
            {"agent": {"id": f"{AGENT_ID}-{n}", "name": f"Bench agent {n}", "domain": "bench", "capabilities": ["lint"]}}
            for n in range(1, OTHER_AGENTS + 1)
        ]
        created = httpx.post(f"{gateway}/api/agents:batchCreate", json={"requests": agents},
                             headers={"x-api-key": ADMIN_KEY}, timeout=10)
        created.raise_for_status()
        yield Stack(env, gateway, cpu.descendants(launcher.pid))
    finally:
        stop([launcher])


def stop(processes: list[subprocess.Popen]) -> None:
    for proc in processes:
        proc.send_signal(signal.SIGTERM)
    for proc in processes:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class Side:
    name: str
    url: str
    # The processes whose CPU time this side's requests cost.
    pids: Callable[[], list[int]]


@dataclass
class Measured:
    figures: load.Figures
    cpu_ms: float  # CPU milliseconds per request, every process of the side together
    by_process: dict[str, float]  # the same, per process (by the module it runs)


def measure(side: Side, run: Callable[[str], load.Figures]) -> Measured:
    pids = side.pids()
    before = {pid: cpu.cpu_seconds([pid]) for pid in pids}
    figures = run(side.url)
    per_request = 1000 / max(1, figures.requests)
    by_process: dict[str, float] = {}
    for pid, seconds in before.items():
        name = module_of(pid)
        by_process[name] = by_process.get(name, 0.0) + (cpu.cpu_seconds([pid]) - seconds) * per_request
    return Measured(figures, sum(by_process.values()), by_process)


def median(runs: list[Measured]) -> Measured:
    figures = load.Figures(
        requests=sum(r.figures.requests for r in runs),
        rps=statistics.median(r.figures.rps for r in runs),
        p50_ms=statistics.median(r.figures.p50_ms for r in runs),
        p95_ms=statistics.median(r.figures.p95_ms for r in runs),
        p99_ms=statistics.median(r.figures.p99_ms for r in runs),
        errors=sum(r.figures.errors for r in runs),
    )
    names = runs[0].by_process
    return Measured(
        figures,
        statistics.median(r.cpu_ms for r in runs),
        {name: statistics.median(r.by_process.get(name, 0.0) for r in runs) for name in names},
    )


def compare(sides: list[Side], run: Callable[[str], load.Figures], rounds: int, warm_up: Callable[[str], object]) -> list[Measured]:
    for side in sides:
        warm_up(side.url)
    results: list[list[Measured]] = [[] for _ in sides]
    for _ in range(rounds):
        for index, side in enumerate(sides):
            results[index].append(measure(side, run))
    return [median(runs) for runs in results]


def row(name: str, m: Measured) -> str:
    f = m.figures
    return (f"| {name} | {f.requests} | {f.rps:,.0f} | {f.p50_ms:.2f} | {f.p95_ms:.2f} | {f.p99_ms:.2f} "
            f"| {f.errors} | {m.cpu_ms:.3f} |")


def verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def edge_gateway(env: dict[str, str]) -> tuple[int, dict[str, str], str]:
    """A second gateway on the stack's services with the edge cache on: its rate
    limits shared in Redis (BENCH_REDIS_URL, default the local one) as the edge cache
    requires, or, without a Redis, its limits off (the services keep theirs)."""
    port = free_port()
    edge_env = dict(env, GATEWAY_PORT=str(port), GATEWAY_EDGE_CACHE_SIZE="1024")
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    host, _, rest = redis_url.removeprefix("redis://").partition(":")
    try:
        socket.create_connection((host, int(rest.partition("/")[0] or 6379)), timeout=1).close()
    except OSError:
        edge_env.update(RATE_LIMIT_REQUESTS="0", RATE_LIMIT_EXECUTE_REQUESTS="0")
        return port, edge_env, "the gateway's limits off: no Redis"
    edge_env.update(REDIS_URL=redis_url, REDIS_KEY_PREFIX=f"dhbench:{os.getpid()}:")
    return port, edge_env, "limits in Redis"


def write_answers(gateway: str, agents: str, directory: Path) -> None:
    """What the hub answers, for the baselines to answer the same."""
    (directory / baselines.LIST_JSON).write_bytes(httpx.get(f"{gateway}/api/agents", timeout=10).content)
    (directory / baselines.AGENT_JSON).write_bytes(httpx.get(f"{gateway}/api/agents/{AGENT_ID}", timeout=10).content)
    with grpc.insecure_channel(agents) as channel:
        stub = agents_pb2_grpc.AgentsServiceStub(channel)
        listed = stub.ListAgents(agents_pb2.ListAgentsRequest(), timeout=10)
        agent = stub.GetAgent(agents_pb2.GetAgentRequest(id=AGENT_ID), timeout=10)
    (directory / baselines.LIST_PB).write_bytes(listed.SerializeToString())
    (directory / baselines.AGENT_PB).write_bytes(agent.SerializeToString())


def module_of(pid: int) -> str:
    """The module a `python -m` process runs (`gateway`, `services.agents`, ...)."""
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return "gone"
    if b"-m" in arguments[:-1]:
        return arguments[arguments.index(b"-m") + 1].decode()
    return Path(arguments[0].decode()).name


def process_named(pids: list[int], module: str) -> int | None:
    return next((pid for pid in pids if module_of(pid) == module), None)


def own_time(raw: str, top: int) -> list[tuple[str, float]]:
    """py-spy's collapsed stacks -> the frames that were on CPU themselves, by share."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[stack.rsplit(";", 1)[-1]] += int(count)
    total = sum(counts.values()) or 1
    return [(frame, n / total) for frame, n in counts.most_common(top)]


def profile(hub_pids: list[int], url: str, args: argparse.Namespace) -> None:
    """py-spy on the gateway and the agents service while one more hey round runs."""
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    why = load.missing("hey") or (None if py_spy else "py-spy is not installed (pip install py-spy)")
    if why or py_spy is None:
        print(f"\nNo profile: {why}.")
        return
    targets = {name: process_named(hub_pids, module) for name, module in (("gateway", "gateway"), ("agents service", "services.agents"))}
    with tempfile.TemporaryDirectory() as tmp:
        recorders = {
            name: subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "--nonblocking",
                 "--output", f"{tmp}/{pid}.txt", "--duration", str(args.profile_seconds)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for name, pid in targets.items() if pid is not None
        }
        time.sleep(1)
        deadline = time.monotonic() + args.profile_seconds - 1
        while time.monotonic() < deadline:
            load.hey(url, requests=2000, clients=args.concurrency)
        for recorder in recorders.values():
            recorder.wait(timeout=60)
        print(f"\n## Where the CPU goes: py-spy, {args.profile_seconds}s of GET {url.split('/', 3)[-1]} under hey -c {args.concurrency}\n")
        for name, pid in targets.items():
            path = Path(f"{tmp}/{pid}.txt")
            if pid is None or not path.exists():
                print(f"{name}: no profile recorded")
                continue
            print(f"{name} (own time of the top frames):\n")
            print("| share | frame |\n|---|---|")
            for frame, share in own_time(path.read_text(), args.profile_top):
                print(f"| {share:.1%} | `{frame}` |")
            print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10000, help="requests per hey round and side (the guide: 10000)")
    parser.add_argument("--concurrency", type=int, default=100, help="hey's concurrent clients (the guide: 100)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--grpc-requests", type=int, default=20000, help="requests per gRPC round and side")
    parser.add_argument("--clients", type=int, default=16, help="h2load connections for the gRPC rows")
    parser.add_argument("--streams", type=int, default=8, help="h2load concurrent streams per connection")
    parser.add_argument("--profile", action="store_true", help="add a py-spy profile of the hub's hot GET")
    parser.add_argument("--profile-seconds", type=int, default=15)
    parser.add_argument("--profile-top", type=int, default=15)
    args = parser.parse_args()
    no_hey, no_h2load = load.missing("hey"), load.missing("h2load")
    if no_hey and no_h2load:
        raise SystemExit(f"nothing to load with: {no_hey}; {no_h2load}")

    answers = Path(tempfile.mkdtemp(prefix="dh-bench-"))
    processes: list[subprocess.Popen] = []
    try:
        with started_stack(answers) as stack:
            run_bench(stack, answers, processes, args, no_hey, no_h2load)
    finally:
        stop(processes)
        shutil.rmtree(answers, ignore_errors=True)
    return 0


def run_bench(
    stack: Stack, answers: Path, processes: list[subprocess.Popen], args: argparse.Namespace,
    no_hey: str | None, no_h2load: str | None,
) -> None:
    gateway, env = stack.gateway, stack.env
    agents = service_address(AGENTS_SERVICE, Settings.from_env(env))
    write_answers(gateway, agents, answers)
    ports = {name: free_port() for name in ("bare_grpc", "bare_http", "bare_json")}
    bare = {
        "bare_grpc": ["grpc"],
        "bare_http": ["http", "--grpc-target", f"127.0.0.1:{ports['bare_grpc']}"],
        "bare_json": ["json"],
    }
    started = {}
    for name, kind in bare.items():
        started[name] = start(
            [sys.executable, "-m", "bench.baselines", *kind, "--port", str(ports[name]), "--answers", str(answers)], env
        )
        processes.append(started[name])
        wait_port(ports[name])
    hub_pids = stack.pids
    edge_port, edge_env, edge_label = edge_gateway(env)
    started["edge"] = start([sys.executable, "-m", "gateway"], edge_env)
    processes.append(started["edge"])
    wait_port(edge_port, timeout=120)
    edge_url = f"http://127.0.0.1:{edge_port}"
    # The launcher's gateway has the edge cache off (limits kept in memory, no
    # REDIS_URL); the other side swaps it for the gateway that has it on.
    launched_gateway = process_named(hub_pids, "gateway")
    edge_pids = [pid for pid in hub_pids if pid != launched_gateway] + [started["edge"].pid]

    def hub() -> list[int]:
        return hub_pids

    print(f"# DevOps Hub bench: {args.rounds} alternating rounds per side, {os.cpu_count()} cores\n")
    print("| path: side | requests | req/s | p50 ms | p95 ms | p99 ms | non-2xx | CPU ms / request |")
    print("|---|---|---|---|---|---|---|---|")
    http_results: dict[str, list[Measured]] = {}
    breakdowns: list[tuple[str, Measured]] = []
    if no_hey:
        print(f"| HTTP rows skipped: {no_hey} | | | | | | | |")
    else:
        for path in ("/api/agents", f"/api/agents/{AGENT_ID}"):
            sides = [
                Side(f"DevOps Hub, edge cache ({edge_label})", f"{edge_url}{path}", lambda: edge_pids),
                Side("DevOps Hub, edge cache off", f"{gateway}{path}", hub),
                Side("bare HTTP -> gRPC hop", f"http://127.0.0.1:{ports['bare_http']}{path}",
                     lambda: [started["bare_http"].pid, started["bare_grpc"].pid]),
                Side("bare uvicorn constant JSON", f"http://127.0.0.1:{ports['bare_json']}{path}",
                     lambda: [started["bare_json"].pid]),
            ]
            results = compare(
                sides,
                lambda url: load.hey(url, requests=args.requests, clients=args.concurrency),
                args.rounds,
                lambda url: load.hey(url, requests=2000, clients=args.concurrency),
            )
            title = f"hey -n {args.requests} -c {args.concurrency} GET {path}"
            for side, result in zip(sides, results):
                print(row(f"{title}: {side.name}", result))
            http_results[path] = results
            breakdowns.extend((f"{title}: {side.name}", result) for side, result in zip(sides[:2], results))
    grpc_results: list[Measured] = []
    if no_h2load:
        print(f"| gRPC rows skipped: {no_h2load} | | | | | | | |")
    else:
        body = load.grpc_frame(agents_pb2.GetAgentRequest(id=AGENT_ID))
        method = method_path(AGENTS_SERVICE.methods_by_name["GetAgent"])
        sides = [
            Side("DevOps Hub agents service", f"http://{agents}{method}", hub),
            Side("bare grpc.aio servicer", f"http://127.0.0.1:{ports['bare_grpc']}{method}",
                 lambda: [started["bare_grpc"].pid]),
        ]
        options = dict(body=body, clients=args.clients, streams=args.streams)
        grpc_results = compare(
            sides,
            lambda url: load.run(url, requests=args.grpc_requests, **options),
            args.rounds,
            lambda url: load.run(url, requests=2000, **options),
        )
        title = f"h2load gRPC GetAgent (hot), {args.clients} x {args.streams} streams"
        for side, result in zip(sides, grpc_results):
            print(row(f"{title}: {side.name}", result))
        breakdowns.append((title, grpc_results[0]))

    print("\n| the hub's CPU ms per request, by process | " + " | ".join(HUB_PROCESSES) + " |")
    print("|---|" + "---|" * len(HUB_PROCESSES))
    for title, result in breakdowns:
        print(f"| {title} | " + " | ".join(f"{result.by_process.get(name, 0.0):.3f}" for name in HUB_PROCESSES) + " |")

    print("\n| target | measured | target | |")
    print("|---|---|---|---|")
    for path, (ours, _, hop, floor) in http_results.items():
        print(f"| GET {path}: CPU per request, every hub process | {ours.cpu_ms:.3f} ms | ≤ {CPU_TARGET_MS:.2f} ms "
              f"| {verdict(ours.cpu_ms <= CPU_TARGET_MS)} |")
        ratio = ours.figures.rps / floor.figures.rps
        print(f"| GET {path}: req/s, hub / bare constant JSON | {ratio:.2f} | ≥ {FLOOR_RATIO_TARGET} "
              f"| {verdict(ratio >= FLOOR_RATIO_TARGET)} |")
        print(f"| GET {path}: p95 at c={args.concurrency} | {ours.figures.p95_ms:.1f} ms | < {P95_TARGET_MS:.0f} ms "
              f"| {verdict(ours.figures.p95_ms < P95_TARGET_MS)} |")
        print(f"| GET {path}: answers other than 200 | {ours.figures.errors} | 0 | {verdict(ours.figures.errors == 0)} |")
        print(f"| GET {path}: req/s, hub / bare HTTP -> gRPC hop (reported) | {ours.figures.rps / hop.figures.rps:.2f} "
              f"| | |")
    if grpc_results:
        ours, bare_servicer = grpc_results
        ratio = ours.figures.rps / bare_servicer.figures.rps
        print(f"| gRPC GetAgent: req/s, hub / bare grpc.aio | {ratio:.2f} | ≥ {GRPC_RATIO_TARGET} "
              f"| {verdict(ratio >= GRPC_RATIO_TARGET)} |")
    if args.profile:
        profile(hub_pids, f"{gateway}/api/agents/{AGENT_ID}", args)


if __name__ == "__main__":
    sys.exit(main())
