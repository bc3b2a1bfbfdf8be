"""Keys, settings and a secured stack for the tests that call with API keys.

Several test modules need the same admin key and a stack that checks keys; they
import them from here rather than from one another.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from devops_hub.v1 import auth_pb2, auth_pb2_grpc, options_pb2

from services.common.auth import keys
from services.common.foundation.settings import Settings
from tests.support.stack import Stack, make_settings, running_stack

Scope = options_pb2.Scope
READ, WRITE, EXECUTE, ADMIN = Scope.SCOPE_READ, Scope.SCOPE_WRITE, Scope.SCOPE_EXECUTE, Scope.SCOPE_ADMIN
ADMIN_KEY = keys.new_key()
SERVICE_KEY = keys.new_key()


def auth_settings(url: str, **overrides) -> Settings:
    return make_settings(url, auth_enabled=True, bootstrap_admin_key=ADMIN_KEY, service_api_key=SERVICE_KEY, **overrides)


@pytest.fixture
async def secured(sqlite_url) -> AsyncIterator[tuple[Stack, auth_pb2_grpc.ApiKeysServiceStub]]:
    async with running_stack(auth_settings(sqlite_url), with_workflows=True) as stack:
        channel = grpc.aio.insecure_channel(stack.settings.agents_addr)
        keys_stub = auth_pb2_grpc.ApiKeysServiceStub(channel)
        yield stack, keys_stub
        await channel.close()


async def new_key(keys_stub, *scopes: int, **fields) -> str:
    created = await keys_stub.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(api_key=auth_pb2.ApiKey(name=f"k-{uuid.uuid4().hex[:6]}", scopes=scopes, **fields)),
        metadata=(("x-api-key", ADMIN_KEY),),
    )
    return created.key
