"""The gRPC channel to the cache sidecar and the one way every call goes through it.

A failed call never raises: it answers (None, status code) and is logged at most
once per LOG_INTERVAL, because the cache is an optimisation and its failures must
not flood the log of a service that is busy serving from the database instead.
Once the sidecar looks unreachable, reads skip it for retry_after seconds rather
than add a timeout to every request; invalidations always try.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import grpc
from devops_hub.v1 import cache_pb2, cache_pb2_grpc
from google.protobuf.message import Message
from opentelemetry import trace

from services.common.transport.channels import open_channel

log = logging.getLogger(__name__)

CACHE_SERVICE = cache_pb2.DESCRIPTOR.services_by_name["CacheService"]

LOG_INTERVAL = 30.0


class SidecarTransport:
    """One channel per client; `timeout` is every unary call's deadline."""

    def __init__(
        self,
        address: str,
        timeout: float,
        *,
        retry_after: float = 1.0,
        api_key: str = "",
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.retry_after = retry_after
        self._api_key = api_key
        self._tracer = tracer
        self._channel: grpc.aio.Channel | None = None
        self._stub: cache_pb2_grpc.CacheServiceStub | None = None
        self.closed = False
        self._skip_until = -math.inf
        self._last_logged = -math.inf
        self._suppressed = 0

    def stub(self) -> cache_pb2_grpc.CacheServiceStub:
        if self._stub is None:
            # The one channel factory: the services' key on every call (the sidecar serves the
            # admin key only), quick reconnects (every request goes to the database meanwhile).
            self._channel = open_channel(self.address, api_key=self._api_key, tracer=self._tracer)
            self._stub = cache_pb2_grpc.CacheServiceStub(self._channel)
        return self._stub

    def watch(self, prefixes: list[str]) -> Any:
        """A new Watch stream (a grpc.aio call: read() it, cancel() it)."""
        return self.stub().Watch(cache_pb2.CacheWatchRequest(prefixes=prefixes))

    async def call(self, method: str, request: Message, *, respect_backoff: bool = True) -> tuple[Any, grpc.StatusCode | None]:
        if self.closed:
            return None, grpc.StatusCode.CANCELLED
        if respect_backoff and time.monotonic() < self._skip_until:
            return None, grpc.StatusCode.UNAVAILABLE
        try:
            response = await getattr(self.stub(), method)(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self._skip_until = time.monotonic() + self.retry_after
            self.note_failure(method, f"{code.name}: {exc.details()}")
            return None, code
        except Exception as exc:  # noqa: BLE001 - the cache must never fail a request
            self._skip_until = time.monotonic() + self.retry_after
            self.note_failure(method, repr(exc))
            return None, grpc.StatusCode.UNKNOWN
        return response, None

    def note_failure(self, what: str, detail: str) -> None:
        now = time.monotonic()
        if now - self._last_logged < LOG_INTERVAL:
            self._suppressed += 1
            return
        suppressed = f" ({self._suppressed} more failures since the last report)" if self._suppressed else ""
        log.warning(
            "cache sidecar %s: %s failed (%s); serving from the source of truth%s", self.address, what, detail, suppressed
        )
        self._last_logged = now
        self._suppressed = 0

    async def close(self) -> None:
        self.closed = True
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None
