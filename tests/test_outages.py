"""A database outage, for real: the test's own PostgreSQL database refuses connections
and its sessions are ended, then it comes back. Calls are UNAVAILABLE / HTTP 503
with Retry-After and a reason, the log says so once each way, and no traceback."""

from __future__ import annotations

import asyncio
import logging
import uuid

import asyncpg
import pytest

from services.common.contract.errors import Unavailable
from services.common.data.db import connect
from tests.support import unavailable
from tests.support.databases import PG_ADMIN_URL, postgres_url
from tests.support.grpc_errors import error_reason
from tests.support.stack import gateway_client, make_settings, running_stack


@pytest.fixture
async def own_database():
    name = f"dh_outage_{uuid.uuid4().hex[:10]}"
    try:
        admin = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        unavailable(f"PostgreSQL at {PG_ADMIN_URL}", exc)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin, name, postgres_url(name)
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def take_down(admin: asyncpg.Connection, name: str) -> None:
    await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)


async def test_a_database_outage_is_503_with_retry_after_logged_once_each_way(own_database, caplog):
    admin, name, url = own_database
    async with running_stack(make_settings(url)) as stack:
        async with gateway_client(stack.settings, timeout=30) as http:
            assert (await http.post("/api/agents", json={"id": "up", "name": "Up", "domain": "ci"})).status_code == 200
            caplog.clear()
            with caplog.at_level(logging.INFO):
                await take_down(admin, name)
                for index in range(30):
                    # A new id each time: a cache miss, so the database is asked.
                    response = await http.get(f"/api/agents/missing-{index}")
                    assert response.status_code == 503, response.text
                    assert int(response.headers["retry-after"]) >= 1
                    assert error_reason(response.json()) == "DATABASE_UNAVAILABLE"
                write = await http.post("/api/agents", json={"id": "down", "name": "Down", "domain": "ci"})
                assert write.status_code == 503, write.text
                await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
                assert (await http.get("/api/agents/missing-again")).status_code == 404
                assert (await http.post("/api/agents", json={"id": "back", "name": "Back", "domain": "ci"})).status_code == 200
    messages = [record.getMessage() for record in caplog.records if record.name == "services.common.data.outages"]
    assert len([m for m in messages if "database unavailable" in m]) == 1, messages
    assert len([m for m in messages if "database available again" in m]) == 1, messages
    assert not [record for record in caplog.records if record.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]


async def test_a_call_cut_short_by_a_stopping_backend_is_503_not_499(sqlite_url):
    """The backend stops with no grace while a call runs: the client did nothing
    wrong and should retry (503), it did not go away (499)."""
    async with running_stack(make_settings(sqlite_url), with_workflows=True) as stack:
        async with gateway_client(stack.settings, timeout=30) as http:
            request = {"capability": "control.wait", "input": {"seconds": 20}}
            running = asyncio.ensure_future(http.post("/api/agents/builtin-control:execute", json=request))
            await asyncio.sleep(1.0)
            assert not running.done()
            await stack.agents.stop(0.5)
            response = await running
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1


async def test_two_databases_in_one_process_have_their_own_outages(own_database, sqlite_url, caplog):
    """One database goes down while another in the same process keeps answering: the
    one that is down is told once, and the other's successes do not end its outage."""
    admin, name, url = own_database
    down = await connect(url, pool_size=1, max_overflow=0)
    up = await connect(sqlite_url, pool_size=1, max_overflow=0)
    try:
        assert await down.fetchval("SELECT 1") == 1
        await take_down(admin, name)
        with caplog.at_level(logging.INFO, logger="services.common.data.outages"):
            for _ in range(5):
                with pytest.raises(Unavailable) as refused:
                    await down.fetchval("SELECT 1")
                assert refused.value.reason == "DATABASE_UNAVAILABLE"
                assert await up.fetchval("SELECT 1") == 1
            assert down.outages.database.down_since is not None
            assert up.outages.database.down_since is None
            messages = [record.getMessage() for record in caplog.records if record.name == "services.common.data.outages"]
            assert [m for m in messages if "unavailable" in m] == [messages[0]], messages
            assert not [m for m in messages if "available again" in m], messages
    finally:
        await down.close()
        await up.close()
