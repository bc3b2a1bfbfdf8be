"""The edge cache's life in the gateway (its store, invalidation feed and checker) and how
a held answer is written (docs/design.md, "A cached read"; docs/cache.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator

from opentelemetry import trace
from starlette.responses import Response
from starlette.types import Send

from gateway.conditional import none_match
from services.cache.client.near_cache import NearCacheFeed
from services.cache.client.transport import CACHE_SERVICE, SidecarTransport
from services.cache.consistency import ConsistencyChecker, ConsistencyMetrics
from services.cache.edge.store import EdgeCache, EdgeEntry, EdgeKey, cacheable, write_of
from services.common.foundation.settings import Settings
from services.common.transport.channels import service_address

log = logging.getLogger(__name__)


def gateway_limits(settings: Settings) -> bool:
    """Whether the gateway is the rate limiter of what comes through it: when a limit
    is on and it can tell the services so (SERVICE_API_KEY, sent as x-forwarder-key),
    so that they take no second token. Otherwise the services keep their own."""
    return bool(settings.service_api_key) and (settings.rate_limit_requests > 0 or settings.rate_limit_execute_requests > 0)


class Edge:
    # Made in open(), on the server's event loop; close() follows it in the lifespan.
    _transport: SidecarTransport
    _feed: NearCacheFeed
    _checker: ConsistencyChecker

    def __init__(self, settings: Settings, consistency: ConsistencyMetrics, tracer: trace.Tracer | None = None) -> None:
        self.settings = settings
        self._consistency = consistency
        self._tracer = tracer
        self.cache = EdgeCache(
            max_entries=settings.gateway_edge_cache_size, max_bytes=settings.gateway_edge_cache_bytes, max_ttl=settings.gateway_edge_cache_ttl
        )
        # Misses on their way upstream, each with what its readers who missed meanwhile wait on.
        self._loading: dict[EdgeKey, asyncio.Future[None]] = {}

    @classmethod
    def from_settings(cls, settings: Settings, consistency: ConsistencyMetrics, *, tracer: trace.Tracer | None = None) -> Edge | None:
        """None when GATEWAY_EDGE_CACHE_SIZE or _BYTES is 0, and when reads are rate
        limited but not by the gateway (no SERVICE_API_KEY): a hit would then take its
        token from another bucket than a miss."""
        if settings.gateway_edge_cache_size <= 0 or settings.gateway_edge_cache_bytes <= 0:
            return None
        if settings.rate_limit_requests > 0 and not gateway_limits(settings):
            log.info("edge cache off: reads are rate limited by the services, the gateway cannot vouch for its calls without SERVICE_API_KEY")
            return None
        return cls(settings, consistency, tracer)

    def open(self) -> None:
        """Follows the sidecar's Watch, with the services' key, which it requires."""
        settings = self.settings
        self._transport = SidecarTransport(
            service_address(CACHE_SERVICE, settings), settings.cache_timeout, api_key=settings.service_api_key, tracer=self._tracer
        )
        self._feed = NearCacheFeed(self._transport, self.cache)
        self._feed.start()
        self._checker = ConsistencyChecker(self.cache, "edge", self._transport, self._consistency)
        self._checker.start()

    async def close(self) -> None:
        await self._checker.stop()
        self._transport.closed = True
        await self._feed.close()
        await self._transport.close()

    async def send(self, entry: EdgeEntry, if_none_match: bytes | None, limits: Iterable[tuple[str, str]], send: Send) -> None:
        """The held answer, or a 304 when If-None-Match names its ETag, with Age and X-RateLimit-*."""
        per_request = [(b"age", str(self.cache.age(entry)).encode()), *((name.encode(), value.encode()) for name, value in limits)]
        if if_none_match is not None and none_match(if_none_match, entry.etag):
            await send({"type": "http.response.start", "status": 304, "headers": [*entry.validators, *per_request]})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [*entry.head, *per_request]})
        await send({"type": "http.response.body", "body": entry.body})

    @contextlib.contextmanager
    def loading(self, key: EdgeKey) -> Iterator[None]:
        """A miss of `key` on its way upstream: readers who miss it meanwhile wait for its
        answer (landed()), so a burst on a cold key is one call to the service."""
        if key in self._loading:
            yield  # another reader's miss is on its way: this one does not replace it
            return
        done = self._loading[key] = asyncio.get_running_loop().create_future()
        try:
            yield
        finally:
            del self._loading[key]
            done.set_result(None)

    async def landed(self, key: EdgeKey, timeout: float) -> EdgeEntry | None:
        """The answer of a miss of `key` already on its way, once it is kept; None when
        none is on its way, or its answer was not kept (an error, say)."""
        loading = self._loading.get(key)
        if loading is None:
            return None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(loading)
        return self.cache.get(key)

    def fill(self, key: tuple[str, bytes], response: Response, trailers: Iterable[tuple[str, object]]) -> None:
        """Keeps a 200 answer the service said may be kept (services/cache/edge/store.py),
        with its header lines from before any per-request one is added."""
        said = cacheable(trailers)
        if said is None or response.status_code != 200:
            return
        # Starlette types a body bytes | memoryview; an Answer's is bytes, which bytes() returns as is.
        self.cache.put(key, bytes(response.body), response.raw_headers, said)

    def written(self, trailers: Iterable[tuple[str, object]]) -> None:
        """A write through this gateway: exactly the answers it made stale go now, once
        (its entry is often streamed before its answer comes: the write waits for the
        sidecar to take it)."""
        write = write_of(trailers)
        if write is not None:
            self.cache.applied_own(*write)
