"""The cache manager services import, and how a process (or a test) chooses it.

    manager = get_cache_manager()
    await manager.set("reports:today", {"ok": 3}, ttl=60)
    await manager.get("reports:today")            # {"ok": 3}, or None on a miss
    await manager.delete("reports:today"); await manager.clear(); await manager.stats()

Which manager get_cache_manager() returns, first match wins:

1. the one installed for the current context by `with use_cache_manager(m):` (a
   context variable: tests, or one request, can use their own without touching
   anyone else's);
2. the process default installed by configure(settings) or set_cache_manager(m),
   which a service's server.py does once at start;
3. otherwise one built from Settings.from_env() on first use (CACHE_ADDR,
   CACHE_TIMEOUT, CACHE_DEFAULT_TTL, CACHE_NEAR_SIZE, CACHE_NEAR_TTL) and installed
   as the process default.

Nothing is built at import time, and every one of these can be replaced.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from devops_hub.v1 import cache_pb2
from services.common.cache.client import CacheClient
from services.common.cache.codecs import JSON, Codec
from services.common.settings import Settings

T = TypeVar("T")


class CacheManager:
    """A CacheClient with defaults: a TTL and a codec (JSON unless told otherwise).

    Like the client, it never raises for a sidecar failure: reads miss, writes
    report False, stats() returns None.
    """

    def __init__(self, client: CacheClient, *, default_ttl: float = 0.0, codec: Codec[Any] = JSON) -> None:
        self.client = client
        self.default_ttl = default_ttl
        self.codec = codec

    @classmethod
    def from_settings(cls, settings: Settings) -> "CacheManager":
        return cls(CacheClient.from_settings(settings), default_ttl=settings.cache_default_ttl)

    async def get(self, key: str, *, codec: Codec[Any] | None = None, default: Any = None) -> Any:
        """The cached value, None for a cached "not found", default on a miss."""
        found, value = await self.client.get(key, codec or self.codec)
        return value if found else default

    async def set(self, key: str, value: Any, *, ttl: float | None = None, codec: Codec[Any] | None = None) -> bool:
        """Stores value (None stores a "not found"). False if the sidecar is unreachable."""
        return await self.client.set(key, value, codec or self.codec, self._ttl(ttl))

    async def get_or_load(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        *,
        ttl: float | None = None,
        codec: Codec[Any] | None = None,
        cache_none: bool = True,
    ) -> T:
        return await self.client.load(key, self._ttl(ttl), codec or self.codec, loader, cache_none=cache_none)

    async def delete(self, key: str) -> bool:
        return await self.client.delete(key)

    async def invalidate(self, *patterns: str) -> bool:
        return await self.client.invalidate(*patterns)

    async def clear(self) -> bool:
        return await self.client.clear()

    async def stats(self) -> cache_pb2.CacheStats | None:
        return await self.client.stats()

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> "CacheManager":
        await self.client.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _ttl(self, ttl: float | None) -> float:
        return self.default_ttl if ttl is None else ttl


class _ProcessDefault:
    """The process-wide default, in an object rather than a bare global so that it is
    replaced only through configure()/set_cache_manager()."""

    manager: CacheManager | None = None


_default = _ProcessDefault()
_current: contextvars.ContextVar[CacheManager | None] = contextvars.ContextVar("cache_manager", default=None)


def get_cache_manager() -> CacheManager:
    manager = _current.get()
    if manager is not None:
        return manager
    if _default.manager is None:
        configure()
    assert _default.manager is not None
    return _default.manager


def configure(settings: Settings | None = None, *, client: CacheClient | None = None) -> CacheManager:
    """Builds the process default from settings (or around an existing client, e.g.
    the one the service already made) and installs it. Returns it."""
    settings = settings or Settings.from_env()
    if client is None:
        manager = CacheManager.from_settings(settings)
    else:
        manager = CacheManager(client, default_ttl=settings.cache_default_ttl)
    _default.manager = manager
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
