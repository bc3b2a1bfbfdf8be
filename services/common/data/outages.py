"""A dependency that is down is UNAVAILABLE, said once in the log, not once per call.

The database engines call failed() and succeeded() around their statements, on their
Database's own Outages; the error wrapper, handed that same Outages by the wiring,
asks unavailable() about any other exception, for Redis and broken connections that
reach it untranslated (docs/resilience.md, "Honest errors").
"""

from __future__ import annotations

import logging
import sqlite3
import time

import asyncpg
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.contract.errors import Unavailable

log = logging.getLogger(__name__)

# What a client is told to wait before retrying, and how long a dependency known to
# the error wrapper only (no success is reported for it) counts as still down.
RETRY_AFTER = 1.0
QUIET_PERIOD = 10.0

# SQLite's errors that mean the file cannot be used now, not that the statement is wrong.
_SQLITE_OUTAGE = ("database is locked", "disk i/o error", "unable to open database", "readonly database", "disk is full")


def is_database_outage(exc: BaseException, *, raised_by_database: bool = False) -> bool:
    """Whether `exc` means the database cannot be used now. A timeout or an OSError
    counts only when the database layer raised it; from anywhere else it may be a bug."""
    if raised_by_database and isinstance(exc, (OSError, TimeoutError)):
        return True
    if isinstance(exc, (ConnectionError, asyncpg.PostgresConnectionError)):
        return True
    if isinstance(exc, (asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InsufficientResourcesError)):
        return True  # admin shutdown, cannot connect now, too many connections, disk full
    if isinstance(exc, asyncpg.InterfaceError):
        return "closed" in str(exc)  # the pool or the connection went away under the call
    if isinstance(exc, sqlite3.OperationalError):
        return any(text in str(exc).lower() for text in _SQLITE_OUTAGE)
    return False


def is_redis_outage(exc: BaseException) -> bool:
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError))


class Dependency:
    """Up or down, with the transitions logged once each."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        self.down_since: float | None = None
        self._last_failure = 0.0
        self._failures = 0

    def failed(self, exc: BaseException) -> Unavailable:
        """Records a failure and returns the error the call should end with."""
        now = time.monotonic()
        if self.down_since is not None and now - self._last_failure > QUIET_PERIOD:
            self.succeeded()  # no word for a while: the last outage is over
        if self.down_since is None:
            self.down_since = now
            log.warning("%s unavailable: %s: %s; calls that need it answer UNAVAILABLE until it is back",
                        self.name, type(exc).__name__, exc)
        self._last_failure = now
        self._failures += 1
        return Unavailable(
            f"the {self.name} is unavailable; retry in {RETRY_AFTER:.0f}s",
            reason=self.reason,
            metadata={"dependency": self.name},
            retry_after=RETRY_AFTER,
        )

    def succeeded(self) -> None:
        if self.down_since is not None:
            log.warning("%s available again after %.1fs (%d call(s) refused meanwhile)",
                        self.name, time.monotonic() - self.down_since, self._failures)
            self.down_since = None
            self._failures = 0


class Outages:
    """One set per Database, so an outage is told once per database and two databases in
    one process (a test's stack) never share a state."""

    def __init__(self) -> None:
        self.database = Dependency("database", "DATABASE_UNAVAILABLE")
        self.redis = Dependency("Redis", "REDIS_UNAVAILABLE")

    def unavailable(self, exc: BaseException) -> Unavailable | None:
        if is_redis_outage(exc):
            return self.redis.failed(exc)
        if is_database_outage(exc):
            return self.database.failed(exc)
        return None
