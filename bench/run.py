"""`make bench`: the hub against a bare ASGI app, side by side in one run (issue 18).

    python -m bench.run [--quick] [--configs plain,redis,workers2] [--chart bench/results.png]

For each configuration it starts the hub as `make run` does (devstack.launcher: SQLite,
the default access rules and limits) with that configuration's environment:

- `plain`: nothing more (the memory cache, the limits in each process's memory, the
  gateway's edge cache on);
- `redis`: REDIS_URL set, to a redis-server of the bench's own on a free port (whose
  CPU counts as the hub's): the cache and the limits' reports in Redis;
- `workers2`: WORKERS=2, two processes of each part on one port.

Beside it runs the bare side (bench/baselines.py): a raw ASGI callable on uvicorn with
the gateway's own server settings, as many processes as the hub has gateway
processes, sending the hub's own bytes and headers; and, in the plain configuration, a
bare grpc.aio servicer for the hot gRPC GetAgent. Then, in alternating rounds so that
machine noise hits both sides alike:

- the guide's test, `hey -n 10000 -c 100`, on GET /api/agents/{id} and GET
  /api/agents (every answer other than a 200 counted);
- `wrk -t12 -c400 -d30s` on GET /api/agents (p95 from wrk's latency histogram; non-2xx,
  socket errors and timeouts counted);
- in the plain configuration, h2load with gRPC framing on a hot GetAgent.

Every load also reads, from /proc, the CPU time all the processes of its side used
(the launcher and every process below it, and the hub's Redis), per request. It prints
the tables bench/RESULTS.md records, checks the issue's targets, writes the chart
(bench/chart.py), and, where a target is missed, profiles the hub's gateway and agents
service with py-spy during one more hey run per path (plain and redis; workers2 runs
plain's code). Each ratio is the median of the rounds' ratios. A full run takes about ten
minutes; --quick is a smoke run of a minute or two (small loads, one round, no profile).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from devops_hub.v1 import agents_pb2, agents_pb2_grpc

from bench import baselines, chart, cpu, load
from devstack.ports import free_port, local_stack_env, wait_for_port
from services.common.auth import keys
from services.common.contract.api import method_path
from services.common.foundation.settings import Settings
from services.common.transport.channels import service_address

ROOT = Path(__file__).resolve().parent.parent
AGENT_ID = "bench-agent"
# With the five built-in agents, a list of 14: the size of the guide's own list.
OTHER_AGENTS = 8
ADMIN_KEY = keys.new_key()
AGENTS_SERVICE = agents_pb2.DESCRIPTOR.services_by_name["AgentsService"]
PATHS = (f"/api/agents/{AGENT_ID}", "/api/agents")
# The guide's wrk run is on the list.
WRK_PATH = "/api/agents"
CONFIGS = ("plain", "redis", "workers2")
TOOLS = ("hey", "wrk", "h2load")

# The targets (issue 18), on a hot GET.
CPU_TARGET_MS = 0.10
RATIO_TARGET = 0.5
P95_TARGET_MS = 20.0
WRK_P95_TARGET_MS = 100.0


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
    launcher: int

    @property
    def pids(self) -> list[int]:
        """The launcher and every process it started, read anew: with WORKERS, a part's
        processes may still be starting when the gateway's port first answers."""
        return cpu.descendants(self.launcher)


@contextlib.contextmanager
def started_stack(directory: Path, extra_env: Mapping[str, str] | None = None) -> Iterator[Stack]:
    """The whole stack as `make run` starts it (on a database in `directory`, with
    `extra_env` on top), with the bench's agents created, stopped on the way out."""
    env = local_stack_env(f"sqlite:///{directory}/bench.db")
    env.update(
        LOG_LEVEL="WARNING",
        # Otherwise as `make run`: anonymous reads, key checks and the default limits.
        BOOTSTRAP_ADMIN_KEY=ADMIN_KEY,
        # Set here (the launcher would make one) so that a gateway the bench adds has it too.
        SERVICE_API_KEY=keys.new_key(),
        AGENTS_METRICS_PORT="0",
        WORKFLOWS_METRICS_PORT="0",
        CACHE_METRICS_PORT="0",
    )
    for name in ("RATE_LIMIT_REQUESTS", "RATE_LIMIT_WINDOW", "WORKERS"):
        env.pop(name, None)
    env.update(extra_env or {})
    launcher = start([sys.executable, "-m", "devstack.launcher"], env)
    try:
        wait_for_port(int(env["GATEWAY_PORT"]), timeout=120)
        gateway = f"http://127.0.0.1:{env['GATEWAY_PORT']}"
        agents = [{"agent": {"id": AGENT_ID, "name": "Bench agent", "domain": "bench", "capabilities": ["lint", "test"]}}]
        agents += [
            {"agent": {"id": f"{AGENT_ID}-{n}", "name": f"Bench agent {n}", "domain": "bench", "capabilities": ["lint"]}}
            for n in range(1, OTHER_AGENTS + 1)
        ]
        created = httpx.post(f"{gateway}/api/agents:batchCreate", json={"requests": agents},
                             headers={"x-api-key": ADMIN_KEY}, timeout=10)
        created.raise_for_status()
        yield Stack(env, gateway, launcher.pid)
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
class Measured:
    figures: load.Figures
    cpu_ms: float  # CPU milliseconds per request, every process of the side together
    by_process: dict[str, float]  # the same, per process kind (the module it runs)
    round_rps: list[float] = field(default_factory=list)  # each round's req/s, in order


@dataclass
class Pair:
    """One load on both sides of one configuration."""

    config: str
    load: str  # the command, as the tables print it
    short: str  # the same, for the chart's axis
    kind: str  # "hey", "wrk" or "grpc": which targets apply
    hub: Measured
    bare: Measured
    bare_name: str

    @property
    def ratio(self) -> float:
        """The median of each round's hub / bare ratio: the two runs of a round are next to
        each other in time, so a swing in the machine's load moves both."""
        pairs = list(zip(self.hub.round_rps, self.bare.round_rps)) or [(self.hub.figures.rps, self.bare.figures.rps)]
        return statistics.median(hub / bare if bare else 0.0 for hub, bare in pairs)


@dataclass
class ConfigResult:
    name: str
    environment: str
    pairs: list[Pair] = field(default_factory=list)
    profile: list[str] = field(default_factory=list)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure(pids: Callable[[], list[int]], run: Callable[[], load.Figures]) -> Measured:
    names = {pid: process_label(pid) for pid in pids()}
    before = {pid: cpu.cpu_seconds([pid]) for pid in names}
    figures = run()
    per_request = 1000 / max(1, figures.requests)
    by_process: dict[str, float] = {}
    for pid, seconds in before.items():
        # A process gone meanwhile reads as 0: count nothing rather than less than nothing.
        used = max(0.0, cpu.cpu_seconds([pid]) - seconds)
        by_process[names[pid]] = by_process.get(names[pid], 0.0) + used * per_request
    return Measured(figures, sum(by_process.values()), by_process, [figures.rps])


def median(runs: list[Measured]) -> Measured:
    """Medians of the rates, latencies and costs; sums of the requests and failures."""
    figures = load.Figures(
        requests=sum(r.figures.requests for r in runs),
        rps=statistics.median(r.figures.rps for r in runs),
        p50_ms=statistics.median(r.figures.p50_ms for r in runs),
        p95_ms=statistics.median(r.figures.p95_ms for r in runs),
        p99_ms=statistics.median(r.figures.p99_ms for r in runs),
        errors=sum(r.figures.errors for r in runs),
        socket_errors=sum(r.figures.socket_errors for r in runs),
        timeouts=sum(r.figures.timeouts for r in runs),
        statuses=dict(sum((Counter(r.figures.statuses) for r in runs), Counter())),
    )
    names = {name for r in runs for name in r.by_process}
    return Measured(
        figures,
        statistics.median(r.cpu_ms for r in runs),
        {name: statistics.median(r.by_process.get(name, 0.0) for r in runs) for name in sorted(names)},
        [rps for r in runs for rps in r.round_rps],
    )


def alternate(
    sides: list[tuple[str, Callable[[], list[int]]]], run: Callable[[int], load.Figures], rounds: int, what: str,
) -> list[Measured]:
    """`rounds` runs on each side (run(index of the side)), one side after the other in every round."""
    results: list[list[Measured]] = [[] for _ in sides]
    for number in range(rounds):
        for index, (name, pids) in enumerate(sides):
            results[index].append(measured := measure(pids, functools.partial(run, index)))
            log(f"  {what}, round {number + 1}/{rounds}, {name}: {measured.figures.rps:,.0f} req/s, "
                f"{measured.cpu_ms:.3f} CPU ms/request")
    return [median(runs) for runs in results]


# The hub's processes, the by-process columns of bench/grpc_hot.py and bench/write_cpu.py.
HUB_PROCESSES = ("gateway", "services.agents", "services.cache.sidecar", "services.workflows", "devstack.launcher")


@dataclass
class Side:
    """One side of a comparison by compare(): what to load, and the processes whose CPU
    time its requests cost."""

    name: str
    url: str
    pids: Callable[[], list[int]]


def compare(sides: list[Side], run: Callable[[str], load.Figures], rounds: int, warm_up: Callable[[str], object]) -> list[Measured]:
    """Each side warmed up, then loaded by run(its url) in alternating rounds."""
    for side in sides:
        warm_up(side.url)
    return alternate([(side.name, side.pids) for side in sides], lambda index: run(sides[index].url), rounds, "compare")


def row(name: str, m: Measured) -> str:
    f = m.figures
    return (f"| {name} | {f.requests} | {f.rps:,.0f} | {f.p50_ms:.2f} | {f.p95_ms:.2f} | {f.p99_ms:.2f} "
            f"| {f.errors} | {m.cpu_ms:.3f} |")


def write_answers(gateway: str, agents: str, directory: Path) -> None:
    """What the hub answers, for the baselines to answer the same."""
    for name, path in ((baselines.LIST_JSON, "/api/agents"), (baselines.AGENT_JSON, f"/api/agents/{AGENT_ID}")):
        answer = httpx.get(f"{gateway}{path}", timeout=10)
        answer.raise_for_status()
        baselines.write_answer(directory, name, answer.content, answer.headers.raw)
    with grpc.insecure_channel(agents) as channel:
        stub = agents_pb2_grpc.AgentsServiceStub(channel)
        listed = stub.ListAgents(agents_pb2.ListAgentsRequest(), timeout=10)
        agent = stub.GetAgent(agents_pb2.GetAgentRequest(id=AGENT_ID), timeout=10)
    (directory / baselines.LIST_PB).write_bytes(listed.SerializeToString())
    (directory / baselines.AGENT_PB).write_bytes(agent.SerializeToString())


@dataclass
class Options:
    requests: int
    concurrency: int
    rounds: int
    wrk_threads: int
    wrk_connections: int
    wrk_seconds: int
    grpc_requests: int
    clients: int
    streams: int
    profile_seconds: int
    profile_top: int


def bench_config(result: ConfigResult, stack: Stack, extra_pids: list[int], answers: Path, options: Options) -> None:
    """Every load of one configuration, on the hub and the bare side, into `result`."""
    env, config = stack.env, result.name
    settings = Settings.from_env(env)
    agents = service_address(AGENTS_SERVICE, settings)
    write_answers(stack.gateway, agents, answers)
    bare_port = free_port()
    # As many bare processes on one port as the hub has gateway processes.
    bare = [start([sys.executable, "-m", "bench.baselines", "asgi", "--port", str(bare_port), "--answers", str(answers)], env)
            for _ in range(max(1, settings.workers))]
    servicer: list[subprocess.Popen] = []
    try:
        wait_for_port(bare_port)
        bare_url = f"http://127.0.0.1:{bare_port}"

        def hub_pids() -> list[int]:
            return stack.pids + extra_pids

        def bare_pids() -> list[int]:
            return [proc.pid for proc in bare]

        sides = [("DevOps Hub", hub_pids), ("bare ASGI app", bare_pids)]
        urls = [stack.gateway, bare_url]
        for url in urls:
            for path in PATHS:
                load.hey(f"{url}{path}", requests=min(1000, options.requests), clients=options.concurrency)
        for path in PATHS:
            command = f"hey -n {options.requests} -c {options.concurrency} GET {path}"

            def hey(index: int, path: str = path) -> load.Figures:
                return load.hey(f"{urls[index]}{path}", requests=options.requests, clients=options.concurrency)

            hub, bare_side = alternate(sides, hey, options.rounds, f"[{config}] {command}")
            short = "GET /api/agents/{id}" if path != "/api/agents" else "GET /api/agents"
            result.pairs.append(Pair(config, command, f"hey {short}", "hey", hub, bare_side, "bare ASGI app"))
        command = f"wrk -t{options.wrk_threads} -c{options.wrk_connections} -d{options.wrk_seconds}s GET {WRK_PATH}"
        hub, bare_side = alternate(
            sides, lambda index: load.wrk(f"{urls[index]}{WRK_PATH}", threads=options.wrk_threads,
                                             connections=options.wrk_connections, seconds=options.wrk_seconds),
            1, f"[{config}] {command}",
        )
        result.pairs.append(Pair(config, command, "wrk GET /api/agents", "wrk", hub, bare_side, "bare ASGI app"))
        if config == "plain":
            grpc_port = free_port()
            servicer.append(start([sys.executable, "-m", "bench.baselines", "grpc", "--port", str(grpc_port),
                                   "--answers", str(answers)], env))
            wait_for_port(grpc_port)
            result.pairs.append(grpc_pair(config, agents, grpc_port, hub_pids, servicer[0], options))
        # workers2 runs plain's code in twice the processes: its profile would be plain's.
        if options.profile_seconds and config != "workers2" and any(not met for *_, met in targets(result)):
            result.profile = profile(stack.pids, stack.gateway, options)
    finally:
        stop(bare + servicer)


def grpc_pair(config: str, agents: str, port: int, hub_pids: Callable[[], list[int]], servicer: subprocess.Popen,
              options: Options) -> Pair:
    """A hot GetAgent straight to the agents service, against the bare grpc.aio servicer."""
    body = load.grpc_frame(agents_pb2.GetAgentRequest(id=AGENT_ID))
    method = method_path(AGENTS_SERVICE.methods_by_name["GetAgent"])
    urls = [f"http://{agents}{method}", f"http://127.0.0.1:{port}{method}"]
    for url in urls:
        load.run(url, requests=min(2000, options.grpc_requests), clients=options.clients, streams=options.streams, body=body)
    command = f"h2load gRPC GetAgent (hot), {options.grpc_requests} calls, {options.clients} x {options.streams} streams"
    hub, bare = alternate(
        [("DevOps Hub agents service", hub_pids), ("bare grpc.aio servicer", lambda: [servicer.pid])],
        lambda index: load.run(urls[index], requests=options.grpc_requests, clients=options.clients,
                                  streams=options.streams, body=body),
        options.rounds, f"[{config}] {command}",
    )
    return Pair(config, command, "gRPC GetAgent", "grpc", hub, bare, "bare grpc.aio servicer")


def failures(figures: load.Figures) -> str:
    """The answers other than a 200 (and those never answered), with their statuses."""
    others = ", ".join(f"{code} × {n:,}" for code, n in sorted(figures.statuses.items()) if code != 200)
    return f"{figures.errors:,}" + (f" ({others})" if others else "")


def verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def targets(result: ConfigResult) -> list[tuple[str, str, str, bool]]:
    """The issue's targets in one configuration: (what, measured, target, met)."""
    rows = []
    for pair in result.pairs:
        hub = pair.hub.figures
        if pair.kind == "hey":
            rows += [
                (f"{pair.load}: CPU per request, every hub process", f"{pair.hub.cpu_ms:.3f} ms", f"≤ {CPU_TARGET_MS:.2f} ms",
                 pair.hub.cpu_ms <= CPU_TARGET_MS),
                (f"{pair.load}: req/s, hub / bare ASGI app", f"{pair.ratio:.2f}", f"≥ {RATIO_TARGET}", pair.ratio >= RATIO_TARGET),
                (f"{pair.load}: p95", f"{hub.p95_ms:.1f} ms", f"< {P95_TARGET_MS:.0f} ms", hub.p95_ms < P95_TARGET_MS),
                (f"{pair.load}: answers, all rounds", f"{hub.requests - hub.errors:,} × 200 of {hub.requests:,}",
                 "all 200", hub.errors == 0 and hub.requests > 0),
            ]
        elif pair.kind == "wrk":
            rows += [
                (f"{pair.load}: p95", f"{hub.p95_ms:.1f} ms", f"< {WRK_P95_TARGET_MS:.0f} ms", hub.p95_ms < WRK_P95_TARGET_MS),
                (f"{pair.load}: timeouts, socket errors, non-2xx", f"{hub.timeouts}, {hub.socket_errors}, {hub.errors}",
                 "0, 0, 0", hub.timeouts == hub.socket_errors == hub.errors == 0),
                (f"{pair.load}: req/s, hub / bare ASGI app (reported)", f"{pair.ratio:.2f}", "", True),
            ]
        else:
            rows.append((f"{pair.load}: req/s, hub / bare grpc.aio (reported)", f"{pair.ratio:.2f}", "", True))
    return rows


def edge_gateway(env: dict[str, str]) -> tuple[int, dict[str, str], str]:
    """A second gateway on the stack's services with the edge cache on (for
    bench/edge_writes.py): its rate limits shared in Redis (BENCH_REDIS_URL, default the
    local one) as the edge cache requires, or, without a Redis, its limits off (the
    services keep theirs)."""
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


def process_label(pid: int) -> str:
    """What a process of a side is, for the by-process table: its module, or (for the
    hub's Redis, which renames itself `redis-server host:port`) its program."""
    return module_of(pid).split(" ")[0]


def innermost_own_code(raw: str, top: int) -> list[tuple[str, float]]:
    """py-spy's collapsed stacks -> the hub's own functions (gateway/, services/), each
    with all it calls into libraries, by share: every sample goes to the innermost of
    them on its stack, or to EVENT_LOOP when none is (the loop, gRPC's and uvicorn's
    own callbacks, threads)."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not (stack and count.isdigit()):
            continue
        frames = stack.split(";")
        # Only what the loop runs: the frames above it are the process's start (main, run).
        loop = max((index for index, frame in enumerate(frames) if _LOOP_RUNNER.search(frame)), default=-1)
        ours = [frame for frame in frames[loop + 1 :] if _OWN_CODE.search(frame)]
        counts[_LINE.sub(")", ours[-1]) if ours else EVENT_LOOP] += int(count)
    total = sum(counts.values()) or 1
    return [(frame, n / total) for frame, n in counts.most_common(top)]


_OWN_CODE = re.compile(r"\((gateway|services)/")
# The loop's own frame, under every callback it runs.
_LOOP_RUNNER = re.compile(r"\(asyncio/runners\.py")
_LINE = re.compile(r":\d+\)$")
EVENT_LOOP = "(none of the hub's functions on the stack)"


def record_profile(py_spy: str, pid: int, output: Path, seconds: int) -> subprocess.Popen:
    """py-spy sampling `pid` for `seconds` into `output`, in the raw format own_time() and
    innermost_own_code() read; the caller loads the process meanwhile, then waits."""
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "--nonblocking",
         "--output", str(output), "--duration", str(seconds)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def profile(hub_pids: list[int], gateway: str, options: Options) -> list[str]:
    """py-spy on the gateway and the agents service (the first process of each, with
    WORKERS) while hey loads each path once more: the frames the CPU time goes to, as
    shares of each process's samples and as CPU ms per request (the share times what
    the process used per request meanwhile). py-spy sees Python frames: time in C
    (uvloop, gRPC's core, httptools) counts to the Python frame that called it, or to
    the loop's own frame when a callback began in C."""
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        return ["No profile: py-spy is not installed (pip install py-spy; it is in the dev extra)."]
    targets = {name: process_named(hub_pids, module) for name, module in (("gateway", "gateway"), ("agents service", "services.agents"))}
    pids = {name: pid for name, pid in targets.items() if pid is not None}
    lines = []
    for path in PATHS:
        log(f"  profile: py-spy, {options.profile_seconds}s of GET {path}")
        with tempfile.TemporaryDirectory() as tmp:
            recorders = [record_profile(py_spy, pid, Path(f"{tmp}/{pid}.txt"), options.profile_seconds) for pid in pids.values()]
            time.sleep(1)
            before = {name: cpu.cpu_seconds([pid]) for name, pid in pids.items()}
            requests = 0
            deadline = time.monotonic() + options.profile_seconds - 2
            while time.monotonic() < deadline:
                requests += load.hey(f"{gateway}{path}", requests=1000, clients=options.concurrency).requests
            per_request = {name: (cpu.cpu_seconds([pid]) - before[name]) * 1000 / max(1, requests) for name, pid in pids.items()}
            for recorder in recorders:
                recorder.wait(timeout=60)
            lines.append(f"GET {path} under hey -c {options.concurrency}, {options.profile_seconds}s sampled; CPU ms per request "
                         "meanwhile: " + ", ".join(f"{name} {ms:.3f}" for name, ms in per_request.items()) + ".\n")
            for title, reader in (("the frame on CPU (own time)", own_time),
                                  ("the hub's innermost function on the stack, with what it calls", innermost_own_code)):
                lines.append(f"| process | {title} | share of its samples | ≈ ms / request |\n|---|---|---|---|")
                for name, pid in targets.items():
                    raw = Path(f"{tmp}/{pid}.txt")
                    if pid is None or not raw.exists():
                        lines.append(f"| {name} | no profile recorded (py-spy needs ptrace rights) | | |")
                        continue
                    for frame, share in reader(raw.read_text(), options.profile_top):
                        lines.append(f"| {name} | `{frame}` | {share:.1%} | {share * per_request[name]:.3f} |")
                lines.append("")
    return lines


def report(results: list[ConfigResult], options: Options, command: str, chart_path: Path | None, seconds: float,
           loads: tuple[str, str]) -> str:
    out = [
        "## make bench: the hub beside a bare ASGI app\n",
        f"Command: `{command}`, {datetime.date.today():%Y-%m-%d}, {os.cpu_count()} cores, load average "
        f"{loads[0]} before and {loads[1]} after; {seconds / 60:.1f} minutes. Medians of {options.rounds} alternating "
        f"rounds per side for hey and h2load (each ratio: the median of the rounds' ratios), one wrk run per side; "
        "CPU ms per request is the user + system time "
        "(/proc) of every process of the side, divided by its requests.\n",
    ]
    for result in results:
        out.append(f"- `{result.name}`: {result.environment}")
    out += ["", "| configuration | load | side | requests | req/s | p50 ms | p95 ms | p99 ms | non-2xx | socket errors "
            "| timeouts | CPU ms / request |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for pair in result.pairs:
            for side, m in (("DevOps Hub", pair.hub), (pair.bare_name, pair.bare)):
                f = m.figures
                out.append(f"| {result.name} | {pair.load} | {side} | {f.requests:,} | {f.rps:,.0f} | {f.p50_ms:.1f} "
                           f"| {f.p95_ms:.1f} | {f.p99_ms:.1f} | {failures(f)} | {f.socket_errors} | {f.timeouts} | {m.cpu_ms:.3f} |")
    out += ["", "| configuration | target | measured | goal | |", "|---|---|---|---|---|"]
    for result in results:
        for what, measured, goal, met in targets(result):
            out.append(f"| {result.name} | {what} | {measured} | {goal} | {verdict(met) if goal else ''} |")
    names = sorted({name for result in results for pair in result.pairs for name in pair.hub.by_process})
    out += ["", "The hub's CPU ms per request, by process (summed over WORKERS processes):", "",
            "| configuration | load | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for result in results:
        for pair in result.pairs:
            out.append(f"| {result.name} | {pair.load} | " + " | ".join(f"{pair.hub.by_process.get(n, 0.0):.3f}" for n in names) + " |")
    for result in results:
        if result.profile:
            out += ["", f"Where the hub's CPU goes, `{result.name}` (py-spy, own time of the top frames):", "", *result.profile]
    if chart_path is not None:
        out += ["", f"![Throughput and CPU per request, the hub beside the bare side]({chart_path.name})"]
    return "\n".join(out) + "\n"


def chart_bars(results: list[ConfigResult]) -> list[chart.Bar]:
    return [
        chart.Bar(f"{result.name}\n{pair.short}", pair.hub.figures.rps, pair.bare.figures.rps, pair.hub.cpu_ms, pair.bare.cpu_ms,
                  pair.ratio)
        for result in results for pair in result.pairs
    ]


@contextlib.contextmanager
def own_redis() -> Iterator[tuple[str, int] | None]:
    """A redis-server of the bench's own on a free port, for the `redis` configuration:
    its CPU counts as the hub's, and nobody else's keys or load share it. None when
    redis-server is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = free_port()
    server = start([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], dict(os.environ))
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}/0", server.pid
    finally:
        stop([server])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1",
                        help="a smoke run: small loads, one round, wrk for 3s, no profile (also BENCH_QUICK=1)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"which of {', '.join(CONFIGS)} (comma-separated)")
    parser.add_argument("--requests", type=int, help="requests per hey run and side (the guide: 10000)")
    parser.add_argument("--concurrency", type=int, default=100, help="hey's concurrent clients (the guide: 100)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--wrk-seconds", type=int, help="each wrk run's length (the guide: 30)")
    parser.add_argument("--grpc-requests", type=int, help="requests per gRPC round and side")
    parser.add_argument("--clients", type=int, default=16, help="h2load connections for the gRPC rows")
    parser.add_argument("--streams", type=int, default=8, help="h2load concurrent streams per connection")
    parser.add_argument("--profile-seconds", type=int, help="py-spy's sampling per path where a target is missed; 0: none")
    parser.add_argument("--profile-top", type=int, default=6)
    parser.add_argument("--chart", type=Path, help="where the PNG goes (bench/results.png; --quick: var/bench-quick.png)")
    args = parser.parse_args()
    quick = args.quick
    options = Options(
        requests=args.requests or (1000 if quick else 10000),
        concurrency=args.concurrency,
        rounds=args.rounds or (1 if quick else 3),
        wrk_threads=12,
        wrk_connections=400,
        wrk_seconds=args.wrk_seconds or (3 if quick else 30),
        grpc_requests=args.grpc_requests or (2000 if quick else 10000),
        clients=args.clients,
        streams=args.streams,
        profile_seconds=args.profile_seconds if args.profile_seconds is not None else (0 if quick else 6),
        profile_top=args.profile_top,
    )
    configs = [name for name in args.configs.split(",") if name]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configurations {', '.join(sorted(unknown))}; there are {', '.join(CONFIGS)}")
    missing = [tool for tool in TOOLS if load.missing(tool)]
    if missing:
        raise SystemExit(f"make bench needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
                         f"apt-get install {' '.join(load.PACKAGES[tool] for tool in missing)}")
    chart_path = args.chart or (ROOT / "var/bench-quick.png" if quick else ROOT / "bench/results.png")
    command = "make bench" + (" BENCH_ARGS=--quick" if quick else "")
    if sys.argv[1:] and sys.argv[1:] != ["--quick"]:
        command = f"python -m bench.run {' '.join(sys.argv[1:])}"
    began, load_before = time.monotonic(), _load_average()
    results = []
    with own_redis() as redis:
        for name in configs:
            extra_env: dict[str, str] = {}
            extra_pids: list[int] = []
            environment = "as `make run`: SQLite, the memory cache, limits in each process's memory, the edge cache on"
            if name == "redis":
                if redis is None:
                    log("[redis] skipped: redis-server is not installed (apt-get install redis-server)")
                    continue
                url, pid = redis
                extra_env = {"REDIS_URL": url, "REDIS_KEY_PREFIX": f"dhbench:{os.getpid()}:"}
                extra_pids = [pid]
                environment = ("REDIS_URL to the bench's own redis-server (its CPU counted as the hub's): "
                               "the cache and the limits shared through Redis, the edge cache on")
            elif name == "workers2":
                extra_env = {"WORKERS": "2"}
                environment = "WORKERS=2: two processes of each part (the sidecar one: its memory store is state); two bare processes"
            log(f"[{name}] starting the hub ({environment})")
            result = ConfigResult(name, environment)
            with tempfile.TemporaryDirectory(prefix="dh-bench-") as directory, started_stack(Path(directory), extra_env) as stack:
                bench_config(result, stack, extra_pids, Path(directory), options)
            results.append(result)
    chart.write(chart_path, chart_bars(results), title=f"make bench: DevOps Hub beside a bare ASGI app ({os.cpu_count()} cores)",
                cpu_target_ms=CPU_TARGET_MS, ratio_target=RATIO_TARGET)
    print(report(results, options, command, chart_path, time.monotonic() - began, (load_before, _load_average())))
    log(f"chart: {chart_path}")
    return 0


def _load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


if __name__ == "__main__":
    sys.exit(main())
