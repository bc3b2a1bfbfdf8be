"""ApiKeysService over gRPC: translate, then delegate to ApiKeys."""

from __future__ import annotations

from devops_hub.v1 import auth_pb2, auth_pb2_grpc
from google.protobuf import empty_pb2

from services.agents.api_keys import ApiKeys
from services.common.auth.guard import presented_key
from services.common.runtime.grpc_calls import Context


class ApiKeysServicer(auth_pb2_grpc.ApiKeysServiceServicer):
    def __init__(self, api_keys: ApiKeys) -> None:
        self._api_keys = api_keys

    async def WhoAmI(self, request: empty_pb2.Empty, context: Context) -> auth_pb2.ApiKey:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        return await self._api_keys.who_am_i(presented_key(metadata))

    async def ListApiKeys(self, request: auth_pb2.ListApiKeysRequest, context: Context) -> auth_pb2.ListApiKeysResponse:
        return await self._api_keys.list(request)

    async def CreateApiKey(self, request: auth_pb2.CreateApiKeyRequest, context: Context) -> auth_pb2.CreateApiKeyResponse:
        return await self._api_keys.create(request.api_key)

    async def RevokeApiKey(self, request: auth_pb2.RevokeApiKeyRequest, context: Context) -> auth_pb2.ApiKey:
        return await self._api_keys.revoke(request.id)
