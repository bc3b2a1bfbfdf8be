"""The cache manager services import, and how a process (or a test) chooses it.

get_cache_manager() returns, first match wins: the one installed for the current
context by `with use_cache_manager(m):` (a context variable, so a test or a request
uses its own without touching anyone else's); the process default installed by
configure() or set_cache_manager(); one built from Settings.from_env() on first use.
It may be called without await (the decorators do): the manager then connects on
first use. Nothing is built at import time.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Generator, Iterator
from typing import Any

import grpc
from devops_hub.v1 import cache_pb2

from services.cache.client.client import CacheClient
from services.cache.client.codecs import JSON, Codec
from services.common.foundation.settings import Settings

_REFUSED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


class CacheCredentialsError(RuntimeError):
    """The sidecar serves the services' admin key only, and this process has none
    that it accepts: every read would silently miss and every write be lost."""


class CacheManager:
    """A CacheClient with defaults: a TTL, and JSON values unless a call names a codec.
    Like the client, it never raises for a sidecar failure."""

    def __init__(self, client: CacheClient, *, default_ttl: float = 0.0) -> None:
        self.client = client
        self.default_ttl = default_ttl

    @classmethod
    def from_settings(cls, settings: Settings) -> CacheManager:
        if settings.auth_enabled and not settings.service_api_key:
            raise CacheCredentialsError(
                "the cache sidecar serves the services' admin key only: set SERVICE_API_KEY "
                "(`make run` keeps one in var/service.key) or AUTH_ENABLED=false"
            )
        return cls(CacheClient.from_settings(settings), default_ttl=settings.cache_default_ttl)

    def __await__(self) -> Generator[Any, None, CacheManager]:
        """`cache = await get_cache_manager()`: connected, with its key checked."""
        return self._ready().__await__()

    async def _ready(self) -> CacheManager:
        await self.client.connect()
        _, code = await self.client.probe()
        if code in _REFUSED:
            raise CacheCredentialsError(
                f"the cache sidecar refused this process's key ({code.name}): SERVICE_API_KEY must be an admin key"
            )
        return self

    async def get(self, key: str, *, codec: Codec[Any] | None = None, default: Any = None) -> Any:
        """The cached value, None for a cached "not found", default on a miss."""
        found, value = await self.client.get(key, codec or JSON)
        return value if found else default

    async def set(self, key: str, value: Any, *, ttl: float | None = None, codec: Codec[Any] | None = None) -> bool:
        """Stores value (None stores a "not found"). False if the sidecar is unreachable."""
        return await self.client.set(key, value, codec or JSON, self.default_ttl if ttl is None else ttl)

    async def delete(self, key: str) -> bool:
        return await self.client.delete(key)

    async def clear(self) -> bool:
        return await self.client.clear()

    @property
    def stats(self) -> dict[str, Any]:
        """This process's reads through the cache, as the guide reads them: served by
        a cache layer ("hits") or by the loader ("misses"). The sidecar's own figures
        (every process's) come from `await sidecar_stats()`."""
        client = self.client
        total = client.hits + client.misses
        near = client.near
        return {
            "type": "sidecar" if near is None else "near+sidecar",
            "size": len(near) if near is not None else 0,
            "max_size": near.max_entries if near is not None else 0,
            "hits": client.hits,
            "misses": client.misses,
            "hit_rate": f"{(client.hits / total * 100) if total else 0.0:.1f}%",
        }

    async def sidecar_stats(self) -> cache_pb2.CacheStats | None:
        return await self.client.stats()

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> CacheManager:
        await self.client.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class _ProcessDefault:
    """Replaced only through configure() and set_cache_manager()."""

    manager: CacheManager | None = None


_default = _ProcessDefault()
_current: contextvars.ContextVar[CacheManager | None] = contextvars.ContextVar("cache_manager", default=None)


def get_cache_manager() -> CacheManager:
    return _current.get() or _default.manager or configure()


def configure(settings: Settings | None = None) -> CacheManager:
    """Builds the process default from settings (default: the environment) and installs it."""
    manager = _default.manager = CacheManager.from_settings(settings or Settings.from_env())
    return manager


def set_cache_manager(manager: CacheManager | None) -> CacheManager | None:
    """Installs (or, with None, removes) the process default; returns the previous one."""
    previous, _default.manager = _default.manager, manager
    return previous


@contextlib.contextmanager
def use_cache_manager(manager: CacheManager) -> Iterator[CacheManager]:
    """Within the block (and tasks it starts), get_cache_manager() returns manager."""
    token = _current.set(manager)
    try:
        yield manager
    finally:
        _current.reset(token)
