"""Turning a presented key into the ApiKey it stands for, fast and never stale for long.

Look-ups are cached for at most CACHE_TTL (one second), misses and refusals included,
so a revoked key stops working within a second in every process, and a flood of
made-up keys costs one query per key per second at most. Expiry is checked on every
call against the cached record, so it is exact. Use is recorded (last_used_time) at
most once a minute per key, in one background statement for all keys.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import OrderedDict
from typing import Protocol

import grpc
from devops_hub.v1 import auth_pb2, auth_pb2_grpc
from google.protobuf import empty_pb2
from opentelemetry import trace

from services.common.auth import keys
from services.common.auth.repository import ApiKeyRepository
from services.common.contract.errors import Unavailable
from services.common.foundation.background import spawn
from services.common.foundation.clock import utc_now
from services.common.foundation.settings import Settings
from services.common.transport.channels import open_channel, service_address

log = logging.getLogger(__name__)

ApiKey = auth_pb2.ApiKey
CACHE_TTL = 1.0
CACHE_ENTRIES = 10_000
TOUCH_INTERVAL = 60.0


API_KEYS_SERVICE = auth_pb2.DESCRIPTOR.services_by_name["ApiKeysService"]

# Metadata carrying the services' key on a WhoAmI made to check someone else's key.
VOUCHING_HEADER = "x-service-key"


class KeyVerifier(Protocol):
    async def verify(self, key: str) -> ApiKey | None:
        """The key's record if it may be used now; None if it is unknown, revoked or expired."""

    async def close(self) -> None: ...


class _CachedVerifier(abc.ABC):
    """The shared part: format check, the cache, expiry and revocation."""

    def __init__(self) -> None:
        self._cache: OrderedDict[str, tuple[ApiKey | None, float]] = OrderedDict()

    async def verify(self, key: str) -> ApiKey | None:
        if not keys.well_formed(key):
            return None
        key_hash = keys.hash_key(key)
        entry = self._cache.get(key_hash)
        if entry is None or entry[1] <= time.monotonic():
            entry = self._cache[key_hash] = (await self._fetch(key, key_hash), time.monotonic() + CACHE_TTL)
            self._cache.move_to_end(key_hash)
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        api_key = entry[0]
        if api_key is None or api_key.HasField("revoke_time"):
            return None
        if api_key.HasField("expire_time") and api_key.expire_time.ToDatetime(dt.UTC) <= utc_now():
            return None
        self._used(api_key)
        return api_key

    @abc.abstractmethod
    async def _fetch(self, key: str, key_hash: str) -> ApiKey | None:
        """The key's record from where it is kept, or None when it is unknown."""

    def _used(self, api_key: ApiKey) -> None:  # noqa: B027 - a hook that subclasses may leave as it is
        """Called for every call a valid key makes."""


class DatabaseVerifier(_CachedVerifier):
    """For the services that hold the database (agents, workflows)."""

    def __init__(self, repository: ApiKeyRepository) -> None:
        super().__init__()
        self._repository = repository
        self._touched: dict[str, float] = {}
        self._to_touch: set[str] = set()
        self._toucher: asyncio.Task[None] | None = None

    async def _fetch(self, key: str, key_hash: str) -> ApiKey | None:
        return await self._repository.by_hash(key_hash)

    def _used(self, api_key: ApiKey) -> None:
        now = time.monotonic()
        if now - self._touched.get(api_key.id, -TOUCH_INTERVAL) < TOUCH_INTERVAL:
            return
        self._touched[api_key.id] = now
        self._to_touch.add(api_key.id)
        if self._toucher is None or self._toucher.done():
            self._toucher = spawn(self._touch_soon(), name="api-key-touch")

    async def _touch_soon(self) -> None:
        await asyncio.sleep(1.0)  # gather the keys used in the same second into one write
        batch, self._to_touch = sorted(self._to_touch), set()
        try:
            await self._repository.touch(batch, utc_now())
        except Exception:  # noqa: BLE001 - last_used_time is informative; a miss is tolerable
            log.warning("could not record the use of %d API key(s)", len(batch), exc_info=True)

    async def close(self) -> None:
        if self._toucher is not None and not self._toucher.done():
            with contextlib.suppress(asyncio.CancelledError):
                await self._toucher


class RemoteVerifier(_CachedVerifier):
    """For processes without the database (the cache sidecar, the gateway's edge
    cache): asks ApiKeysService.WhoAmI. With the services' key beside the caller's
    (VOUCHING_HEADER), the check itself takes nothing from the caller's rate-limit
    bucket: the call it is made for is counted where it is admitted."""

    def __init__(self, address: str, *, service_key: str = "", tracer: trace.Tracer | None = None) -> None:
        super().__init__()
        self._channel = open_channel(address, tracer=tracer)
        self._stub = auth_pb2_grpc.ApiKeysServiceStub(self._channel)
        self._vouching = ((VOUCHING_HEADER, service_key),) if service_key else ()

    @classmethod
    def from_settings(cls, settings: Settings, *, tracer: trace.Tracer | None = None) -> RemoteVerifier:
        return cls(service_address(API_KEYS_SERVICE, settings), service_key=settings.service_api_key, tracer=tracer)

    async def _fetch(self, key: str, key_hash: str) -> ApiKey | None:
        try:
            api_key: ApiKey = await self._stub.WhoAmI(
                empty_pb2.Empty(), metadata=(("x-api-key", key), *self._vouching), timeout=2
            )
            return api_key
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return None
            raise Unavailable("API keys cannot be checked right now: the agents service is unreachable", reason="KEYS_UNAVAILABLE") from None

    async def close(self) -> None:
        await self._channel.close()
