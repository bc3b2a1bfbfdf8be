"""Wiring for the agents service: database, migrations, cache client, servicers, host."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from devops_hub.v1 import agents_pb2, agents_pb2_grpc, auth_pb2, auth_pb2_grpc, options_pb2

from services.agents.agent_executions import AgentExecutions, RuntimeChannels
from services.agents.agents import Agents
from services.agents.api_keys import ApiKeys
from services.agents.api_keys_servicer import ApiKeysServicer
from services.agents.repository import AgentRepository
from services.agents.servicer import AgentsServicer
from services.cache.client.client import CacheClient
from services.cache.client.manager import CacheManager
from services.cache.consistency import ConsistencyMetrics
from services.cache.log.outbox import Outbox
from services.cache.log.relay import InvalidationRelay, build_relay
from services.common.auth.repository import ApiKeyRepository
from services.common.auth.verifier import DatabaseVerifier
from services.common.auth.wiring import Access
from services.common.data.db import Database
from services.common.foundation.settings import Settings
from services.common.runtime.grpc_host import GrpcHost
from services.common.runtime.process import GrpcProcess, OnDatabase, on_database, run

SERVICE_NAME = agents_pb2.DESCRIPTOR.services_by_name["AgentsService"].full_name
KEYS_SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["ApiKeysService"].full_name


@dataclass
class AgentsService(GrpcProcess):
    host: GrpcHost
    metrics_port: int
    db: Database
    cache: CacheClient
    relay: InvalidationRelay
    runtimes: RuntimeChannels
    access: Access

    async def start_work(self) -> None:
        self.relay.start()

    async def close(self) -> None:
        await self.relay.stop()
        await self.access.close()
        await self.runtimes.close()
        await self.cache.close()
        await self.db.close()


async def _assemble(wiring: OnDatabase) -> AgentsService:
    settings, db, metrics, tracer = wiring.settings, wiring.db, wiring.metrics, wiring.tracer
    # With its near-cache (fed by the sidecar's Watch) and the services' key.
    cache = CacheClient.from_settings(
        settings, watch_prefixes=["agents:"], consistency=metrics.group(ConsistencyMetrics), tracer=tracer
    )
    relay = build_relay(settings, db, tracer)
    outbox = Outbox(db, cache, relay, "agents")
    agents = Agents(AgentRepository(db), CacheManager(cache), outbox)
    runtimes = RuntimeChannels(tracer=tracer)
    verifier = DatabaseVerifier(ApiKeyRepository(db))
    api_keys = ApiKeys(ApiKeyRepository(db), outbox, verifier, settings.service_api_key)
    await _ensure_configured_keys(api_keys, settings)
    access = Access.build(settings, verifier)
    host = wiring.host(settings.agents_addr, access.guard)
    host.add(
        agents_pb2_grpc.add_AgentsServiceServicer_to_server,
        AgentsServicer(agents, AgentExecutions(agents, runtimes)),
        SERVICE_NAME,
    )
    host.add(auth_pb2_grpc.add_ApiKeysServiceServicer_to_server, ApiKeysServicer(api_keys), KEYS_SERVICE_NAME)
    return AgentsService(
        host=host,
        metrics_port=settings.agents_metrics_port,
        db=db,
        cache=cache,
        relay=relay,
        runtimes=runtimes,
        access=access,
    )


build = on_database(_assemble)


async def _ensure_configured_keys(api_keys: ApiKeys, settings: Settings) -> None:
    """BOOTSTRAP_ADMIN_KEY (an install's first key) is stored as an admin key; a copy of
    SERVICE_API_KEY an earlier version stored is deleted (services/agents/api_keys.py)."""
    log = logging.getLogger(__name__)
    if settings.bootstrap_admin_key and await api_keys.ensure(settings.bootstrap_admin_key, "bootstrap admin", [options_pb2.SCOPE_ADMIN]):
        log.info("created the bootstrap admin key from the environment")
    if settings.service_api_key and await api_keys.forget(settings.service_api_key):
        log.info("deleted the stored copy of the services' key: it is not a database key")


def main() -> None:
    run(build, name="agents service", service="agents")
