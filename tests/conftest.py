"""Shared fixtures: real servers on ephemeral ports, real SQLite files, a real PostgreSQL.

PostgreSQL and Redis are the machine's own (127.0.0.1:5432, 127.0.0.1:6379). Each
test process (each pytest-xdist worker under `make test`) works in a database of its
own, dropped at the end, and each test under a Redis key prefix of its own. Without
PostgreSQL the tests that need it skip with the reason, except under CI=true where
they fail.

Fixtures only: the helpers they use, which test modules import too, are in
tests/support/. The fixtures defined there beside their helpers (marked F401 below)
are imported here, where pytest finds them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from services.common.auth import keys
from tests.support import unavailable, xdist_groups
from tests.support.auth import secured  # noqa: F401
from tests.support.cache import backend, sidecar, start_sidecar  # noqa: F401
from tests.support.databases import PG_ADMIN_URL, fresh_schema, postgres_url
from tests.support.redis_servers import persistent_redis_server, redis_prefix, redis_server, redis_url  # noqa: F401
from tests.support.stack import Stack, make_settings, running_stack


def _as_admin(statement: str) -> None:
    """Runs one statement as the admin, on a loop of its own: a session fixture may be
    set up from inside a test's running loop."""

    async def run() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, run()).result()


def pytest_configure(config: pytest.Config) -> None:
    xdist_groups.name_the_file(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    xdist_groups.remove_the_file(config)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    return xdist_groups.make_scheduler(config, log)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under `make test` the workers start launchers side by side, and a launcher that
    finds no var/service.key writes one: the controller writes it first, so that no two
    launchers race to write different keys (`make key` in test_readme reads the file)."""
    if session.config.getoption("numprocesses", None) and not hasattr(session.config, "workerinput"):
        keys.local_service_key()


def _on_the_shared_redis(item: pytest.Item) -> bool:
    """Whether the test uses the machine's Redis: its fixtures, or a `backend` parameter
    of "redis" (tests/support/cache.py's fixture, test_auth's rate limits)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return bool({"redis_url", "redis_prefix"} & set(getattr(item, "fixturenames", ()))) or params.get("backend") == "redis"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked `slow` first: `make test` hands them out to its workers before
    the short ones, so that the workers end together instead of one running a long
    test alone at the end.

    The tests on the machine's Redis last, one at a time on one worker, as in a serial
    run, while the other workers run out of work: their Redis timeouts are 250 ms
    (tests/support/cache.py), which a Redis busy with another test's 20,000 keys, or a
    test process starved of CPU by the other workers, overruns."""
    shared_redis = {item for item in items if _on_the_shared_redis(item)}
    for item in shared_redis:
        item.add_marker(pytest.mark.xdist_group("shared_redis"))
    items.sort(key=lambda item: 2 if item in shared_redis else 0 if item.get_closest_marker("slow") else 1)
    xdist_groups.write_groups(items)


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A database of this test process's own on the machine's PostgreSQL: under
    pytest-xdist each worker has one, named after it (gw0, gw1, ...) and its pid."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"dh_test_{worker}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        _as_admin(f'CREATE DATABASE "{name}"')
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        unavailable(f"PostgreSQL at {PG_ADMIN_URL}", exc)
    yield postgres_url(name)
    _as_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request, tmp_path) -> str:
    """Each test once on a new SQLite file and once on an empty PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/hub.db"
    url = request.getfixturevalue("pg_server_url")
    await fresh_schema(url)
    return url


@pytest.fixture
async def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/hub.db"


@pytest.fixture
async def stack(database_url) -> AsyncIterator[Stack]:
    async with running_stack(make_settings(database_url)) as running:
        yield running
