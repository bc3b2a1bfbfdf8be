"""`make run`: starts every part of DevOps Hub as its own process and watches them.

Parts start in order (the cache first, the gateway last), each once its predecessor's
port accepts connections; then the launcher supervises them as docs/resilience.md,
"Supervision", says: restarts with back-off, liveness checks, crash-loop detection,
and a stop in reverse order. Children get SIGTERM if the launcher itself is killed
(PR_SET_PDEATHSIG), so none is orphaned.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.seed import seed
from services.common.auth import keys
from services.common.data.db import connect
from services.common.data.db.migrate import migrate
from services.common.foundation.settings import Settings, redact
from services.common.telemetry.metrics import MULTIPROCESS_ENV

STOP_TIMEOUT = 8.0
START_TIMEOUT = 30.0
POLL_INTERVAL = 0.2
# Restart back-off: 0.5 s, 1 s, 2 s ... up to 10 s, for deaths in a row. A process that
# ran STABLE_AFTER seconds starts the count again; more than MAX_QUICK_DEATHS deaths
# in a row is a crash loop that restarting will not fix.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 10.0
STABLE_AFTER = 30.0
MAX_QUICK_DEATHS = 5
_PR_SET_PDEATHSIG = 1
# Liveness, as the Kubernetes manifests' livenessProbe (deploy/k8s): every PROBE_PERIOD
# seconds each process is asked, on its own socket, whether it serves; PROBE_FAILURES
# answers in a row missing for PROBE_TIMEOUT seconds, and it is killed and restarted.
PROBE_PERIOD = 2.0
PROBE_TIMEOUT = 1.0
PROBE_FAILURES = 3


@dataclass
class Part:
    name: str
    module: str
    # Its name in telemetry, and so its subdirectory of PROMETHEUS_MULTIPROC_DIR.
    service: str
    address: str
    scheme: str
    processes: int = 1


def parts(settings: Settings) -> list[Part]:
    """What runs, in start order. Stateless parts run WORKERS processes on one port
    (SO_REUSEPORT); the sidecar's memory store is state, so it stays single unless
    the cache lives in Redis."""
    workers = max(1, settings.workers)
    return [
        Part("cache sidecar", "services.cache.sidecar", "cache", settings.cache_addr, "grpc", workers if settings.redis_url else 1),
        Part("agents service", "services.agents", "agents", settings.agents_addr, "grpc", workers),
        Part("workflows service", "services.workflows", "workflows", settings.workflows_addr, "grpc", workers),
        Part("gateway", "gateway", "gateway", f"{settings.gateway_host}:{settings.gateway_port}", "http", workers),
    ]


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_listening(address: str, proc: subprocess.Popen, timeout: float) -> bool:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def answers(scheme: str, path: str) -> bool:
    """Whether the process listening on the unix socket `path` serves, within
    PROBE_TIMEOUT: grpc.health.v1 Check says SERVING, or GET /health/live is 200.

    Each process has a socket of its own (HEALTH_SOCKET) because WORKERS processes share
    their port: a check there reaches whichever one the kernel picks. A stopped process's
    sockets still take connections (the kernel queues them), so only an answer counts."""
    if scheme == "grpc":
        with grpc.insecure_channel(f"unix:{path}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT)
            except grpc.RpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(PROBE_TIMEOUT)
        try:
            sock.connect(path)
            sock.sendall(b"GET /health/live HTTP/1.1\r\nhost: launcher\r\nconnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False


@dataclass
class Child:
    """One process of a part, and what the supervisor knows of its past."""

    part: Part
    proc: subprocess.Popen
    started: float
    # Its own unix socket, where it alone answers health checks (HEALTH_SOCKET).
    socket: str
    # Deaths in a row, each soon after its start; reset once a process runs STABLE_AFTER.
    quick_deaths: int = 0
    restart_at: float | None = None
    # Liveness: the check in flight, when the next is due, checks missed in a row, and
    # whether it ever answered (until then it is starting, given START_TIMEOUT).
    probe: Future[bool] | None = None
    next_probe: float = 0.0
    misses: int = 0
    answered: bool = False

    @property
    def name(self) -> str:
        return f"{self.part.name} (pid {self.proc.pid})"


class Launcher:
    """Starts the parts in order, then supervises them like gunicorn's arbiter: a child
    that dies is restarted after an exponential back-off, while the others (with
    WORKERS >= 2, its siblings on the same port) keep serving. A child that keeps dying
    soon after it starts is a crash loop: the launcher says so and stops the rest."""

    def __init__(self, settings: Settings, env: Mapping[str, str]) -> None:
        self.settings = settings
        # The children's environment; the launcher's own is left as it was given.
        self._env = env
        self.running: list[Child] = []
        self._stopping = False
        self._sockets = tempfile.mkdtemp(prefix="devops-hub-")
        self._probes = ThreadPoolExecutor(max_workers=4, thread_name_prefix="probe")

    def start(self) -> None:
        for part in parts(self.settings):
            for _ in range(part.processes):
                path = os.path.join(self._sockets, f"{len(self.running)}.sock")
                child = Child(part, self._spawn(part, path), time.monotonic(), path)
                self.running.append(child)
                if not _wait_listening(part.address, child.proc, START_TIMEOUT):
                    code = child.proc.poll()
                    why = f"exited with code {code}" if code is not None else f"did not listen within {START_TIMEOUT:.0f}s"
                    raise RuntimeError(f"{part.name} {why}")
                print(f"launcher: {part.name:<18} {part.scheme}://{part.address}  (pid {child.proc.pid})", flush=True)

    def _spawn(self, part: Part, health_socket: str) -> subprocess.Popen:
        # A socket a killed process left would refuse the new one's bind.
        pathlib.Path(health_socket).unlink(missing_ok=True)
        env = {**self._env, "HEALTH_SOCKET": health_socket}
        if env.get(MULTIPROCESS_ENV):
            # Each part its own subdirectory: one variable serves every part, and no
            # endpoint adds up another part's metrics.
            env[MULTIPROCESS_ENV] = os.path.join(env[MULTIPROCESS_ENV], part.service)
        return subprocess.Popen(
            [sys.executable, "-m", part.module],
            env=env,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            # Children ignore the terminal's Ctrl-C: the launcher stops them in order.
            start_new_session=True,
        )

    def watch(self) -> int:
        """Supervises until a signal (0) or a crash loop (1); returns the exit code."""
        while not self._stopping:
            now = time.monotonic()
            for child in self.running:
                if child.restart_at is not None:
                    if now >= child.restart_at:
                        self._restart(child, now)
                    continue
                code = child.proc.poll()
                if code is None:
                    if child.quick_deaths and now - child.started >= STABLE_AFTER:
                        child.quick_deaths = 0
                    self._check_liveness(child, now)
                    continue
                if self._stopping:
                    break
                ran = now - child.started
                child.quick_deaths = child.quick_deaths + 1 if ran < STABLE_AFTER else 1
                name = child.name
                if child.quick_deaths > MAX_QUICK_DEATHS:
                    print(
                        f"launcher: {name} exited with code {code}, its {child.quick_deaths}th death in a row within "
                        f"{STABLE_AFTER:.0f}s of starting: a crash loop; giving up and stopping the rest",
                        flush=True,
                    )
                    self.stop()
                    return 1
                delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (child.quick_deaths - 1))
                print(f"launcher: {name} exited with code {code} after {ran:.1f}s; restarting it in {delay:.1f}s", flush=True)
                child.restart_at = now + delay
            time.sleep(POLL_INTERVAL)
        return 0

    def _check_liveness(self, child: Child, now: float) -> None:
        """Starts a health check when one is due, and reads the one that has ended: the
        third missed in a row (once the process has answered, or START_TIMEOUT after its
        start) kills it. SIGKILL, since a stopped process never sees SIGTERM; its exit
        then takes the restart path every death takes."""
        if child.probe is not None and child.probe.done():
            if child.probe.result():
                child.answered, child.misses = True, 0
            elif child.answered or now - child.started > START_TIMEOUT:
                child.misses += 1
                if child.misses == PROBE_FAILURES:
                    print(
                        f"launcher: {child.name} did not answer {PROBE_FAILURES} health checks in a row "
                        f"({PROBE_TIMEOUT:.0f}s each, every {PROBE_PERIOD:.0f}s); killing it",
                        flush=True,
                    )
                    child.proc.kill()
            child.probe = None
        if child.probe is None and now >= child.next_probe:
            child.probe = self._probes.submit(answers, child.part.scheme, child.socket)
            child.next_probe = now + PROBE_PERIOD

    def _restart(self, child: Child, now: float) -> None:
        child.proc = self._spawn(child.part, child.socket)
        child.started, child.restart_at = now, None
        child.probe, child.next_probe, child.misses, child.answered = None, now, 0, False
        print(f"launcher: {child.part.name:<18} restarted (pid {child.proc.pid})", flush=True)

    def request_stop(self, signum: int, _frame) -> None:
        self._stopping = True

    def stop(self) -> None:
        self._stopping = True
        for child in reversed(self.running):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for child in reversed(self.running):
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"launcher: {child.part.name} did not stop in time; killing it", flush=True)
                child.proc.kill()
                child.proc.wait()
        self._probes.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self._sockets, ignore_errors=True)


def try_command(settings: Settings) -> str:
    """A first call to paste, with the key it needs: `make key` reaches this stack at
    AGENTS_ADDR (named when it is not the default) and creates the key there."""
    gateway = f"http://{settings.gateway_host}:{settings.gateway_port}"
    execute = (
        f"curl -s -X POST {gateway}/api/workflows/fan-out-greetings:execute -H 'content-type: application/json' "
        "-d '{\"input\": {\"services\": [\"api\", \"web\"]}}'"
    )
    if not settings.auth_enabled:
        return execute
    where = "" if settings.agents_addr == Settings().agents_addr else f"AGENTS_ADDR={settings.agents_addr} "
    return f'KEY=$({where}make -s key) && {execute} -H "x-api-key: $KEY"'


async def _migrate(settings: Settings) -> int:
    db = await connect(settings.database_url, pool_size=1, max_overflow=0)
    try:
        return len(await migrate(db))
    finally:
        await db.close()


def main() -> int:
    # A line goes out in one write, even under PYTHONUNBUFFERED (which writes print's
    # text and its newline apart): the children write to the same terminal.
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(write_through=False, line_buffering=True)  # type: ignore[union-attr]
    settings = Settings.from_env()
    # What the children are given beyond the launcher's environment, which is only read.
    # gRPC core's own log level, read by each child as it imports grpc: unset, gRPC
    # prints its INFO lines (a "Got goaway" for every connection a stopping server cuts).
    env = {"GRPC_VERBOSITY": "ERROR", **os.environ}
    if settings.workers > 1 and not env.get(MULTIPROCESS_ENV):
        # Workers sharing a port must share their metrics too (prometheus_client's
        # multiprocess mode): an empty directory for this run's files.
        metrics_dir = pathlib.Path("var/metrics")
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        env[MULTIPROCESS_ENV] = str(metrics_dir.resolve())
    if not settings.service_api_key:
        # The services' key for calling each other, handed to the children through
        # their environment; kept in var/ so every run uses the same one. Also with
        # AUTH_ENABLED=false: with it the gateway is its callers' rate limiter.
        settings = settings.replace(service_api_key=keys.local_service_key())
        env["SERVICE_API_KEY"] = settings.service_api_key
    launcher = Launcher(settings, env)
    signal.signal(signal.SIGTERM, launcher.request_stop)
    signal.signal(signal.SIGINT, launcher.request_stop)
    print(f"launcher: database {redact(settings.database_url)}, cache {'redis' if settings.redis_url else 'memory'}", flush=True)
    # Migrate once up front, so services starting side by side never race on the schema.
    applied = asyncio.run(_migrate(settings))
    print(f"launcher: database migrated ({applied} new migration(s))", flush=True)
    try:
        launcher.start()
    except RuntimeError as exc:
        print(f"launcher: {exc}; stopping the rest", file=sys.stderr, flush=True)
        launcher.stop()
        return 1
    try:
        seeded = asyncio.run(seed(settings))
        seeded_note = f"seeded {len(seeded)} built-in agent(s) and example workflow(s)" if seeded else "examples already seeded"
        print(f"launcher: {seeded_note}", flush=True)
    except Exception as exc:  # noqa: BLE001 - the system runs without its examples
        print(f"launcher: seeding the examples failed ({exc}); the services run on", file=sys.stderr, flush=True)
    print(f"launcher: ready. Try, in another terminal here: {try_command(settings)}", flush=True)
    code = launcher.watch()
    if code == 0:
        print("launcher: stopping", flush=True)
    launcher.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
