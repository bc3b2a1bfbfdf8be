"""`make key`: creates an API key in DATABASE_URL's database and prints it, once.

    python -m services.agents.new_key                       # an admin key
    python -m services.agents.new_key --name ci --scopes read,execute

Only the key's hash is stored: the printed line is the only copy.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from devops_hub.v1 import auth_pb2, options_pb2

from services.agents.api_keys import ApiKeys
from services.common.auth.repository import ApiKeyRepository
from services.common.auth.verifier import DatabaseVerifier
from services.common.db import connect
from services.common.db.migrate import migrate
from services.common.errors import ServiceError
from services.common.settings import Settings


async def create(settings: Settings, name: str, scopes: list[int]) -> auth_pb2.CreateApiKeyResponse:
    db = await connect(settings.database_url, pool_size=1, max_overflow=0)
    try:
        await migrate(db)
        repository = ApiKeyRepository(db)
        return await ApiKeys(repository, DatabaseVerifier(repository)).create(auth_pb2.ApiKey(name=name, scopes=scopes))
    finally:
        await db.close()


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
        created = asyncio.run(create(Settings.from_env(), args.name, scopes))
    except ServiceError as exc:
        print(f"could not create the key: {exc.message}", file=sys.stderr)
        return 1
    print(created.key)
    print(f"key {created.api_key.id} ({created.api_key.name}); store it now, it is not shown again", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
