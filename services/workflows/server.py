"""Wiring for the workflows service: database, event log, engine, servicers, host."""

from __future__ import annotations

from dataclasses import dataclass

from devops_hub.client import Client
from devops_hub.v1 import agents_pb2, events_pb2, events_pb2_grpc, workflows_pb2, workflows_pb2_grpc

from services.cache.client.client import CacheClient
from services.cache.client.manager import CacheManager
from services.cache.consistency import ConsistencyMetrics
from services.cache.log.outbox import Outbox
from services.cache.log.relay import InvalidationRelay, build_relay
from services.common.auth.repository import ApiKeyRepository
from services.common.auth.verifier import DatabaseVerifier
from services.common.auth.wiring import Access
from services.common.data.db import Database
from services.common.data.event_repository import EventRepository
from services.common.data.idempotency_repository import IdempotencyRepository
from services.common.runtime.grpc_host import GrpcHost
from services.common.runtime.process import GrpcProcess, OnDatabase, on_database, run
from services.common.transport.channels import service_client
from services.common.usecases.events import EventWriter
from services.workflows.engine import Engine
from services.workflows.event_feed import EventFeed
from services.workflows.events import Events
from services.workflows.executions import Executions
from services.workflows.metrics import WorkflowMetrics
from services.workflows.repository import ExecutionRepository, WorkflowRepository
from services.workflows.retention import Pruner
from services.workflows.servicer import EventsServicer, WorkflowsServicer
from services.workflows.workflows import Workflows

WORKFLOWS_SERVICE = workflows_pb2.DESCRIPTOR.services_by_name["WorkflowsService"].full_name
EVENTS_SERVICE = events_pb2.DESCRIPTOR.services_by_name["EventsService"].full_name


@dataclass
class WorkflowsService(GrpcProcess):
    host: GrpcHost
    metrics_port: int
    db: Database
    engine: Engine
    events: EventWriter
    feed: EventFeed
    pruner: Pruner
    cache: CacheClient
    relay: InvalidationRelay
    agents: Client
    access: Access

    async def start_work(self) -> None:
        # Before the host (GrpcProcess.start): the engine fails what a dead process
        # left RUNNING before anyone can read it or submit beside it.
        await self.engine.start()
        self.pruner.start()
        self.relay.start()

    async def close(self) -> None:
        await self.engine.stop()
        await self.pruner.stop()
        await self.relay.stop()
        await self.feed.close()
        await self.events.close()
        await self.agents.close()
        await self.access.close()
        await self.cache.close()
        await self.db.close()


async def _assemble(wiring: OnDatabase) -> WorkflowsService:
    settings, db, metrics, tracer = wiring.settings, wiring.db, wiring.metrics, wiring.tracer
    cache = CacheClient.from_settings(
        settings, watch_prefixes=["workflows:"], consistency=metrics.group(ConsistencyMetrics), tracer=tracer
    )
    # 5 s unless a call says otherwise (a step's run).
    agents = service_client(settings, agents_pb2.DESCRIPTOR.services_by_name["AgentsService"], timeout=5, tracer=tracer)
    writer = EventWriter(db, "workflows", flush_interval=settings.events_flush_interval)
    feed = EventFeed(db, poll_interval=settings.events_poll_interval)
    events = Events(db, writer, feed)
    executions_repository = ExecutionRepository(db)
    engine = Engine(
        executions_repository,
        agents,
        writer,
        metrics.group(WorkflowMetrics),
        max_parallel=settings.workflow_max_parallel,
        lease_ttl=settings.workflow_lease_ttl,
    )
    relay = build_relay(settings, db, tracer)
    workflows = Workflows(WorkflowRepository(db), agents, CacheManager(cache), Outbox(db, cache, relay, "workflows"))
    executions = Executions(workflows, executions_repository, engine, events)
    access = Access.build(settings, DatabaseVerifier(ApiKeyRepository(db)))
    host = wiring.host(settings.workflows_addr, access.guard)
    host.add(workflows_pb2_grpc.add_WorkflowsServiceServicer_to_server, WorkflowsServicer(workflows, executions), WORKFLOWS_SERVICE)
    host.add(events_pb2_grpc.add_EventsServiceServicer_to_server, EventsServicer(events), EVENTS_SERVICE)
    pruner = Pruner(
        EventRepository(db), settings.events_retention, settings.events_prune_interval, IdempotencyRepository(db), settings.idempotency_retention
    )
    return WorkflowsService(
        host=host,
        metrics_port=settings.workflows_metrics_port,
        db=db,
        engine=engine,
        events=writer,
        feed=feed,
        pruner=pruner,
        cache=cache,
        relay=relay,
        agents=agents,
        access=access,
    )


build = on_database(_assemble)


def main() -> None:
    run(build, name="workflows service", service="workflows")
