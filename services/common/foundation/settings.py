"""Settings read once from the environment and passed explicitly to what needs them.

Every field's environment variable is its name in upper case (DATABASE_URL for
database_url), so the table in the README and this class cannot drift apart.
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
    # How long a service waits for the sidecar before it reads the database instead.
    cache_timeout: float = 0.25
    # How long a cached "not found" lives.
    cache_negative_ttl: float = 30.0
    # The longest an entry cached in memory while Redis is away may live.
    cache_fallback_ttl: float = 5.0
    # How long the sidecar waits for Redis before it answers from memory (at most 0.25).
    redis_timeout: float = 0.1
    # Each service's in-process near-cache, fed by the sidecar's Watch (0 turns it off).
    cache_near_size: int = 1024
    cache_near_ttl: float = 10.0
    # How often each writing process's relay compares the cache's position with the
    # invalidation log and sends what the cache missed (docs/cache.md).
    relay_interval: float = 0.25
    # How long the invalidation log keeps its entries (seconds); a cache further
    # behind than that is cleared instead.
    invalidation_log_retention: float = 3600.0
    agents_addr: str = "127.0.0.1:50051"
    workflows_addr: str = "127.0.0.1:50052"
    cache_addr: str = "127.0.0.1:50053"
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8100
    # Default deadline the gateway puts on every gRPC call it makes.
    gateway_timeout: float = 10.0
    # What one client connection may hold (gateway/connections.py): bytes of request
    # line and headers, seconds to send a whole request, seconds idle between requests.
    gateway_max_header_bytes: int = 8192
    gateway_read_timeout: float = 10.0
    gateway_keepalive_timeout: float = 5.0
    # The gateway's edge cache of ready GET answers (services/cache/edge/store.py): entries,
    # bytes, and the longest an answer is kept whatever its max-age; 0 entries turns it off.
    gateway_edge_cache_size: int = 1024
    gateway_edge_cache_bytes: int = 32 * 1024 * 1024
    gateway_edge_cache_ttl: float = 10.0
    # Steps one execution may run at once.
    workflow_max_parallel: int = 8
    # An execution whose runner has not renewed its lease for this long is failed.
    workflow_lease_ttl: float = 15.0
    # How many events the events table keeps; older ones are pruned in the background.
    events_retention: int = 1_000_000
    events_prune_interval: float = 60.0
    # How long (seconds) a request_id's first answer is kept for its retries (AIP-155);
    # pruned with the events.
    idempotency_retention: float = 86400.0
    # How often buffered events are written, and how often streams look for new ones.
    events_flush_interval: float = 0.1
    events_poll_interval: float = 0.2
    workers: int = 1
    # A unix socket where this one process also serves (its health, for the launcher's
    # liveness checks): WORKERS processes share their port, so each needs its own door.
    health_socket: str = ""
    # gRPC server reflection (grpcurl, ghz without proto files); off in Kubernetes.
    grpc_reflection: bool = True
    # Connections each client keeps to each gRPC backend address; calls are spread
    # over them one by one, so WORKERS processes sharing a port all take a share.
    grpc_connections: int = 4
    auth_enabled: bool = True
    allow_anonymous_read: bool = True
    # An admin key to create at start if it does not exist (the first key of an install).
    bootstrap_admin_key: str = dataclasses.field(default="", repr=False)
    # The key the services present to each other; `make run` makes one when unset.
    service_api_key: str = dataclasses.field(default="", repr=False)
    # Token buckets per key (per client address for anonymous reads); 0 turns one off.
    # The gateway limits what comes through it, the services their direct callers;
    # shared through Redis with REDIS_URL (docs/resilience.md, "Rate limits").
    # A bucket holds `requests` tokens and refills them over `window` seconds. Per
    # second, and above what one gateway process serves from its edge cache (README
    # "Rate limits"): one caller cannot take more than a server's worth, and a load
    # test from one address (hey -n 10000 -c 100, round after round) is answered.
    rate_limit_requests: int = 20000
    rate_limit_window: float = 1.0
    rate_limit_execute_requests: int = 100
    rate_limit_execute_window: float = 60.0
    # Peers from which the services accept x-forwarder-key, the services' key on a
    # call the gateway admitted and limited (networks, comma separated); empty: any.
    trusted_proxies: str = ""
    # Proxies in front of the gateway whose X-Forwarded-For it believes; empty: none,
    # and the client is the connection's peer.
    gateway_trusted_proxies: str = ""
    # Origins allowed by CORS, comma separated; empty: no cross-origin access.
    cors_origins: str = ""
    # How deeply a JSON request body may nest.
    max_json_depth: int = 32
    profiling_enabled: bool = False
    # How long in-flight calls may run on after SIGTERM.
    shutdown_grace: float = 5.0
    log_level: str = "INFO"
    # Observability (docs/observability.md). Each gRPC service serves Prometheus
    # /metrics on a port of its own, on its *_ADDR host (0: no endpoint); the gateway
    # serves /metrics on GATEWAY_PORT.
    agents_metrics_port: int = 9101
    workflows_metrics_port: int = 9102
    cache_metrics_port: int = 9103
    # "text" for people, "json" for log collectors (one object a line, with ids).
    log_format: str = "text"
    # With PROFILING_ENABLED, requests slower than this many seconds log their profile.
    profiling_threshold: float = 0.5
    # Traces are exported over OTLP to this endpoint; unset, nothing is traced.
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

    @property
    def database_url_redacted(self) -> str:
        """DATABASE_URL without its password, fit for a log line."""
        return redact(self.database_url)


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
