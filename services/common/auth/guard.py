"""The check every call of every service passes before its handler runs.

It reads the caller's key (`x-api-key`, or `authorization: Bearer …`), checks it
against the scope the method declares in the protos, then takes a token from the
caller's rate-limit bucket: per key, or per client address for anonymous reads. A
call the gateway admitted (FORWARDER_KEY) takes no second token (docs/resilience.md,
"Rate limits"). Keys never appear in errors or logs, only their ids or prefixes.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from devops_hub.v1 import options_pb2

from services.common.auth.keys import same_key
from services.common.auth.rate_limit import Decision, RateLimiter
from services.common.auth.scopes import allows, scope_name
from services.common.auth.verifier import VOUCHING_HEADER, KeyVerifier
from services.common.contract.errors import PermissionDenied, RateLimited, Unauthenticated
from services.common.contract.forwarded import FORWARDER_KEY, TrustedProxies

Scope = options_pb2.Scope
# Read once: an attribute of a protobuf enum wrapper is a Python-level __getattr__,
# microseconds on every call that compares with it.
_READ, _EXECUTE = Scope.SCOPE_READ, Scope.SCOPE_EXECUTE


def presented_key(metadata: Mapping[str, str]) -> str | None:
    key = metadata.get("x-api-key")
    if key:
        return key.strip()
    authorization = metadata.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def peer_address(peer: str) -> str:
    """'ipv4:127.0.0.1:5000' or 'ipv6:[::1]:5000' -> the address alone."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit("]", 1)[0].lstrip("[")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return rest or peer


def rate_limit_metadata(decision: Decision) -> tuple[tuple[str, str], ...]:
    return (
        ("x-ratelimit-limit", str(decision.limit)),
        ("x-ratelimit-remaining", str(decision.remaining)),
        ("x-ratelimit-reset", str(max(1, round(decision.reset_after)))),
    )


class AccessGuard:
    def __init__(
        self,
        required: Mapping[str, int],
        verifier: KeyVerifier,
        limiter: RateLimiter,
        *,
        auth_enabled: bool,
        allow_anonymous_read: bool,
        trusted_proxies: str,
        service_key: str = "",
    ) -> None:
        self._required = dict(required)
        self._verifier = verifier
        self._limiter = limiter
        self._auth_enabled = auth_enabled
        self._anonymous_read = allow_anonymous_read
        self._proxies = TrustedProxies(trusted_proxies)
        self._service_key = service_key

    # Any: one guard stands before every method, whatever its request and response
    # messages. Not a coroutine of its own: every call awaits one layer fewer.
    def __call__(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Awaitable[tuple[tuple[str, str], ...]]:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        limited = not self._admitted_by_gateway(metadata, context)
        return self.admit(method, metadata, lambda: peer_address(context.peer()), limited=limited)

    async def admit(
        self, method: str, metadata: Mapping[str, str], client: Callable[[], str], *, limited: bool = True
    ) -> tuple[tuple[str, str], ...]:
        """The check itself: the gateway admits what comes through it here, by the same
        rules. `limited` False: no token (the gateway took it)."""
        required = self._required.get(method)
        if required is None:
            return ()  # health and reflection: open to probes and tools
        bucket = await self._authorise(method, required, metadata, client)
        if bucket is None or not limited:
            return ()
        kind = "execute" if required == _EXECUTE else "default"
        decision = await self._limiter.take(bucket, kind)
        if decision is None:
            return ()
        limits = rate_limit_metadata(decision)
        if not decision.allowed:
            # Whole seconds, as Retry-After has them: the message, the RetryInfo and the
            # header all say the same wait.
            wait = max(1, math.ceil(decision.retry_after))
            raise RateLimited(
                f"rate limit of {decision.limit} requests reached; retry in {wait}s",
                reason="RATE_LIMITED",
                metadata={"limit": str(decision.limit)},
                retry_after=wait,
                trailing_metadata=(*limits, ("retry-after", str(wait))),
            )
        return limits

    async def _authorise(self, method: str, required: int, metadata: Mapping[str, str], client: Callable[[], str]) -> str | None:
        """The caller's rate-limit bucket once it may make this call; None for the
        services' own key, whose traffic (cache reads, agent calls) is not a client's."""
        key = presented_key(metadata)
        if key is not None and self._service_key and same_key(key, self._service_key):
            return None
        if not self._auth_enabled or (key is None and required == _READ and self._anonymous_read):
            return f"addr:{client()}"
        if key is None:
            raise Unauthenticated(
                f"{method} needs an API key with the {scope_name(required)} scope: send it as x-api-key or authorization: Bearer",
                reason="API_KEY_MISSING",
            )
        api_key = await self._verifier.verify(key)
        if api_key is None:
            raise Unauthenticated("the API key is not valid: unknown, expired or revoked", reason="API_KEY_INVALID")
        if not allows(api_key.scopes, required):
            raise PermissionDenied(
                f"key {api_key.id} ({api_key.name}) lacks the {scope_name(required)} scope that {method} needs",
                reason="SCOPE_MISSING",
                metadata={"key_id": api_key.id, "required_scope": scope_name(required)},
            )
        vouching = metadata.get(VOUCHING_HEADER)
        if vouching and self._service_key and same_key(vouching, self._service_key):
            return None  # a process checking this key for its own guard (RemoteVerifier)
        return f"key:{api_key.id}"

    def _admitted_by_gateway(self, metadata: Mapping[str, str], context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        vouching = metadata.get(FORWARDER_KEY)
        if not vouching or not self._service_key or not same_key(vouching, self._service_key):
            return False
        return peer_address(context.peer()) in self._proxies
