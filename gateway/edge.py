"""The edge layer around the edge cache: its invalidation feed and its access check.

A held answer is served only to a request the services' own guard admits
(services/common/auth/guard.py, built by the same wiring as theirs): the scope the
proto requires, the key verified with the agents service's WhoAmI (RemoteVerifier,
as the sidecar does: cached a second, so revocation holds within it), and one token
from the caller's bucket in the shared rate limiter, with the same X-RateLimit-*
headers. A refusal is the error the service would have answered. Everything else
(misses, `Cache-Control: no-cache`, a stream that is not live) goes to the service.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from opentelemetry import trace
from starlette.responses import Response

from gateway.conditional import none_match
from gateway.errors import GatewayError
from gateway.hardening import add_rate_limit_headers
from gateway.json_body import JSON_MEDIA_TYPE
from services.cache.client.near_feed import NearCacheFeed
from services.cache.client.transport import CACHE_SERVICE, SidecarTransport
from services.cache.consistency import ConsistencyChecker, ConsistencyMetrics
from services.cache.edge.store import EdgeCache, EdgeKey, cacheable, write_of
from services.common.auth.verifier import RemoteVerifier
from services.common.auth.wiring import Access
from services.common.channels import service_address
from services.common.errors import ServiceError
from services.common.settings import Settings

log = logging.getLogger(__name__)

# The answer's own headers an edge hit repeats (rate limits and request ids are per request).
KEPT_HEADERS = ("etag", "cache-control", "vary")


class Edge:
    def __init__(self, settings: Settings, consistency: ConsistencyMetrics, tracer: trace.Tracer | None = None) -> None:
        self.settings = settings
        self._consistency = consistency
        self._tracer = tracer
        self.cache = EdgeCache(
            max_entries=settings.gateway_edge_cache_size,
            max_bytes=settings.gateway_edge_cache_bytes,
            max_ttl=settings.gateway_edge_cache_ttl,
        )
        self._transport: SidecarTransport | None = None
        self._feed: NearCacheFeed | None = None
        self._checker: ConsistencyChecker | None = None
        self._access: Access | None = None

    @classmethod
    def from_settings(cls, settings: Settings, consistency: ConsistencyMetrics, *, tracer: trace.Tracer | None = None) -> Edge | None:
        """None when GATEWAY_EDGE_CACHE_SIZE or _BYTES is 0, and when the rate limits
        are on but kept in each process's memory (no REDIS_URL): a hit would then take
        its token from another bucket than a miss, and a caller would get more than
        the service allows."""
        if settings.gateway_edge_cache_size <= 0 or settings.gateway_edge_cache_bytes <= 0:
            return None
        if not settings.redis_url and (settings.rate_limit_requests > 0 or settings.rate_limit_execute_requests > 0):
            log.info("edge cache off: rate limits are on and not shared (set REDIS_URL, or turn them off)")
            return None
        return cls(settings, consistency, tracer)

    def open(self) -> None:
        """Starts following the sidecar's Watch (with the services' key, which it
        requires) and opens the guard's channels; on the server's event loop."""
        settings = self.settings
        self._access = Access.build(settings, RemoteVerifier.from_settings(settings, tracer=self._tracer))
        self._transport = SidecarTransport(
            service_address(CACHE_SERVICE, settings), settings.cache_timeout, api_key=settings.service_api_key, tracer=self._tracer
        )
        self._feed = NearCacheFeed(self._transport, self.cache)
        self._feed.start()
        self._checker = ConsistencyChecker.following(self.cache, "edge", self._transport, self._consistency)
        self._checker.start()

    async def close(self) -> None:
        if self._checker is not None:
            await self._checker.stop()
        if self._transport is not None:
            self._transport.closed = True
        if self._feed is not None:
            await self._feed.close()
        if self._transport is not None:
            await self._transport.close()
        if self._access is not None:
            await self._access.close()

    async def serve(
        self, method: str, key: EdgeKey, metadata: Mapping[str, str], client: str, if_none_match: bytes | None
    ) -> Response | None:
        """The held answer to this request, or the guard's refusal; None on a miss."""
        entry = self.cache.get(key)
        if entry is None or self._access is None:
            return None
        try:
            limits = await self._access.guard.admit(method, metadata, lambda: client)
        except ServiceError as refused:
            response = GatewayError(refused).response()
            add_rate_limit_headers(response, refused.trailing_metadata)
            return response
        headers = {**entry.headers, "Age": str(self.cache.age(entry))}
        if if_none_match is not None and none_match(if_none_match, entry.headers["etag"]):
            response = Response(status_code=304, headers=headers)
        else:
            response = Response(entry.body, media_type=JSON_MEDIA_TYPE, headers=headers)
        add_rate_limit_headers(response, limits)
        return response

    def fill(self, key: EdgeKey, response: Response, trailers: Iterable[tuple[str, object]]) -> None:
        """Keeps a 200 answer the service said may be kept (see services/cache/edge/store.py)."""
        said = cacheable(trailers)
        if said is None or response.status_code != 200:
            return
        headers = {name: response.headers[name] for name in KEPT_HEADERS if name in response.headers}
        if "etag" in headers:
            # Starlette types a body bytes | memoryview; an Answer's is bytes, which bytes() returns as is.
            self.cache.put(key, bytes(response.body), headers, said)

    def written(self, trailers: Iterable[tuple[str, object]]) -> None:
        """A write through this gateway: exactly the answers it made stale go now."""
        write = write_of(trailers)
        if write is not None:
            position, patterns = write
            for pattern in patterns:
                self.cache.invalidate(pattern, position)
