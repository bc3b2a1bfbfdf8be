"""`make loadtest`: the calls of deploy/ghz/*.json, driven by h2load, reported like ghz.

Needs no docker. Each config's request is built from its JSON `data` with the
generated stubs and sent gRPC-framed over HTTP/2 by h2load (bench/load.py), with the
config's total, concurrency and connections.

h2load sees HTTP statuses, never the grpc-status trailer, so its own error count only
covers transport failures. The status code distribution comes from the service
instead: its grpc_server_handled_total for the method, scraped before and after the
run (it would include any other traffic the method had meanwhile).

    python -m bench.loadtest                  starts a stack of its own (SQLite, memory cache)
    python -m bench.loadtest --running        loads the stack at AGENTS_ADDR etc. (`make run`)
    python -m bench.loadtest --scale 0.1      a tenth of each config's total
    python -m bench.loadtest --only get_agent
    python -m bench.loadtest --summarize var/ghz/*.json   print ghz's JSON reports the same way

Against a running stack, pass an admin key with --api-key (or LOADTEST_API_KEY) for
the calls that need one, and raise RATE_LIMIT_REQUESTS there: a load test is exactly
what the token buckets are meant to stop.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from prometheus_client.parser import text_string_to_metric_families

from bench import load
from services.common.auth import keys
from services.common.contract.api import backend_of, discover_services, method_path
from services.common.foundation.settings import Settings
from services.common.telemetry.endpoint import host_of

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "deploy" / "ghz"


@dataclass(frozen=True)
class GhzCall:
    """One ghz config, resolved against the API."""

    file: Path
    name: str
    method: MethodDescriptor
    request: Message
    total: int
    concurrency: int
    connections: int

    @property
    def service(self) -> str:
        return self.method.containing_service.full_name

    @property
    def path(self) -> str:
        return method_path(self.method)

    @property
    def backend(self) -> str:
        return backend_of(self.method.containing_service)


def find_method(call: str) -> MethodDescriptor:
    """ghz's `package.Service.Method` or `package.Service/Method`, in the API's descriptors."""
    service_name, _, method_name = call.replace("/", ".").rpartition(".")
    for service in discover_services():
        if service.full_name == service_name and method_name in service.methods_by_name:
            return service.methods_by_name[method_name]
    raise LookupError(f"{call}: no such method in the API")


def load_config(path: Path) -> GhzCall:
    config = json.loads(path.read_text())
    method = find_method(config["call"])
    request = message_factory.GetMessageClass(method.input_type)()
    json_format.ParseDict(config.get("data", {}), request)
    concurrency = int(config.get("concurrency", 50))
    total = int(config.get("total", 200))
    if total < concurrency:
        raise ValueError(f"{path.name}: total ({total}) is below concurrency ({concurrency}), which ghz refuses")
    return GhzCall(
        file=path,
        name=config.get("name", path.stem),
        method=method,
        request=request,
        total=total,
        concurrency=concurrency,
        connections=max(1, int(config.get("connections", 1))),
    )


def load_configs(directory: Path = CONFIGS) -> list[GhzCall]:
    return [load_config(path) for path in sorted(directory.glob("*.json"))]


# --- the service's own count of status codes -------------------------------------------


def status_codes(metrics_url: str, call: GhzCall) -> collections.Counter[str]:
    """grpc_server_handled_total of `call`'s method, by code, as the service counts it."""
    text = httpx.get(metrics_url, timeout=10, headers={"connection": "close"}).text
    codes: collections.Counter[str] = collections.Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "grpc_server_handled_total"
                and labels.get("grpc_service") == call.service
                and labels.get("grpc_method") == call.method.name
            ):
                codes[labels["grpc_code"]] += int(sample.value)
    return codes


# --- running -------------------------------------------------------------------------------


@dataclass
class Result:
    call: GhzCall
    figures: load.Figures
    codes: collections.Counter[str]
    seconds: float


def run_call(call: GhzCall, settings: Settings, *, scale: float, api_key: str | None) -> Result:
    address = settings.backend_address(call.backend)
    metrics_port = getattr(settings, f"{call.backend}_metrics_port")
    metrics_url = f"http://{host_of(address) or '127.0.0.1'}:{metrics_port}/metrics"
    total = max(call.concurrency, round(call.total * scale))
    before = status_codes(metrics_url, call)
    started = time.monotonic()
    figures = load.run(
        f"http://{address}{call.path}",
        requests=total,
        clients=call.connections,
        streams=math.ceil(call.concurrency / call.connections),
        body=load.grpc_frame(call.request),
        headers={"x-api-key": api_key} if api_key else None,
    )
    seconds = time.monotonic() - started
    after = status_codes(metrics_url, call)
    return Result(call, figures, after - before, seconds)


def report(result: Result) -> str:
    f = result.figures
    lines = [
        f"{result.call.name}",
        f"  {result.call.path} ({result.call.file.name})",
        "Summary:",
        f"  Count:        {f.requests}",
        f"  Total:        {result.seconds:.2f} s",
        f"  Requests/sec: {f.rps:.2f}",
        "Latency distribution:",
        f"  50 % in {f.p50_ms:.2f} ms",
        f"  95 % in {f.p95_ms:.2f} ms",
        f"  99 % in {f.p99_ms:.2f} ms",
        "Status code distribution (the service's grpc_server_handled_total):",
        *(f"  [{code}]   {count} responses" for code, count in sorted(result.codes.items())),
    ]
    if not result.codes:
        lines.append("  (none counted: is the service's metrics port reachable?)")
    lines.append(f"Transport errors (h2load: no response or HTTP status other than 200): {f.errors}")
    return "\n".join(lines)


def table(results: Sequence[Result]) -> str:
    rows = ["| call | count | rps | p50 ms | p95 ms | p99 ms | status codes |", "|---|---|---|---|---|---|---|"]
    for r in results:
        codes = ", ".join(f"{code} {count}" for code, count in sorted(r.codes.items())) or "-"
        f = r.figures
        rows.append(f"| {r.call.method.name} | {f.requests} | {f.rps:,.0f} | {f.p50_ms:.2f} | {f.p95_ms:.2f} | {f.p99_ms:.2f} | {codes} |")
    return "\n".join(rows)


def summarize_ghz(path: Path) -> str:
    """A ghz JSON report (`make ghz` keeps them in var/ghz) in the same shape."""
    data = json.loads(path.read_text())
    latencies = {int(d["percentage"]): d["latency"] / 1e6 for d in data.get("latencyDistribution") or []}
    lines = [
        f"{data.get('name') or path.stem} ({path.name}, ghz)",
        "Summary:",
        f"  Count:        {data.get('count', 0)}",
        f"  Total:        {data.get('total', 0) / 1e9:.2f} s",
        f"  Requests/sec: {data.get('rps', 0):.2f}",
        "Latency distribution:",
        *(f"  {p} % in {latencies[p]:.2f} ms" for p in (50, 95, 99) if p in latencies),
        "Status code distribution:",
        *(f"  [{code}]   {count} responses" for code, count in sorted((data.get("statusCodeDistribution") or {}).items())),
    ]
    return "\n".join(lines)


# --- a stack of its own ---------------------------------------------------------------------


@contextmanager
def own_stack(api_key: str) -> Iterator[Settings]:
    """`python -m devstack.launcher` on free ports with SQLite and the memory cache,
    seeded; stopped on exit. Access rules stay on, with limits the load cannot reach."""
    from devstack.ports import free_port, local_stack_env

    tmp = tempfile.mkdtemp(prefix="dh-loadtest-")
    env = local_stack_env(f"sqlite:///{tmp}/loadtest.db")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        AGENTS_METRICS_PORT=str(free_port()),
        WORKFLOWS_METRICS_PORT=str(free_port()),
        CACHE_METRICS_PORT=str(free_port()),
        LOG_LEVEL="WARNING",
        BOOTSTRAP_ADMIN_KEY=api_key,
        RATE_LIMIT_REQUESTS="0",
        RATE_LIMIT_EXECUTE_REQUESTS="0",
    )
    # Its output goes to a file: a pipe nobody reads would fill and block the children.
    output = Path(tmp) / "stack.log"
    with output.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "devstack.launcher"], cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, output)
        yield Settings.from_env(env)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen, output: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(line.startswith("launcher: ready") for line in output.read_text().splitlines()):
            return
        time.sleep(0.2)
    tail = "\n".join(output.read_text().splitlines()[-20:])
    raise SystemExit(f"the stack did not start:\n{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--running", action="store_true", help="load the stack the environment's settings name")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply each config's total (at least its concurrency)")
    parser.add_argument("--only", action="append", default=[], help="a config's file name without .json (repeatable)")
    parser.add_argument("--configs", type=Path, default=CONFIGS)
    parser.add_argument("--api-key", default=os.environ.get("LOADTEST_API_KEY"))
    parser.add_argument("--summarize", type=Path, nargs="+", metavar="REPORT", help="print ghz JSON reports and exit")
    args = parser.parse_args(argv)
    if args.summarize:
        print("\n\n".join(summarize_ghz(path) for path in args.summarize))
        return 0
    load.require_h2load()
    calls = [c for c in load_configs(args.configs) if not args.only or c.file.stem in args.only]
    if not calls:
        raise SystemExit(f"no config in {args.configs} matches {args.only}")
    with _stack(args) as (settings, api_key):
        results = []
        for call in calls:
            result = run_call(call, settings, scale=args.scale, api_key=api_key)
            print(report(result) + "\n", flush=True)
            results.append(result)
    print(table(results))
    return 0


@contextmanager
def _stack(args: argparse.Namespace) -> Iterator[tuple[Settings, str | None]]:
    if args.running:
        yield Settings.from_env(), args.api_key
        return
    api_key = args.api_key or keys.new_key()
    with own_stack(api_key) as settings:
        yield settings, api_key


if __name__ == "__main__":
    sys.exit(main())
