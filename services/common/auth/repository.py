"""All SQL about API keys."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from devops_hub.v1 import auth_pb2, options_pb2

from services.common.data.db import Database
from services.common.data.db.database import Executor, Row, as_datetime

ApiKey = auth_pb2.ApiKey
_COLUMNS = "id, name, prefix, scopes, create_time, expire_time, revoke_time, last_used_time"


def to_api_key(row: Row) -> ApiKey:
    api_key = ApiKey(
        id=row["id"],
        name=row["name"],
        prefix=row["prefix"],
        scopes=json.loads(row["scopes"]),
    )
    for name in ("create_time", "expire_time", "revoke_time", "last_used_time"):
        if row[name] is not None:
            getattr(api_key, name).FromDatetime(as_datetime(row[name]))
    return api_key


class ApiKeyRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(self, tx: Executor, api_key: ApiKey, key_hash: str, now: dt.datetime) -> ApiKey:
        """Stores a key on `tx`; UniqueViolation when a key with this hash exists already."""
        expire = api_key.expire_time.ToDatetime(dt.UTC) if api_key.HasField("expire_time") else None
        row = await tx.fetchrow(
            "INSERT INTO api_keys (id, name, key_hash, prefix, scopes, create_time, expire_time)"
            f" VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {_COLUMNS}",
            api_key.id,
            api_key.name,
            key_hash,
            api_key.prefix,
            json.dumps([options_pb2.Scope.Name(s) for s in sorted(set(api_key.scopes))]),
            now,
            expire,
        )
        return to_api_key(row)

    async def get(self, key_id: str) -> ApiKey | None:
        row = await self.db.fetchrow(f"SELECT {_COLUMNS} FROM api_keys WHERE id = $1", key_id)
        return None if row is None else to_api_key(row)

    async def existing(self, key_ids: Sequence[str]) -> list[str]:
        placeholders = ", ".join(f"${i}" for i in range(1, len(key_ids) + 1))
        return [row["id"] for row in await self.db.fetch(f"SELECT id FROM api_keys WHERE id IN ({placeholders})", *key_ids)]

    async def by_hash(self, key_hash: str) -> ApiKey | None:
        row = await self.db.fetchrow(f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = $1", key_hash)
        return None if row is None else to_api_key(row)

    async def list(self, show_revoked: bool, after_id: str | None, limit: int) -> list[ApiKey]:
        clauses: list[str] = []
        args: list[Any] = []
        if not show_revoked:
            clauses.append("revoke_time IS NULL")
        if after_id is not None:
            args.append(after_id)
            clauses.append(f"id > ${len(args)}")
        args.append(limit)
        where = " AND ".join(clauses) or "TRUE"
        rows = await self.db.fetch(f"SELECT {_COLUMNS} FROM api_keys WHERE {where} ORDER BY id LIMIT ${len(args)}", *args)
        return [to_api_key(row) for row in rows]

    async def revoke(self, tx: Executor, key_id: str, now: dt.datetime) -> ApiKey | None:
        """Revokes the key on `tx`; None when there is no such key or it is revoked already."""
        row = await tx.fetchrow(
            f"UPDATE api_keys SET revoke_time = $2 WHERE id = $1 AND revoke_time IS NULL RETURNING {_COLUMNS}", key_id, now
        )
        return None if row is None else to_api_key(row)

    async def forget(self, key_hash: str) -> int:
        return await self.db.execute("DELETE FROM api_keys WHERE key_hash = $1", key_hash)

    async def touch(self, key_ids: Sequence[str], now: dt.datetime) -> None:
        """Records use of these keys: one statement for all of them."""
        if key_ids:
            placeholders = ", ".join(f"${i}" for i in range(2, len(key_ids) + 2))
            await self.db.execute(f"UPDATE api_keys SET last_used_time = $1 WHERE id IN ({placeholders})", now, *key_ids)
