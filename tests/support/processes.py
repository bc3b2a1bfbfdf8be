"""The stack as separate processes, as `make run` starts them: its environment on
free ports, reading its output, and a launched stack that must stop cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from devstack.ports import free_port, local_stack_env
from tests.support import ROOT
from tests.support.auth import ADMIN_KEY

STOP_TIMEOUT = 15


def _stack_env(tmp_path: Path) -> dict[str, str]:
    """This environment with the stack on free ports, a fresh SQLite file and the memory cache."""
    env = local_stack_env(f"sqlite:///{tmp_path}/hub.db")
    env.update(
        PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'clients' / 'python'}",
        PYTHONUNBUFFERED="1",
    )
    return env


def process_env(tmp_path: Path) -> dict[str, str]:
    env = _stack_env(tmp_path)
    env.update(
        # The defaults otherwise: auth on, anonymous reads allowed; this is the first key.
        BOOTSTRAP_ADMIN_KEY=ADMIN_KEY,
        # No metrics endpoints: their fixed ports would collide with a running stack.
        AGENTS_METRICS_PORT="0",
        WORKFLOWS_METRICS_PORT="0",
        CACHE_METRICS_PORT="0",
    )
    for name in ("AUTH_ENABLED", "ALLOW_ANONYMOUS_READ", "SERVICE_API_KEY"):
        env.pop(name, None)
    return env


@contextlib.contextmanager
def spawned(module: str, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """`python -m <module>` from the repository's root, its output and errors as lines of
    text on stdout. Stopped on the way out unless the test has stopped it: SIGTERM (the
    launcher stops its children in order), then SIGKILL after STOP_TIMEOUT seconds."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def read_until(proc: subprocess.Popen, needle: str, timeout: float = 60) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if needle in line:
            return lines
    raise AssertionError(f"never saw {needle!r}; output so far: {lines}")


@contextlib.contextmanager
def launched_stack(tmp_path: Path, output: list[str] | None = None, **env_overrides: str) -> Iterator[dict[str, str]]:
    """`python -m devstack.launcher` on free ports and a fresh SQLite file; yields its
    environment once it says it is ready (its lines so far go to `output`), and checks
    it stops cleanly on SIGTERM."""
    env = _stack_env(tmp_path)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        AGENTS_METRICS_PORT=str(free_port()),
        WORKFLOWS_METRICS_PORT=str(free_port()),
        CACHE_METRICS_PORT=str(free_port()),
        LOG_LEVEL="WARNING",
    )
    env.update(env_overrides)
    lines: list[str] = [] if output is None else output
    with spawned("devstack.launcher", env) as proc:
        lines.extend(read_until(proc, "launcher: ready", timeout=90))
        yield env
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
