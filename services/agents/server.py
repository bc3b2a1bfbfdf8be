"""Wiring for the agents service: database, migrations, cache client, servicers, host."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from devops_hub.v1 import agents_pb2, agents_pb2_grpc, auth_pb2, auth_pb2_grpc, options_pb2

from services.agents.agent_executions import AgentExecutions, RuntimeChannels
from services.agents.agents import Agents
from services.agents.api_keys import ApiKeys
from services.agents.api_keys_servicer import ApiKeysServicer
from services.agents.repository import AgentRepository
from services.agents.servicer import AgentsServicer
from services.common.auth.rate_limit import RateLimiter
from services.common.auth.repository import ApiKeyRepository
from services.common.auth.verifier import DatabaseVerifier
from services.common.auth.wiring import build_guard, build_limiter
from services.common.cache.client import CacheClient
from services.common.db import Database
from services.common.db.startup import build_on_database
from services.common.grpc_host import GrpcHost, run_until_stopped
from services.common.invalidation_relay import InvalidationRelay, build_relay
from services.common.outbox import Outbox
from services.common.settings import Settings
from services.common.telemetry import Telemetry
from services.common.telemetry.metrics import ServiceMetrics, service_metrics

SERVICE_NAME = agents_pb2.DESCRIPTOR.services_by_name["AgentsService"].full_name
KEYS_SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["ApiKeysService"].full_name


@dataclass
class AgentsService:
    host: GrpcHost
    db: Database
    cache: CacheClient
    relay: InvalidationRelay
    runtimes: RuntimeChannels
    verifier: DatabaseVerifier
    limiter: RateLimiter

    async def start(self) -> int:
        port = await self.host.start()
        self.relay.start()
        return port

    async def close(self) -> None:
        await self.relay.stop()
        await self.verifier.close()
        await self.limiter.close()
        await self.runtimes.close()
        await self.cache.close()
        await self.db.close()


async def build(settings: Settings, metrics: ServiceMetrics | None = None) -> AgentsService:
    """The service on `metrics` (by default the process's, in the default registry)."""
    metrics = metrics or service_metrics()
    return await build_on_database(settings, lambda db: _assemble(settings, db), pools=metrics.pools)


async def _assemble(settings: Settings, db: Database) -> AgentsService:
    # With its near-cache (fed by the sidecar's Watch) and the services' key.
    cache = CacheClient.from_settings(settings, watch_prefixes=["agents:"])
    agents = Agents(AgentRepository(db), cache, Outbox(db, cache, "agents"))
    runtimes = RuntimeChannels()
    verifier = DatabaseVerifier(ApiKeyRepository(db))
    api_keys = ApiKeys(ApiKeyRepository(db), verifier, settings.service_api_key)
    await _ensure_configured_keys(api_keys, settings)
    limiter = build_limiter(settings)
    host = GrpcHost(
        settings.agents_addr, guard=build_guard(settings, verifier, limiter), reflection=settings.grpc_reflection
    )
    host.add(
        agents_pb2_grpc.add_AgentsServiceServicer_to_server,
        AgentsServicer(agents, AgentExecutions(agents, runtimes)),
        SERVICE_NAME,
    )
    host.add(auth_pb2_grpc.add_ApiKeysServiceServicer_to_server, ApiKeysServicer(api_keys), KEYS_SERVICE_NAME)
    return AgentsService(
        host=host,
        db=db,
        cache=cache,
        relay=build_relay(settings, db),
        runtimes=runtimes,
        verifier=verifier,
        limiter=limiter,
    )


async def _ensure_configured_keys(api_keys: ApiKeys, settings: Settings) -> None:
    """BOOTSTRAP_ADMIN_KEY (an install's first key) exists as an admin key once the
    agents service runs. SERVICE_API_KEY is never stored (services/agents/api_keys.py):
    a copy an earlier version stored is deleted, so the API cannot list or revoke it."""
    log = logging.getLogger(__name__)
    if settings.bootstrap_admin_key and await api_keys.ensure(settings.bootstrap_admin_key, "bootstrap admin", [options_pb2.SCOPE_ADMIN]):
        log.info("created the bootstrap admin key from the environment")
    if settings.service_api_key and await api_keys.forget(settings.service_api_key):
        log.info("deleted the stored copy of the services' key: it is not a database key")


async def main() -> None:
    settings = Settings.from_env()
    telemetry = Telemetry.start(settings, "agents")
    service = await build(settings)
    service.relay.start()
    await telemetry.serve_metrics("agents service", settings.agents_addr, settings.agents_metrics_port)
    await run_until_stopped(service.host, "agents service", settings.shutdown_grace, [service.close, telemetry.close])


if __name__ == "__main__":
    asyncio.run(main())
