"""A PostgreSQL or Redis that a process is pointed at but cannot use, said plainly.

At start such a dependency is an operator's mistake to fix, not a fault to ride out:
the process names the URL (without its password) and what to do in one log line and
exits non-zero, and its supervisor restarts it with back-off (docs/resilience.md,
"Supervision").
"""

from __future__ import annotations

import asyncio

import asyncpg
import redis.asyncio as redis
from redis.exceptions import RedisError

from services.common.foundation.settings import redact


class DependencyUnavailable(Exception):
    """A dependency cannot be used; the message says which and what to do."""


def postgres_unavailable(url: str, exc: BaseException) -> DependencyUnavailable:
    where = redact(url)
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return DependencyUnavailable(f"{exc} at {where}: create it (createdb) or point DATABASE_URL at one that exists")
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return DependencyUnavailable(f"PostgreSQL at {where} refused the login ({exc}): check the user and password in DATABASE_URL")
    problem = exc or type(exc).__name__
    return DependencyUnavailable(f"cannot reach PostgreSQL at {where} ({problem}): start it, or set DATABASE_URL to one that answers")


def redis_node_url(url: str) -> str:
    """The URL of one Redis node: the URL itself, or for a Redis Cluster
    (`?cluster=true`) the node it names, which answers PING and hears every PUBLISH."""
    return url.replace("?cluster=true", "").replace("&cluster=true", "")


async def check_redis(url: str, timeout: float = 5.0) -> None:
    client = redis.Redis.from_url(redis_node_url(url), socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        await asyncio.wait_for(client.ping(), timeout)
    except (RedisError, OSError, TimeoutError) as exc:
        problem = f"cannot reach Redis at {redact(url)} ({exc or type(exc).__name__})"
        raise DependencyUnavailable(f"{problem}: start it, or set REDIS_URL to one that answers (unset: the in-memory cache)") from None
    finally:
        await client.aclose()
