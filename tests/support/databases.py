"""The machine's PostgreSQL for the tests (127.0.0.1:5432, or TEST_POSTGRES_URL): where
it is, a database of a test's own beside the admin one, and an emptied schema."""

from __future__ import annotations

import os

import asyncpg

PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def postgres_url(name: str) -> str:
    """The URL of database `name` on the admin URL's server, as the admin connects."""
    return f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"


async def fresh_schema(url: str) -> None:
    """Drops everything in the database's public schema: the next test migrates anew."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()
