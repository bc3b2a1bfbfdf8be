"""Observability shared by every serving process: metrics, traces, logs and profiles.

A process's run() (services/common/runtime/process.py) calls Telemetry.start() before it
builds anything (logging is then in place for what it builds, and the Telemetry holds
the tracer and the profiler the wiring hands to each part), serves its metrics, and
closes the Telemetry last. docs/observability.md is the operator's side; each module's
first line says what it holds.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import disable_created_metrics, multiprocess

from services.common.foundation.settings import Settings
from services.common.telemetry import logs, profiling, tracing
from services.common.telemetry.endpoint import MetricsEndpoint, Refresher, host_of
from services.common.telemetry.metrics import ServiceMetrics, multiprocess_dir, prepare_multiprocess, service_metrics
from services.common.telemetry.profiling import SlowRequestProfiler

__all__ = ["Telemetry"]


@dataclasses.dataclass
class Telemetry:
    service: str
    # The process's metrics (the default registry): what serve_metrics() serves.
    metrics: ServiceMetrics
    provider: TracerProvider | None = None
    # What the wiring hands to the parts it builds; None when off.
    tracer: trace.Tracer | None = None
    profiler: SlowRequestProfiler | None = None
    endpoint: MetricsEndpoint | None = None

    @classmethod
    def start(cls, settings: Settings, service: str) -> Telemetry:
        """Logging, tracing and profiling for this process, as settings say."""
        logs.configure(settings, service)
        # No `_created` series beside every counter and histogram: they double what a
        # scrape carries, and rate() does not need them.
        disable_created_metrics()
        prepare_multiprocess()
        provider = tracing.configure(settings, service)
        return cls(
            service,
            service_metrics(),
            provider=provider,
            tracer=tracing.tracer_of(provider),
            profiler=profiling.configure(settings),
        )

    async def serve_metrics(self, name: str, address: str, port: int, refreshers: Sequence[Refresher] = ()) -> None:
        """GET /metrics on `port` (0: none) of the host the service listens on, said like
        the service's own listening line; none either when the port is taken."""
        if port == 0:
            return
        endpoint = MetricsEndpoint(metrics=self.metrics, refreshers=refreshers)
        bound = await endpoint.start(host_of(address), port)
        if bound is not None:
            self.endpoint = endpoint
            print(f"{name} metrics on http://{host_of(address) or '0.0.0.0'}:{bound}/metrics\n", end="", flush=True)

    async def close(self) -> None:
        if self.endpoint is not None:
            await self.endpoint.close()
            self.endpoint = None
        # The spans still buffered are flushed; in multiprocess mode this process's live
        # gauges retire, so the survivors' sums no longer count it.
        if self.provider is not None:
            self.provider.shutdown()
            self.provider = None
        directory = multiprocess_dir()
        if directory:
            multiprocess.mark_process_dead(os.getpid(), directory)
