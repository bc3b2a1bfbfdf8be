"""Wiring for the agents service: database, migrations, cache client, servicers, host."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from devops_hub.v1 import agents_pb2, agents_pb2_grpc

from services.agents.execution import AgentExecutor, RuntimeChannels
from services.agents.registry import AgentRegistry
from services.agents.repository import AgentRepository
from services.agents.servicer import AgentsServicer
from services.cache_sidecar.client import CacheClient
from services.common.db import Database, connect
from services.common.db.migrate import migrate
from services.common.events import EventWriter
from services.common.grpc_host import GrpcHost, run_until_stopped
from services.common.settings import Settings

SERVICE_NAME = agents_pb2.DESCRIPTOR.services_by_name["AgentsService"].full_name


@dataclass
class AgentsService:
    host: GrpcHost
    db: Database
    cache: CacheClient
    events: EventWriter
    runtimes: RuntimeChannels

    async def close(self) -> None:
        await self.runtimes.close()
        await self.events.close()
        await self.cache.close()
        await self.db.close()


async def build(settings: Settings) -> AgentsService:
    db = await connect(
        settings.database_url, pool_size=settings.database_pool_size, max_overflow=settings.database_max_overflow
    )
    await migrate(db)
    cache = CacheClient(settings.cache_addr, timeout=settings.cache_timeout)
    events = EventWriter(db, "agents", flush_interval=settings.events_flush_interval)
    registry = AgentRegistry(AgentRepository(db), cache, events)
    runtimes = RuntimeChannels()
    host = GrpcHost(settings.agents_addr)
    host.add(
        agents_pb2_grpc.add_AgentsServiceServicer_to_server,
        AgentsServicer(registry, AgentExecutor(registry, runtimes)),
        SERVICE_NAME,
    )
    return AgentsService(host=host, db=db, cache=cache, events=events, runtimes=runtimes)


async def main() -> None:
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = await build(settings)
    await run_until_stopped(service.host, "agents service", settings.shutdown_grace, [service.close])


if __name__ == "__main__":
    asyncio.run(main())
