"""The one way any part of DevOps Hub opens a gRPC channel to another part.

open_channel() keeps `connections` channels to an address, each with its own
connection, and hands each call to the next usable one, so WORKERS processes sharing a
port (SO_REUSEPORT) all take calls; a retryable call gets a short first attempt and is
tried again on another connection (_Attempts), and a connection whose call times out
is replaced (SpreadChannel). Why gRPC's own retries and outlier detection cannot do
this: docs/resilience.md, "Calls are spread per call" and "A slow worker is routed
around". Every channel a service or the gateway opens is opened here, so what a call
carries is decided here: the services' key when asked for, and the tracing
interceptors when given a tracer (telemetry/grpc_client.py).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Generator
from typing import Any

import grpc
from devops_hub.channels import key_interceptors
from devops_hub.client import Client
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from opentelemetry import trace

from services.common.contract.api import backend_of
from services.common.contract.limits import GRPC_SIZE_OPTIONS
from services.common.foundation.background import spawn
from services.common.foundation.settings import Settings
from services.common.telemetry.grpc_client import tracing_interceptors

log = logging.getLogger(__name__)

DEFAULT_CONNECTIONS = 4
# A retryable call's first attempt waits this long at most (half the call's deadline
# if that is shorter) before it is tried again on another connection.
ATTEMPT_TIMEOUT = 0.5
# Attempts of a retryable call, the first included; only those that go where no answer
# has shown the way need more than two (_Attempts).
MAX_ATTEMPTS = 4
RETRY_ON = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE})
# How long the calls still on a replaced connection have before it is closed under
# them: unary calls end by their deadlines; this bounds streams (a Watch).
RETIRE_GRACE = 3600.0

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

def open_channel(
    address: str,
    *,
    api_key: str = "",
    connections: int = DEFAULT_CONNECTIONS,
    tracer: trace.Tracer | None = None,
) -> grpc.aio.Channel:
    """`api_key` goes on every call that does not carry a key of its own."""
    chosen = [*key_interceptors(api_key), *call_tracing(address, tracer)]

    def open_one() -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(address, options=BASE_OPTIONS, interceptors=chosen or None)

    return open_one() if connections <= 1 else SpreadChannel(open_one, connections, address)


def call_tracing(address: str, tracer: trace.Tracer | None) -> list[grpc.aio.ClientInterceptor]:
    return tracing_interceptors(tracer, address) if tracer is not None else []


def service_address(service: ServiceDescriptor, settings: Settings) -> str:
    """Where `service` is served: the address of the part its proto declares (`option
    (backend)`), so moving a service to another process is a proto change and a setting."""
    backend = backend_of(service)
    if not backend:
        raise ValueError(f"{service.full_name} declares no backend (option (backend), options.proto): it has no address")
    return settings.backend_address(backend)


def service_channel(service: ServiceDescriptor, settings: Settings, *, tracer: trace.Tracer | None = None) -> grpc.aio.Channel:
    """How one part of the system calls another: with SERVICE_API_KEY."""
    return open_channel(
        service_address(service, settings),
        api_key=settings.service_api_key,
        connections=settings.grpc_connections,
        tracer=tracer,
    )


def service_client(
    settings: Settings, *services: ServiceDescriptor, timeout: float | None = None, tracer: trace.Tracer | None = None
) -> Client:
    """How one part of the system calls others through more than a stub."""
    parts = {backend_of(service): service for service in services}
    channels = {backend: service_channel(service, settings, tracer=tracer) for backend, service in parts.items()}
    return Client(channels, timeout=timeout)


def retryable(method: str) -> bool:
    """Whether a call to `method` may be sent twice: a GET, or marked idempotent in its
    proto (e.g. a create that carries a request id)."""
    try:
        descriptor = descriptor_pool.Default().FindMethodByName(method.lstrip("/").replace("/", "."))
    except KeyError:
        return False
    options = descriptor.GetOptions()
    if options.idempotency_level != descriptor_pb2.MethodOptions.IDEMPOTENCY_UNKNOWN:
        return True
    return bool(options.Extensions[annotations_pb2.http].WhichOneof("pattern") == "get")


class _SpreadConnection:
    """One of a SpreadChannel's channels, and what its calls have shown of it."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.answered_at = 0.0

    def promise(self, since: float) -> tuple[bool, bool, float]:
        """How sure it is to answer now, best first: it has answered since `since`; it is
        connected and new (a stopped worker's new connections never get that far); it
        answered last."""
        new = not self.answered_at and self.channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY
        return self.answered_at > since, new, self.answered_at

    def usable(self) -> bool:
        # Not CONNECTING: a stopped worker's kernel completes the TCP handshake for it,
        # but the worker never answers HTTP/2's, so a connection it got stays CONNECTING.
        state = self.channel.get_state(try_to_connect=False)
        return state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE)


class _OnEach:
    """One method's multicallable on each of a SpreadChannel's connections, made again
    when its connection has been replaced."""

    def __init__(self, spread: SpreadChannel, kind: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.spread = spread
        self._kind, self._method, self._args, self._kwargs = kind, method, args, kwargs
        self._made: dict[int, tuple[grpc.aio.Channel, Any]] = {}

    def on(self, index: int) -> Any:
        channel = self.spread.connections[index].channel
        made = self._made.get(index)
        if made is None or made[0] is not channel:
            made = self._made[index] = (channel, getattr(channel, self._kind)(self._method, *self._args, **self._kwargs))
        return made[1]


class _Spread(
    _OnEach,
    grpc.aio.UnaryStreamMultiCallable[Any, Any],
    grpc.aio.StreamUnaryMultiCallable[Any, Any],
    grpc.aio.StreamStreamMultiCallable[Any, Any],
):
    """A streaming multicallable (of any kind: it only forwards the call) that gives
    each call to the next usable connection (SpreadChannel.pick)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.on(self.spread.pick())(*args, **kwargs)


class _UnarySpread(_OnEach, grpc.aio.UnaryUnaryMultiCallable[Any, Any]):
    """Unary calls, from whose outcome each connection's record is kept, and of which an
    idempotent one (retryable()) is tried again on another connection (_Attempts)."""

    def __init__(self, spread: SpreadChannel, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__(spread, "unary_unary", method, args, kwargs)
        self.retryable = retryable(method)

    def __call__(self, request: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        return _Attempts(self, request, timeout, kwargs)


class _Attempts:
    """One unary call, as the caller sees it: awaited for its reply, then asked for its
    metadata and status (which come from the attempt that ended it). A retryable call's
    first attempt gets ATTEMPT_TIMEOUT (at most half the call's deadline); a retry on a
    connection that answered in the last half ATTEMPT_TIMEOUT gets the rest of the
    deadline and is the last, otherwise ATTEMPT_TIMEOUT again, up to MAX_ATTEMPTS
    (docs/resilience.md, "A slow worker is routed around")."""

    def __init__(self, calls: _UnarySpread, request: Any, timeout: float | None, kwargs: dict[str, Any]) -> None:
        self._calls, self._request, self._kwargs = calls, request, kwargs
        self._deadline = None if timeout is None else time.monotonic() + timeout
        if calls.retryable:
            timeout = ATTEMPT_TIMEOUT if timeout is None else min(ATTEMPT_TIMEOUT, timeout / 2)
        self._attempt(calls.spread.pick(), timeout)

    def _attempt(self, index: int, timeout: float | None) -> None:
        self._index, self._channel = index, self._calls.spread.connections[index].channel
        self.call = self._calls.on(index)(self._request, timeout=timeout, **self._kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.call, name)

    def __await__(self) -> Generator[Any, None, Any]:
        return self._reply().__await__()

    async def _reply(self) -> Any:
        spread, attempts, last = self._calls.spread, 1, not self._calls.retryable
        while True:
            try:
                return await spread.outcome(self._index, self._channel, self.call)
            except grpc.aio.AioRpcError as error:
                left = None if self._deadline is None else self._deadline - time.monotonic()
                if last or error.code() not in RETRY_ON or (left is not None and left <= 0):
                    raise
            # Proof of life is an answer in the last half ATTEMPT_TIMEOUT: one since the
            # call began may have come from a worker that stopped just after it.
            since = time.monotonic() - ATTEMPT_TIMEOUT / 2
            index = spread.pick(retrying=self._channel, since=since)
            attempts += 1
            last = attempts == MAX_ATTEMPTS or spread.connections[index].answered_at > since
            self._attempt(index, left if last or left is not None and left <= ATTEMPT_TIMEOUT else ATTEMPT_TIMEOUT)


class SpreadChannel(grpc.aio.Channel):
    """Several channels to one address behind the grpc.aio.Channel interface, so stubs
    and the gateway's multicallables use it unchanged. A connection on which a call
    times out is replaced at once: per connection, since gRPC's own outlier detection
    ejects addresses, which the workers share. When no connection is usable, calls go
    round all of them rather than nowhere."""

    def __init__(self, open_one: Callable[[], grpc.aio.Channel], count: int, address: str) -> None:
        self._open_one = open_one
        self._address = address
        self.connections = [_SpreadConnection(open_one()) for _ in range(count)]
        self._turn = itertools.cycle(range(count))
        self._retired: set[grpc.aio.Channel] = set()

    def pick(self, *, retrying: grpc.aio.Channel | None = None, since: float = 0.0) -> int:
        """The next usable connection; for a call whose attempt failed on channel
        `retrying`, another one, the likeliest to answer (promise(since))."""
        first, count = next(self._turn), len(self.connections)
        order = [i for i in ((first + step) % count for step in range(count)) if self.connections[i].channel is not retrying]
        order = order or [first]
        usable = [i for i in order if self.connections[i].usable()] or order
        return usable[0] if retrying is None else max(usable, key=lambda i: self.connections[i].promise(since))

    async def outcome(self, index: int, channel: grpc.aio.Channel, call: Any) -> Any:
        """The reply of `call`, made on connection `index` while it was `channel`, kept
        in that connection's record unless the connection has been replaced since."""
        connection = self.connections[index]
        try:
            reply = await call
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and connection.channel is channel:
                self._replace(connection, index)
            raise
        if connection.channel is channel:
            connection.answered_at = time.monotonic()
        return reply

    def _replace(self, connection: _SpreadConnection, index: int) -> None:
        log.warning("connection %d of %d to %s: a call timed out; replacing it", index, len(self.connections), self._address)
        old, connection.channel = connection.channel, self._open_one()
        connection.channel.get_state(try_to_connect=True)
        # The calls still on the old connection keep their own deadlines; then it closes.
        self._retired.add(old)
        spawn(old.close(RETIRE_GRACE), name="close a replaced connection").add_done_callback(lambda _: self._retired.discard(old))

    # The generated stubs pass keywords of their own (_registered_method), so every
    # argument is forwarded as given.
    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
        return _UnarySpread(self, method, args, kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> grpc.aio.UnaryStreamMultiCallable[Any, Any]:
        return _Spread(self, "unary_stream", method, args, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> grpc.aio.StreamUnaryMultiCallable[Any, Any]:
        return _Spread(self, "stream_unary", method, args, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> grpc.aio.StreamStreamMultiCallable[Any, Any]:
        return _Spread(self, "stream_stream", method, args, kwargs)

    @property
    def channels(self) -> list[grpc.aio.Channel]:
        return [connection.channel for connection in self.connections]

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
        for channel in [*self.channels, *self._retired]:
            await channel.close(grace)

    async def __aenter__(self) -> SpreadChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close(None)
