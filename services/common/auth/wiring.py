"""What a service's server.py needs to enforce access and to call its peers with a key."""

from __future__ import annotations

import grpc

from services.common.auth.guard import AccessGuard
from services.common.auth.rate_limit import Policy, RateLimiter
from services.common.auth.scopes import required_scopes
from services.common.auth.verifier import KeyVerifier
from services.common.settings import Settings


def build_limiter(settings: Settings) -> RateLimiter:
    return RateLimiter(
        {
            "default": Policy(settings.rate_limit_requests, settings.rate_limit_window),
            "execute": Policy(settings.rate_limit_execute_requests, settings.rate_limit_execute_window),
        },
        settings.redis_url,
        prefix=f"{settings.redis_key_prefix}rl:",
        max_connections=settings.redis_max_connections,
    )


def build_guard(settings: Settings, verifier: KeyVerifier, limiter: RateLimiter) -> AccessGuard:
    return AccessGuard(
        required_scopes(),
        verifier,
        limiter,
        auth_enabled=settings.auth_enabled,
        allow_anonymous_read=settings.allow_anonymous_read,
        trusted_proxies=settings.trusted_proxies,
        service_key=settings.service_api_key,
    )


class _KeyMetadata:
    """Adds the service's own key to a call's metadata, unless it carries one already."""

    def __init__(self, key: str) -> None:
        self._entry = ("x-api-key", key)

    def details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        if "x-api-key" not in metadata and "authorization" not in metadata:
            metadata.add(*self._entry)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


# grpc.aio files an interceptor under one call type only, so each type has its own class.
class _UnaryWithKey(_KeyMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self.details(client_call_details), request)


class _StreamWithKey(_KeyMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self.details(client_call_details), request)


def key_interceptors(key: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that present `key` on every call (none for no key)."""
    return [_UnaryWithKey(key), _StreamWithKey(key)] if key else []


def service_channel(address: str, settings: Settings) -> grpc.aio.Channel:
    """A channel to a peer service that presents SERVICE_API_KEY on every call."""
    return grpc.aio.insecure_channel(address, interceptors=key_interceptors(settings.service_api_key))
