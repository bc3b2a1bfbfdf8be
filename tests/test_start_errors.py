"""A process pointed at a PostgreSQL or Redis it cannot use says so in one line and
exits non-zero, with no traceback (services/common/foundation/dependencies.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from devstack.ports import free_port
from tests.support import ROOT
from tests.support.databases import postgres_url
from tests.support.processes import process_env


def start(module: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    for part in expected:
        assert part in errors[0], errors[0]
    assert "secret" not in result.stderr + result.stdout
    return errors[0]


def test_a_database_that_does_not_exist(tmp_path, pg_server_url):
    # With a password in the URL (trust auth ignores it): the line must not show it.
    url = postgres_url(f"{pg_server_url.rsplit('/', 1)[1]}_missing").replace("postgres@", "postgres:secret@", 1)
    assert "postgres:secret@" in url
    env = {**process_env(tmp_path), "DATABASE_URL": url}
    line = assert_one_clear_line(start("services.agents", env), "does not exist", "postgres:***@", "createdb")
    assert "agents service cannot start" in line


def test_an_unreachable_postgresql(tmp_path):
    port = free_port()
    env = {**process_env(tmp_path), "DATABASE_URL": f"postgresql://postgres:secret@127.0.0.1:{port}/test"}
    assert_one_clear_line(start("services.workflows", env), "cannot reach PostgreSQL", f"postgres:***@127.0.0.1:{port}/test", "DATABASE_URL")


@pytest.mark.parametrize("module", ["services.cache.sidecar", "gateway"])
def test_an_unreachable_redis(tmp_path, module):
    port = free_port()
    env = {**process_env(tmp_path), "REDIS_URL": f"redis://:secret@127.0.0.1:{port}/0"}
    assert_one_clear_line(start(module, env), "cannot reach Redis", f"redis://:***@127.0.0.1:{port}/0", "REDIS_URL")
