"""A DevOps Hub of its own, part by part, for fault runs: each service a real process
on its own port, a redis-server and a PostgreSQL cluster of its own (never the
machine's shared ones), each of which can be killed and started again.

Used by devstack/coherence.py (the staleness checker) and tests/test_fault_coherence.py.
The agents service runs as several processes on separate ports rather than WORKERS
processes on one: the same thing to the cache (several processes, one sidecar, one
database), but a checker can then choose which process a read goes to.
"""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devstack.ports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0


class Unavailable(RuntimeError):
    """A part this machine cannot run (no redis-server, no PostgreSQL binaries, not root)."""



class Part(abc.ABC):
    """One part of the cluster that can be killed and started again."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port

    @abc.abstractmethod
    def start(self) -> None:
        """Starts it and returns once its port answers."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Ends it at once, as a crash would."""

    def stop(self) -> None:
        """Ends it as an operator would; a crash unless a part knows better."""
        self.kill()

    def pids(self) -> list[int]:
        """Its processes, for freezing it (SIGSTOP: alive but silent)."""
        return []

    def freeze(self, frozen: bool) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP if frozen else signal.SIGCONT)


class ProcessPart(Part):
    """A child process: started from command(), killed with SIGKILL."""

    def __init__(self, name: str, port: int) -> None:
        super().__init__(name, port)
        self.process: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @abc.abstractmethod
    def command(self) -> list[str]:
        """How the part starts."""

    def environment(self) -> dict[str, str] | None:
        return None

    def log_file(self) -> Any:
        return subprocess.DEVNULL

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command(), env=self.environment(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log_file()
        )
        wait_for_port(self.port, process=self.process)

    def kill(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.kill()
            self.process.wait(timeout=10)

    def pids(self) -> list[int]:
        return [self.process.pid] if self.process is not None and self.running else []

    def stop(self) -> None:
        """SIGTERM; SIGKILL if it lingers."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


class RedisPart(ProcessPart):
    """A redis-server without persistence: killed, it comes back empty with a new run_id."""

    def __init__(self) -> None:
        super().__init__("redis", free_port())
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise Unavailable("redis-server is not on PATH")
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        assert self.binary is not None
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


class PostgresPart(Part):
    """A PostgreSQL cluster in a temporary folder, run by the `postgres` user (initdb
    refuses root). Stopped with `immediate` (a crash, as far as clients can tell)."""

    def __init__(self) -> None:
        super().__init__("postgresql", free_port())
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not bins:
            raise Unavailable("no PostgreSQL server binaries under /usr/lib/postgresql")
        self.bin = bins[-1].parent
        self.runas: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise Unavailable("running as root without runuser to start PostgreSQL as its own user")
            self.runas = ["runuser", "-u", "postgres", "--"]
        self.dir = Path(tempfile.mkdtemp(prefix="dh-pg-"))
        if self.runas:
            shutil.chown(self.dir, "postgres")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._initialised = False

    def _pg(self, *args: str) -> None:
        subprocess.run([*self.runas, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> None:
        if not self._initialised:
            self._pg(str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
            self._initialised = True
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._pg(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-o", options, "-l", str(self.dir / "log"), "-w", "start")
        wait_for_port(self.port)

    def kill(self) -> None:
        if (self.dir / "data" / "postmaster.pid").exists():
            self._pg(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")

    def pids(self) -> list[int]:
        """The postmaster and every backend it started (they share no process group)."""
        pid_file = self.dir / "data" / "postmaster.pid"
        if not pid_file.exists():
            return []
        postmaster = int(pid_file.read_text().split()[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    children.append(int(stat.parent.name))
        return [postmaster, *children]

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class ServicePart(ProcessPart):
    """A DevOps Hub process: `python -m <module>` with the cluster's settings."""

    def __init__(self, name: str, module: str, address_variable: str, env: dict[str, str], log_dir: Path) -> None:
        super().__init__(name, free_port())
        self.module = module
        self.env = {**env, address_variable: f"127.0.0.1:{self.port}"}
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module]

    def environment(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def log_file(self) -> Any:
        return open(self.log_path, "ab")  # noqa: SIM115 - the child holds it

    def start(self) -> None:
        try:
            super().start()
        except RuntimeError as exc:
            # The service says why it stopped in its log, not in its exit code.
            tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"{self.name}: {exc}; its log ends:\n" + "\n".join(tail)) from None


@dataclass
class Cluster:
    """A sidecar and several agents processes on one database (SQLite file or an own
    PostgreSQL) and, optionally, an own Redis behind the sidecar."""

    database: str  # "sqlite" or "postgresql"
    redis: bool
    agents_processes: int = 2
    settings: dict[str, str] = field(default_factory=dict)
    parts: dict[str, Part] = field(default_factory=dict)

    def start(self) -> Cluster:
        self.dir = Path(tempfile.mkdtemp(prefix="dh-cluster-"))
        env = {
            "AUTH_ENABLED": "false",
            "RATE_LIMIT_REQUESTS": "0",
            "RATE_LIMIT_EXECUTE_REQUESTS": "0",
            "OTEL_SDK_DISABLED": "true",
            # No metrics endpoints: on their fixed ports the agents processes would
            # collide with each other, and with any other cluster or stack running.
            "AGENTS_METRICS_PORT": "0",
            "CACHE_METRICS_PORT": "0",
            **self.settings,
        }
        try:
            if self.database == "postgresql":
                self.parts["postgresql"] = postgres = PostgresPart()
                postgres.start()
                env["DATABASE_URL"] = postgres.url
            else:
                env["DATABASE_URL"] = f"sqlite:///{self.dir}/hub.db"
            if self.redis:
                self.parts["redis"] = redis = RedisPart()
                redis.start()
                env["REDIS_URL"] = redis.url
            sidecar = ServicePart("sidecar", "services.cache.sidecar", "CACHE_ADDR", env, self.dir)
            sidecar.start()
            self.parts["sidecar"] = sidecar
            env = {key: value for key, value in env.items() if key != "REDIS_URL"}
            env["CACHE_ADDR"] = sidecar.address
            for i in range(self.agents_processes):
                agents = ServicePart(f"agents-{i}", "services.agents", "AGENTS_ADDR", env, self.dir)
                agents.start()
                self.parts[agents.name] = agents
        except BaseException:
            self.close()
            raise
        return self

    def agents(self, i: int) -> ServicePart:
        part = self.parts[f"agents-{i}"]
        assert isinstance(part, ServicePart)
        return part

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}" for path in sorted(self.dir.glob("*.log")))

    def close(self) -> None:
        for part in reversed(list(self.parts.values())):
            part.stop()
        postgres = self.parts.get("postgresql")
        if isinstance(postgres, PostgresPart):
            postgres.remove()
        if getattr(self, "dir", None) is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
