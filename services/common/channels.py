"""The one way any part of DevOps Hub opens a gRPC channel to another part.

Calls are spread per call, not per connection. A single grpc.aio channel holds one
HTTP/2 connection per resolved address, and with WORKERS processes sharing a port
(SO_REUSEPORT) the kernel hands that one connection to one process: every call of a
client would land on the same worker. So open_channel() keeps `connections`
channels to the address, each with its own connection (a channel-local subchannel
pool), and hands each call to the next one that is not failing. Each of those
channels also balances with round_robin over whatever its address resolves to, so
`dns:///agents-headless:50051` (a Kubernetes headless Service) reaches every pod.

Clients find a service of the system at service_address(): the address of the backend
its proto declares. service_channel() opens the usual channel there (the services' key,
GRPC_CONNECTIONS), so no client names an address setting; service_client() wraps such
channels in the client package's Client.

Every channel in the system is opened here, so what a call carries is decided here
and nowhere else: the services' key when asked for (the client package's
key_interceptors, which every client of DevOps Hub uses), and, while
tracing is on, the interceptors that give each call a CLIENT span and pass its trace
context on (telemetry/grpc_client.py). The tracer is the one tracing installed when
the channel is opened, unless the caller passes its own (or None); gRPC itself is never
patched, so a channel opened with grpc.aio directly carries nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc
from devops_hub.channels import key_interceptors
from devops_hub.client import Client
from google.protobuf.descriptor import ServiceDescriptor
from opentelemetry import trace

from services.common.api import backend_of
from services.common.limits import GRPC_SIZE_OPTIONS
from services.common.settings import Settings
from services.common.telemetry import tracing
from services.common.telemetry.grpc_client import tracing_interceptors

DEFAULT_CONNECTIONS = 4

BASE_OPTIONS: tuple[tuple[str, Any], ...] = (
    *GRPC_SIZE_OPTIONS,
    ("grpc.lb_policy_name", "round_robin"),
    # Each channel its own connections: with the process-wide pool, channels to one
    # address would share a single connection and so a single worker.
    ("grpc.use_local_subchannel_pool", 1),
    # A restarted backend is found again within seconds instead of gRPC's default
    # back-off of up to two minutes, during which every call would fail fast.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

# "Whatever tracing has installed": tracing.tracer() read when the channel is opened.
_INSTALLED: Any = object()


def open_channel(
    address: str,
    *,
    api_key: str = "",
    connections: int = DEFAULT_CONNECTIONS,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    tracer: trace.Tracer | None = _INSTALLED,
) -> grpc.aio.Channel:
    """A channel to `address` whose calls are spread over `connections` connections,
    presenting `api_key` on every call that does not carry a key of its own, and traced
    into `tracer` (by default the installed one; None: not traced)."""
    chosen = [*key_interceptors(api_key), *interceptors, *call_tracing(address, tracer)]
    merged = [*dict([*BASE_OPTIONS, *options]).items()]
    channels = [
        grpc.aio.insecure_channel(address, options=merged, interceptors=chosen or None)
        for _ in range(max(1, connections))
    ]
    return channels[0] if len(channels) == 1 else SpreadChannel(channels)


def call_tracing(address: str, tracer: trace.Tracer | None = _INSTALLED) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors that trace calls to `address`: none while tracing is off."""
    tracer = tracing.tracer() if tracer is _INSTALLED else tracer
    return tracing_interceptors(tracer, address) if tracer is not None else []


def service_address(service: ServiceDescriptor, settings: Settings) -> str:
    """Where `service` is served: the address of the part its proto declares (`option
    (backend)`), so moving a service to another process is a proto change and a setting."""
    backend = backend_of(service)
    if not backend:
        raise ValueError(f"{service.full_name} declares no backend (option (backend), options.proto): it has no address")
    return settings.backend_address(backend)


def service_channel(service: ServiceDescriptor, settings: Settings) -> grpc.aio.Channel:
    """A channel to `service` (service_address) that presents SERVICE_API_KEY on every call
    that carries no key of its own: how one part of the system calls another."""
    return open_channel(
        service_address(service, settings), api_key=settings.service_api_key, connections=settings.grpc_connections
    )


def service_client(settings: Settings, *services: ServiceDescriptor, timeout: float | None = None) -> Client:
    """The client package's Client to `services`, over service_channel()s (one per part):
    how one part of the system calls others through more than a stub."""
    parts = {backend_of(service): service for service in services}
    return Client({backend: service_channel(service, settings) for backend, service in parts.items()}, timeout=timeout)


class _Spread(
    grpc.aio.UnaryUnaryMultiCallable[Any, Any],
    grpc.aio.UnaryStreamMultiCallable[Any, Any],
    grpc.aio.StreamUnaryMultiCallable[Any, Any],
    grpc.aio.StreamStreamMultiCallable[Any, Any],
):
    """A multicallable (of any call type: it only forwards the call) that gives each call
    to the next channel not in TRANSIENT_FAILURE, so a worker that just died costs no
    calls once its connection is known to be gone."""

    def __init__(self, channels: Sequence[grpc.aio.Channel], callables: Sequence[Any]) -> None:
        self._pairs = list(zip(channels, callables))
        self._turn = itertools.cycle(range(len(self._pairs)))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        first = next(self._turn)
        for step in range(len(self._pairs)):
            channel, call = self._pairs[(first + step) % len(self._pairs)]
            if channel.get_state(try_to_connect=False) != grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                return call(*args, **kwargs)
        return self._pairs[first][1](*args, **kwargs)


class SpreadChannel(grpc.aio.Channel):
    """Several channels to one address behind the grpc.aio.Channel interface, so stubs
    and the gateway's multicallables use it unchanged."""

    def __init__(self, channels: Sequence[grpc.aio.Channel]) -> None:
        self.channels = list(channels)

    # The generated stubs pass keywords of their own (_registered_method), so every
    # argument is forwarded as given.
    def _spread(self, kind: str, method: str, *args: Any, **kwargs: Any) -> _Spread:
        return _Spread(self.channels, [getattr(c, kind)(method, *args, **kwargs) for c in self.channels])

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
        return self._spread("unary_unary", method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> grpc.aio.UnaryStreamMultiCallable[Any, Any]:
        return self._spread("unary_stream", method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> grpc.aio.StreamUnaryMultiCallable[Any, Any]:
        return self._spread("stream_unary", method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> grpc.aio.StreamStreamMultiCallable[Any, Any]:
        return self._spread("stream_stream", method, *args, **kwargs)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """READY if any connection is; otherwise the first one's state."""
        states = [c.get_state(try_to_connect) for c in self.channels]
        return grpc.ChannelConnectivity.READY if grpc.ChannelConnectivity.READY in states else states[0]

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.channels[0].wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        for channel in self.channels:
            await channel.channel_ready()

    async def close(self, grace: float | None = None) -> None:
        for channel in self.channels:
            await channel.close(grace)

    async def __aenter__(self) -> SpreadChannel:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> None:
        await self.close(None)
