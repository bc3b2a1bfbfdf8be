"""How a service that owns tables starts on its database."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from opentelemetry import trace

from services.common.data.db.database import Database, connect
from services.common.data.db.migrate import migrate
from services.common.foundation.settings import Settings
from services.common.telemetry.metrics import PoolMetrics

T = TypeVar("T")


async def build_on_database(
    settings: Settings, assemble: Callable[[Database], Awaitable[T]], *, pools: PoolMetrics, tracer: trace.Tracer | None
) -> T:
    """Connects to DATABASE_URL (its pool reported in `pools`, its statements traced
    into `tracer`), migrates, then builds the service on the database.

    A build that fails closes the database: its open connections (aiosqlite's threads)
    would otherwise keep a process that cannot start from ever exiting.
    """
    db = await connect(
        settings.database_url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
        pools=pools,
        tracer=tracer,
    )
    try:
        await migrate(db)
        return await assemble(db)
    except BaseException:
        await db.close()
        raise
