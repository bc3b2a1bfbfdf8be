"""All SQL about idempotency keys (services/common/runtime/idempotency.py says why they exist)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from services.common.data.db import Database, UniqueViolation
from services.common.data.db.database import Executor


@dataclass(frozen=True)
class KeyUse:
    """One use of a request_id: who, for what, and which request it was."""

    caller: str
    method: str
    request_id: str
    fingerprint: str


@dataclass(frozen=True)
class Stored:
    fingerprint: str
    response: bytes


class IdempotencyRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def find(self, use: KeyUse, since: dt.datetime) -> Stored | None:
        row = await self.db.fetchrow(
            "SELECT fingerprint, response FROM idempotency_keys"
            " WHERE caller = $1 AND method = $2 AND request_id = $3 AND create_time >= $4",
            use.caller,
            use.method,
            use.request_id,
            since,
        )
        if row is None:
            return None
        return Stored(row["fingerprint"], bytes(row["response"] or b""))

    async def claim(self, tx: Executor, use: KeyUse, now: dt.datetime, expired_before: dt.datetime) -> bool:
        """Inserts the key's row on `tx`; False when another request holds it. On
        PostgreSQL the insert waits for a transaction holding the same key to end."""
        # A row past its retention that the pruner has not reached yet is free to reuse.
        await tx.execute(
            "DELETE FROM idempotency_keys WHERE caller = $1 AND method = $2 AND request_id = $3 AND create_time < $4",
            use.caller,
            use.method,
            use.request_id,
            expired_before,
        )
        try:
            await tx.execute(
                "INSERT INTO idempotency_keys (caller, method, request_id, fingerprint, create_time) VALUES ($1, $2, $3, $4, $5)",
                use.caller,
                use.method,
                use.request_id,
                use.fingerprint,
                now,
            )
        except UniqueViolation:
            return False
        return True

    async def answer(self, tx: Executor, use: KeyUse, response: bytes) -> None:
        await tx.execute(
            "UPDATE idempotency_keys SET response = $4 WHERE caller = $1 AND method = $2 AND request_id = $3",
            use.caller,
            use.method,
            use.request_id,
            response,
        )

    async def prune(self, before: dt.datetime) -> int:
        return await self.db.execute("DELETE FROM idempotency_keys WHERE create_time < $1", before)
