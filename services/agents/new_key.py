"""`make key`: creates an API key and prints it, once.

    python -m services.agents.new_key                       # an admin key
    python -m services.agents.new_key --name ci --scopes read,execute

Where the key goes follows the stack, so that the key works against it:
DATABASE_URL's database when that variable is set; otherwise, when a stack answers
where its proto puts ApiKeysService (AGENTS_ADDR), through it with the services' key
(SERVICE_API_KEY, or the one `make run` keeps in var/service.key), so it lands in
whatever database that stack runs on; otherwise the default database. The line on
stderr says which. Only the key's hash is stored: the printed line is the only copy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from devops_hub import errors
from devops_hub.channels import backend_of
from devops_hub.client import Client
from devops_hub.v1 import auth_pb2, options_pb2

from services.agents.api_keys import ApiKeys
from services.cache.client.client import CacheClient
from services.cache.log.outbox import Outbox
from services.cache.log.relay import build_relay
from services.common.auth.keys import kept_service_key
from services.common.auth.repository import ApiKeyRepository
from services.common.auth.verifier import API_KEYS_SERVICE, DatabaseVerifier
from services.common.contract.errors import ServiceError
from services.common.data.db import connect
from services.common.data.db.migrate import migrate
from services.common.foundation.settings import Settings, redact
from services.common.transport.channels import service_address, service_channel

# How long a running stack has to answer before the key goes to the database.
STACK_TIMEOUT = 1.0


async def create(settings: Settings, name: str, scopes: list[int]) -> tuple[auth_pb2.CreateApiKeyResponse, str]:
    """The new key, and where it was created (for the user)."""
    request = auth_pb2.ApiKey(name=name, scopes=scopes)  # type: ignore[arg-type]  # protoc's .pyi types an enum's numbers as int, its fields as the enum class
    if "DATABASE_URL" not in os.environ:
        created = await _through_running_stack(settings, request)
        if created is not None:
            return created, f"through the stack running at {service_address(API_KEYS_SERVICE, settings)}, in its database"
    db = await connect(settings.database_url, pool_size=1, max_overflow=0)
    try:
        # The first migration applied now: nothing had ever run on this database.
        fresh = 1 in await migrate(db)
        repository = ApiKeyRepository(db)
        # The services' unit of work, event included; a key makes nothing stale, so the
        # cache client and the relay it needs are never called here.
        cache, relay = CacheClient.from_settings(settings, near_cache=None), build_relay(settings, db)
        try:
            created = await ApiKeys(repository, Outbox(db, cache, relay, "agents"), DatabaseVerifier(repository)).create(request)
        finally:
            await relay.stop()
            await cache.close()
    finally:
        await db.close()
    where = f"in {redact(settings.database_url)}"
    if fresh:
        where += " (a database no stack had used yet: start the stack with the same DATABASE_URL)"
    return created, where


async def _through_running_stack(settings: Settings, api_key: auth_pb2.ApiKey) -> auth_pb2.CreateApiKeyResponse | None:
    """The key created by the stack whose ApiKeysService answers, or None when none answers
    or it does not take the services' key."""
    service_key = settings.service_api_key or kept_service_key()
    if not service_key:
        return None
    async with service_channel(API_KEYS_SERVICE, settings.replace(service_api_key=service_key)) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), STACK_TIMEOUT)
        except TimeoutError:
            return None
        try:
            return await Client({backend_of(API_KEYS_SERVICE): channel}, timeout=10).create_api_key(api_key)
        except (errors.Unauthenticated, errors.PermissionDenied) as exc:
            print(f"the stack at {service_address(API_KEYS_SERVICE, settings)} refused the services' key ({exc.message}); "
                  "writing to the database instead", file=sys.stderr)
            return None
        except errors.ApiError as exc:
            raise ServiceError(exc.message or exc.code.name) from None


def main() -> int:
    parser = argparse.ArgumentParser(description="Create a DevOps Hub API key and print it once.")
    parser.add_argument("--name", default="admin")
    parser.add_argument("--scopes", default="admin", help="comma separated: read, write, execute, admin")
    args = parser.parse_args()
    try:
        scopes = [options_pb2.Scope.Value(f"SCOPE_{name.strip().upper()}") for name in args.scopes.split(",") if name.strip()]
    except ValueError:
        parser.error("--scopes takes read, write, execute and admin, comma separated")
    try:
        created, where = asyncio.run(create(Settings.from_env(), args.name, scopes))
    except ServiceError as exc:
        print(f"could not create the key: {exc.message}", file=sys.stderr)
        return 1
    print(created.key)
    print(f"key {created.api_key.id} ({created.api_key.name}) created {where}; store it now, it is not shown again", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
