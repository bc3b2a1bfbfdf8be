"""Settings read once from the environment and passed explicitly to what needs them.

Every field's environment variable is its name in upper case (DATABASE_URL for
database_url); README.md, "Settings", says what each one means.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///var/devops_hub.db"
    database_pool_size: int = 10
    database_max_overflow: int = 20
    redis_url: str = ""
    redis_max_connections: int = 100
    # Every Redis key DevOps Hub writes starts with this, so installs can share a Redis.
    redis_key_prefix: str = "dh:"
    cache_default_ttl: float = 300.0
    cache_max_size: int = 1000
    cache_max_bytes: int = 64 * 1024 * 1024
    cache_timeout: float = 0.25
    cache_negative_ttl: float = 30.0
    cache_fallback_ttl: float = 5.0
    redis_timeout: float = 0.1
    cache_near_size: int = 1024
    cache_near_ttl: float = 10.0
    relay_interval: float = 0.25
    invalidation_log_retention: float = 3600.0
    agents_addr: str = "127.0.0.1:50051"
    workflows_addr: str = "127.0.0.1:50052"
    cache_addr: str = "127.0.0.1:50053"
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8100
    gateway_timeout: float = 10.0
    gateway_max_header_bytes: int = 8192
    gateway_read_timeout: float = 10.0
    gateway_keepalive_timeout: float = 5.0
    gateway_edge_cache_size: int = 1024
    gateway_edge_cache_bytes: int = 32 * 1024 * 1024
    gateway_edge_cache_ttl: float = 10.0
    workflow_max_parallel: int = 8
    workflow_lease_ttl: float = 15.0
    events_retention: int = 1_000_000
    events_prune_interval: float = 60.0
    idempotency_retention: float = 86400.0
    events_flush_interval: float = 0.1
    events_poll_interval: float = 0.2
    workers: int = 1
    # WORKERS processes share their port, so each needs a door of its own for the
    # launcher's liveness checks.
    health_socket: str = ""
    grpc_reflection: bool = True
    # Calls are spread over these one by one, so WORKERS processes sharing a port all
    # take a share (channels.py).
    grpc_connections: int = 4
    auth_enabled: bool = True
    allow_anonymous_read: bool = True
    bootstrap_admin_key: str = dataclasses.field(default="", repr=False)
    service_api_key: str = dataclasses.field(default="", repr=False)
    # Per second, and above what one gateway process serves from its edge cache: one
    # caller cannot take more than a server's worth, and a load test from one address
    # (hey -n 10000 -c 100, round after round) is answered.
    rate_limit_requests: int = 20000
    rate_limit_window: float = 1.0
    rate_limit_execute_requests: int = 100
    rate_limit_execute_window: float = 60.0
    # Empty: any, since the services' key is the proof (docs/resilience.md, "Rate limits").
    trusted_proxies: str = ""
    gateway_trusted_proxies: str = ""
    cors_origins: str = ""
    max_json_depth: int = 32
    profiling_enabled: bool = False
    shutdown_grace: float = 5.0
    log_level: str = "INFO"
    agents_metrics_port: int = 9101
    workflows_metrics_port: int = 9102
    cache_metrics_port: int = 9103
    log_format: str = "text"
    profiling_threshold: float = 0.5
    otel_exporter_otlp_endpoint: str = ""
    otel_exporter_otlp_protocol: str = "grpc"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(field.name.upper())
            if raw is None or raw == "":
                continue
            values[field.name] = _parse(field.name, field.type, raw)
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def backend_address(self, backend: str) -> str:
        """Where the part named `backend` (a service's `option (backend)`) listens: its
        `<backend>_addr`. The one place that naming rule is written."""
        address = getattr(self, f"{backend}_addr", None)
        if address is None:
            raise ValueError(f"backend {backend!r} has no address: add {backend}_addr (read from {backend.upper()}_ADDR) to Settings")
        if not address:
            raise ValueError(f"backend {backend!r} has no address: {backend.upper()}_ADDR is empty")
        return str(address)


def redact(url: str) -> str:
    """`url` without its password, fit for a log line."""
    scheme, sep, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{location}"


def _parse(name: str, kind: Any, raw: str) -> Any:
    kind = kind if isinstance(kind, str) else kind.__name__
    try:
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, got {raw!r}")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        return raw
    except ValueError as exc:
        raise ValueError(f"{name.upper()}: {exc}") from None
