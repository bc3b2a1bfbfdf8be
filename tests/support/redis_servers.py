"""Real Redis for the cache tests: the machine's (127.0.0.1:6379, or TEST_REDIS_URL),
each test under a key prefix of its own that is removed afterwards, a private
redis-server on a free port for the tests that kill, freeze or restart it, or a
three-master Redis Cluster of the test's own.

Without Redis those tests skip and say why, except under CI=true, where they fail.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from devstack.ports import free_port
from tests.support import unavailable

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unlink_prefix(url: str, prefix: str) -> int:
    """Removes every key under prefix (SCAN, never KEYS)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)
    removed = 0
    try:
        batch = []
        for name in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(name)
            if len(batch) >= 1000:
                removed += client.unlink(*batch)
                batch = []
        if batch:
            removed += client.unlink(*batch)
    finally:
        client.close()
    return removed


@pytest.fixture
def redis_url() -> str:
    """The machine's Redis, once it has answered a PING."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    except (RedisError, OSError) as exc:
        unavailable(f"Redis at {REDIS_URL}", exc)
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own, naming its pytest-xdist worker; everything under
    it is removed afterwards."""
    prefix = f"dhtest:{os.environ.get('PYTEST_XDIST_WORKER', 'main')}:{uuid.uuid4().hex}:"
    yield prefix
    unlink_prefix(redis_url, prefix)


NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


class RedisServer:
    """A redis-server of the test's own, on its own port: no persistence unless
    `options` ask for it."""

    def __init__(self, binary: str, port: int, options: Sequence[str] = NO_PERSISTENCE) -> None:
        self.binary = binary
        self.port = port
        self.options = tuple(options)
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", *self.options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            client = aioredis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=0.5)
            try:
                await client.ping()
                return
            except (RedisError, OSError):
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.05)
            finally:
                await client.aclose()

    def kill(self) -> None:
        """SIGKILL: its data is gone, and it gets a new run_id when started again."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing answers; the data stays."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


def _own_server(options: Sequence[str] = NO_PERSISTENCE) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server", "not on PATH")
    server = RedisServer(binary, free_port(), options)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.thaw()
        server.kill()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    yield from _own_server()


@pytest.fixture
def persistent_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """Writes every command to an append-only file before answering, so a SIGKILL
    loses nothing: started again, it comes back with its data (and a new run_id)."""
    yield from _own_server(("--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", str(tmp_path)))


class RedisClusterServers:
    """A three-master Redis Cluster of the test's own on loopback (no replicas, no
    persistence): `url` names its first node with `?cluster=true`, as REDIS_URL does."""

    def __init__(self, binary: str, directory: Path, masters: int = 3) -> None:
        self.servers = [
            RedisServer(binary, free_port(), (*NO_PERSISTENCE, "--dir", str(directory), "--cluster-enabled", "yes"))
            for _ in range(masters)
        ]
        for server in self.servers:
            # The bus port is named: the default (port + 10000) may not exist for a free port.
            server.options += ("--cluster-config-file", f"nodes-{server.port}.conf", "--cluster-port", str(free_port()))
        self.ports = [server.port for server in self.servers]
        self.url = f"redis://127.0.0.1:{self.ports[0]}?cluster=true"

    def start(self, timeout: float = 30.0) -> None:
        deadline = self._start_nodes(timeout)
        cli = shutil.which("redis-cli")
        if cli is None:
            unavailable("redis-cli", "not on PATH")
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run([cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
        self._wait_ok(deadline)

    def restart(self, timeout: float = 30.0) -> None:
        """Starts the killed nodes again: empty (no persistence), but each remembers the
        cluster from its config file, so they form it again."""
        self._wait_ok(self._start_nodes(timeout))

    def _start_nodes(self, timeout: float) -> float:
        for server in self.servers:
            server.start()
        deadline = time.monotonic() + timeout
        for server in self.servers:
            _wait(server.port, lambda client: client.ping(), deadline, "an answer")
        return deadline

    def _wait_ok(self, deadline: float) -> None:
        for server in self.servers:
            _wait(server.port, lambda client: client.cluster("INFO")["cluster_state"] == "ok", deadline, "cluster_state:ok")

    def node_of(self, key: str) -> int:
        """The port of the master that serves key's slot (CLUSTER KEYSLOT, CLUSTER SLOTS)."""
        client = redis.Redis(port=self.ports[0], socket_timeout=2)
        try:
            slot = int(client.execute_command("CLUSTER KEYSLOT", key))
            for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        finally:
            client.close()
        raise AssertionError(f"no master serves slot {slot}")

    def stop(self) -> None:
        """SIGKILL to every node."""
        for server in self.servers:
            server.kill()


def _wait(port: int, probe: Callable[[redis.Redis], object], deadline: float, what: str) -> None:
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        while True:
            try:
                if probe(client):
                    return
            except (RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Redis Cluster node {port}: no {what}")
            time.sleep(0.05)
    finally:
        client.close()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A three-master Redis Cluster of this test's own, torn down afterwards."""
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server", "not on PATH")
    cluster = RedisClusterServers(binary, tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
