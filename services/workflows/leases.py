"""Leases: no execution outlives the process that runs it silently.

Each process holds a lease (its `owner` id and an expiry) on every execution it runs
and renews them all in one statement every lease_ttl/3. Any replica fails the active
executions whose lease ran out, and picks up cancels another replica wrote for the
executions it runs, since that replica cannot reach their tasks.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid

from services.common.contract.errors import Unavailable
from services.common.foundation.background import cancel_and_wait, spawn
from services.common.foundation.clock import utc_now
from services.workflows.cancellation import BY_REQUEST, LocalExecutions
from services.workflows.metrics import WorkflowMetrics
from services.workflows.progress import ExecutionProgress
from services.workflows.repository import ExecutionRepository

log = logging.getLogger(__name__)

EXPIRED = "the service running this execution stopped (its lease expired)"


class Leases:
    def __init__(
        self, repository: ExecutionRepository, local: LocalExecutions, progress: ExecutionProgress, metrics: WorkflowMetrics, *, ttl: float
    ) -> None:
        self._repository = repository
        self._local = local
        self._progress = progress
        self._metrics = metrics
        self._ttl = ttl
        # A new owner per process: a restarted process does not renew its
        # predecessor's leases, so what that one ran is reaped, not left hanging.
        self.owner = uuid.uuid4().hex
        self._maintenance: asyncio.Task[None] | None = None

    def expiry(self) -> dt.datetime:
        return utc_now() + dt.timedelta(seconds=self._ttl)

    async def start(self) -> None:
        """Fails what a stopped process left running, then keeps the leases."""
        try:
            await self._reap()
        except Exception:  # noqa: BLE001 - the maintenance loop tries again shortly
            log.exception("failing executions left by a stopped process failed; will retry")
        self._maintenance = spawn(self._maintain(), name="engine-maintenance", essential=True)

    async def stop(self) -> None:
        if self._maintenance is not None:
            await cancel_and_wait(self._maintenance)

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                await self._repository.renew_leases(self.owner, self.expiry())
                for execution_id in await self._repository.cancelled_among(self._local.ids()):
                    await self._local.stop(execution_id, BY_REQUEST)
                await self._reap()
            except Exception as exc:  # noqa: BLE001 - try again next round
                # A database that is away was logged once, by services.common.data.outages.
                if not isinstance(exc, Unavailable):
                    log.exception("execution maintenance failed")

    async def _reap(self) -> None:
        for execution in await self._repository.reap_expired(utc_now(), EXPIRED):
            self._metrics.execution_ended(execution)
            self._progress.emit(execution, "execution.failed", {"error": EXPIRED})
