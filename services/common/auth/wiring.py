"""What a process needs to enforce access."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.auth.guard import AccessGuard
from services.common.auth.rate_limit import Policy, RateLimiter
from services.common.auth.scopes import required_scopes
from services.common.auth.verifier import KeyVerifier
from services.common.contract.forwarded import ANY_ADDRESS
from services.common.foundation.settings import Settings

__all__ = ["Access"]


@dataclass
class Access:
    """A process builds it once and closes it once; the guard goes to its GrpcHost (or the
    gateway's edge cache)."""

    verifier: KeyVerifier
    limiter: RateLimiter
    guard: AccessGuard

    @classmethod
    def build(cls, settings: Settings, verifier: KeyVerifier, *, rate_limited: bool = True) -> Access:
        """Access checked by `verifier` (which it then owns), rate limited as settings
        say unless `rate_limited` is False (a process whose callers were limited already)."""
        policies = {
            "default": Policy(settings.rate_limit_requests, settings.rate_limit_window),
            "execute": Policy(settings.rate_limit_execute_requests, settings.rate_limit_execute_window),
        }
        # Without policies the limiter limits nothing and opens no Redis connection.
        limiter = RateLimiter(
            policies if rate_limited else {},
            settings.redis_url,
            prefix=f"{settings.redis_key_prefix}rl:",
            max_connections=settings.redis_max_connections,
        )
        guard = AccessGuard(
            required_scopes(),
            verifier,
            limiter,
            auth_enabled=settings.auth_enabled,
            allow_anonymous_read=settings.allow_anonymous_read,
            trusted_proxies=settings.trusted_proxies or ANY_ADDRESS,
            service_key=settings.service_api_key,
        )
        return cls(verifier, limiter, guard)

    async def close(self) -> None:
        await self.verifier.close()
        await self.limiter.close()

