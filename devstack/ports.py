"""Loopback ports for a stack of one's own: free ones, and waiting for one to answer."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time

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
    that start `python -m devstack.launcher` each start from."""
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


def wait_for_port(port: int, timeout: float = 30.0, *, process: subprocess.Popen | None = None) -> None:
    """Returns once 127.0.0.1:`port` accepts a connection; raises if `process` exits
    first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process exited with {process.returncode} before listening on {port}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s") from None
            time.sleep(0.05)
