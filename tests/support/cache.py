"""What the cache tests share: real sidecars on ephemeral ports (memory, or Redis under
a test prefix), loaders that count, and small helpers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from devops_hub.v1 import cache_pb2, cache_pb2_grpc
from google.protobuf import empty_pb2, wrappers_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.cache.client.codecs import protobuf_content_type
from services.cache.log.repository import InvalidationLog
from services.cache.sidecar.server import CacheSidecar, build
from services.common.data.db import Database as Db
from services.common.foundation.settings import Settings
from services.common.runtime.process import running
from tests.support import eventually

STRING_TYPE = protobuf_content_type("google.protobuf.StringValue")
READ_TIMEOUT = 5.0
# Redis timeouts for tests: the most the sidecar allows, so a loaded test machine does
# not make Redis look failed.
TEST_REDIS_TIMEOUT = 0.25

StartSidecar = Callable[..., Awaitable[CacheSidecar]]


@pytest.fixture
async def start_sidecar() -> AsyncIterator[StartSidecar]:
    """Starts real sidecars as production does (services/common/runtime/process.py); settings
    overrides pass through."""
    started = contextlib.AsyncExitStack()

    async def start(*, wait_for_relay: bool = True, synced: bool = True, **overrides) -> CacheSidecar:
        # Access rules are test_auth.py's subject; here the sidecar's behaviour is.
        settings = Settings(cache_addr="127.0.0.1:0", auth_enabled=False, redis_timeout=TEST_REDIS_TIMEOUT)
        built = await build(settings.replace(**overrides))
        sidecar = await started.enter_async_context(running(built))
        if sidecar.peers is not None and wait_for_relay:
            await asyncio.wait_for(sidecar.peers.subscribed.wait(), READ_TIMEOUT)
        if synced:
            await sync_empty_log(sidecar.host.bound_address)
        return sidecar

    async with started:
        yield start


@pytest.fixture
async def sidecar(start_sidecar: StartSidecar) -> CacheSidecar:
    """One real sidecar with the memory store, synced."""
    return await start_sidecar()


async def sync_empty_log(address: str) -> cache_pb2.CacheSyncState:
    """What a services' relay does for a new cache when their invalidation log is
    empty: gives it a position (0), so it takes fills."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        return await stub.Sync(cache_pb2.CacheSyncRequest(after=0, through=0), timeout=READ_TIMEOUT)


async def log_delivered(cache_stub: cache_pb2_grpc.CacheServiceStub, db: Db) -> None:
    """Waits until the sidecar has applied the invalidation log through its head: the
    relays' route has delivered every write so far."""
    head = await InvalidationLog(db).head()

    async def caught_up() -> bool:
        state = await cache_stub.GetSyncState(empty_pb2.Empty(), timeout=READ_TIMEOUT)
        return not state.fresh and state.applied >= head

    await eventually(caught_up, f"the sidecar applies the log through {head}")


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, str]:
    """start_sidecar() overrides for each store: memory, and Redis under a test prefix."""
    if request.param == "memory":
        return {}
    return {"redis_url": request.getfixturevalue("redis_url"), "redis_key_prefix": request.getfixturevalue("redis_prefix")}


def entry(key: str, value: bytes = b"v", content_type: str = "") -> cache_pb2.CacheEntry:
    return cache_pb2.CacheEntry(key=key, value=value, content_type=content_type)


def bad_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """The field names of the BadRequest detail of an error status."""
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries no rich status"
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            return [violation.field for violation in bad_request.field_violations]
    raise AssertionError(f"no BadRequest detail in {status}")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingLoader:
    """A loader that counts its calls and can be held until released."""

    def __init__(self, value: str = "loaded", *, hold: bool = False) -> None:
        self.value = value
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.finished = False
        if not hold:
            self.release.set()

    async def __call__(self) -> wrappers_pb2.StringValue:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        self.finished = True
        return wrappers_pb2.StringValue(value=self.value)


class Database:
    """The source of truth in client tests: versioned values, reads counted."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.reads = 0

    def loader(self, key: str) -> Callable[[], Awaitable[wrappers_pb2.StringValue]]:
        async def load() -> wrappers_pb2.StringValue:
            self.reads += 1
            return wrappers_pb2.StringValue(value=self.values.get(key, ""))

        return load
