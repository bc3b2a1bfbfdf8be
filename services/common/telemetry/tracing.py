"""OpenTelemetry tracing: on when OTEL_EXPORTER_OTLP_ENDPOINT is set, free when it is not.

configure() builds a TracerProvider that exports over OTLP (gRPC, or HTTP with
OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf; the exporter reads the other OTEL_EXPORTER_*
variables itself, the provider OTEL_TRACES_SAMPLER and OTEL_RESOURCE_ATTRIBUTES) and
installs it here. Without an endpoint nothing is installed: tracer() is None, the
servers' call wrappers and the gateway's front pass are built without a tracing layer, db_span() hands back
one shared no-op context, and the channel factory adds no interceptor.

Spans cross processes as W3C trace context (`traceparent`, `tracestate`) in the gRPC
metadata: the servers' call wrapper extracts it, and every channel the channel factory
(services/common/channels.py) opens while tracing is installed injects it
(grpc_client.py). The tracer is read when a part is built, never patched into gRPC.
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

from services.common.settings import Settings

log = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "devops_hub"
PROTOCOLS = ("grpc", "http/protobuf")

_NO_SPAN: AbstractContextManager[None] = contextlib.nullcontext()
_tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None


def tracer() -> trace.Tracer | None:
    """The tracer of this process, or None when tracing is off."""
    return _tracer


def install(provider: TracerProvider) -> None:
    """Traces this process into `provider` from now on (tests install one with an
    in-memory exporter)."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer(INSTRUMENTATION_NAME)


def uninstall() -> None:
    """Stops tracing; channels opened from now on are plain again."""
    global _tracer, _provider
    _tracer = None
    _provider = None


def configure(settings: Settings, service: str, env: Mapping[str, str] | None = None) -> TracerProvider | None:
    """Installs an OTLP-exporting provider when settings name an endpoint; None otherwise.

    The service name is OTEL_SERVICE_NAME when set, else devops-hub-<service>.
    """
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
    install(provider)
    log.info("tracing: exporting spans over OTLP (%s) to %s", protocol, endpoint)
    return provider


def _exporter(endpoint: str, protocol: str) -> Any:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    # The general endpoint names the collector; traces go to its /v1/traces.
    return HttpExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")


def shutdown() -> None:
    """Exports what is still buffered and stops tracing."""
    provider = _provider
    uninstall()
    if provider is not None:
        provider.shutdown()


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


def db_span(system: str, sql: str) -> AbstractContextManager[Any]:
    """A CLIENT span around one statement (its SQL, never its arguments); a shared no-op
    when tracing is off."""
    current = _tracer
    if current is None:
        return _NO_SPAN
    return current.start_as_current_span(
        _db_span_name(sql),
        kind=trace.SpanKind.CLIENT,
        attributes={"db.system.name": system, "db.query.text": sql},
    )
