"""CacheService over gRPC: translate, then delegate to CacheEntries."""

from __future__ import annotations

from collections.abc import AsyncIterator

from devops_hub.v1 import cache_pb2, cache_pb2_grpc
from google.protobuf import empty_pb2

from services.cache.sidecar.cache_entries import CacheEntries
from services.common.runtime.grpc_calls import Context


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, entries: CacheEntries) -> None:
        self._entries = entries

    async def Get(self, request: cache_pb2.CacheGetRequest, context: Context) -> cache_pb2.CacheGetResponse:
        return await self._entries.get(request.key)

    async def GetMany(self, request: cache_pb2.CacheGetManyRequest, context: Context) -> cache_pb2.CacheGetManyResponse:
        return await self._entries.get_many(request.keys)

    async def Set(self, request: cache_pb2.CacheSetRequest, context: Context) -> cache_pb2.CacheSetResponse:
        return await self._entries.set(request)

    async def SetMany(self, request: cache_pb2.CacheSetManyRequest, context: Context) -> cache_pb2.CacheSetManyResponse:
        return await self._entries.set_many(request)

    async def Delete(self, request: cache_pb2.CacheDeleteRequest, context: Context) -> cache_pb2.CacheDeleteResponse:
        return await self._entries.delete(request.key)

    async def Invalidate(self, request: cache_pb2.CacheInvalidateRequest, context: Context) -> cache_pb2.CacheInvalidateResponse:
        return await self._entries.invalidate(request)

    async def Clear(self, request: empty_pb2.Empty, context: Context) -> cache_pb2.CacheClearResponse:
        return await self._entries.clear()

    async def GetSyncState(self, request: empty_pb2.Empty, context: Context) -> cache_pb2.CacheSyncState:
        return await self._entries.get_sync_state()

    async def Sync(self, request: cache_pb2.CacheSyncRequest, context: Context) -> cache_pb2.CacheSyncState:
        return await self._entries.sync(request)

    async def Stats(self, request: empty_pb2.Empty, context: Context) -> cache_pb2.CacheStats:
        return await self._entries.stats()

    async def Watch(self, request: cache_pb2.CacheWatchRequest, context: Context) -> AsyncIterator[cache_pb2.CacheInvalidation]:
        async for invalidation in self._entries.watch(request.prefixes):
            yield invalidation
