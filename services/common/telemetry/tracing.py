"""OpenTelemetry tracing: on when OTEL_EXPORTER_OTLP_ENDPOINT is set, free when it is not.

configure() builds a TracerProvider exporting over OTLP (docs/observability.md,
"Traces"); the wiring hands its tracer to each part it builds, and a part given None
has no tracing layer, its db_span() hands back one shared no-op context, and the
channels it opens carry no interceptor.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from services.common.foundation.settings import Settings

log = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "devops_hub"
PROTOCOLS = ("grpc", "http/protobuf")

_NO_SPAN: AbstractContextManager[None] = contextlib.nullcontext()


def tracer_of(provider: TracerProvider | None) -> trace.Tracer | None:
    """Apart from configure(): tests make a provider with an in-memory exporter."""
    return None if provider is None else provider.get_tracer(INSTRUMENTATION_NAME)


def configure(settings: Settings, service: str, env: Mapping[str, str] | None = None) -> TracerProvider | None:
    endpoint = settings.otel_exporter_otlp_endpoint
    if not endpoint:
        return None
    protocol = settings.otel_exporter_otlp_protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    env = os.environ if env is None else env
    resource = Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME") or f"devops-hub-{service}"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(_exporter(endpoint, protocol)))
    log.info("tracing: exporting spans over OTLP (%s) to %s", protocol, endpoint)
    return provider


def _exporter(endpoint: str, protocol: str) -> Any:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    # The general endpoint names the collector; traces go to its /v1/traces.
    return HttpExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")


# --- database spans ----------------------------------------------------------------------

_TARGET = re.compile(r"\b(?:FROM|INTO|UPDATE|JOIN)\s+([A-Za-z_][\w.]*)", re.IGNORECASE)


@functools.lru_cache(maxsize=1024)
def _db_span_name(sql: str) -> str:
    # "{operation} {table}", as the semantic conventions name database spans. Repository
    # SQL is a fixed set of strings, so this is worked out once per statement.
    words = sql.split(None, 1)
    operation = words[0].upper() if words else "SQL"
    target = _TARGET.search(sql)
    return f"{operation} {target.group(1)}" if target else operation


def db_span(tracer: trace.Tracer | None, system: str, sql: str) -> AbstractContextManager[Any]:
    """A CLIENT span around one statement: its SQL, never its arguments."""
    if tracer is None:
        return _NO_SPAN
    return tracer.start_as_current_span(
        _db_span_name(sql),
        kind=trace.SpanKind.CLIENT,
        attributes={"db.system.name": system, "db.query.text": sql},
    )
