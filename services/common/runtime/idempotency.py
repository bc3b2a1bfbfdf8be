"""Safe retries (AIP-155): a create or execute call that carries a request_id is done once.

The layer (Idempotency.wrap, on every method whose request has a request_id field)
replays a stored answer; otherwise the handler runs with the key in a context
variable, and the use case calls claim(tx) first and answer(tx, reply) last in its
write's transaction, so the answer commits with the write. A second request that
finds the key taken at claim() rolls back and replays the first answer. A method with
no transaction of its own (ExecuteAgent) has its answer stored once the handler
returns. docs/resilience.md, "Safe retries", has the rules a client sees.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message

from services.common.auth.guard import presented_key
from services.common.auth.keys import hash_key
from services.common.contract.errors import Aborted, CommitOutcomeUnknown, FailedPrecondition, invalid_fields
from services.common.contract.pagination import fingerprint
from services.common.data.db.database import Executor
from services.common.data.idempotency_repository import IdempotencyRepository, KeyUse
from services.common.foundation.clock import utc_now
from services.common.runtime.grpc_calls import Context, Single

KEY_FIELD = "request_id"
# ExecuteWorkflow's older name for it, honoured when request_id is empty, with its old
# format (any 1-128 characters) so that its clients keep working.
ALIAS_FIELD = "idempotency_key"
MAX_ALIAS = 128
# The proto annotates request_id with (google.api.field_info).format = UUID4.
_UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


class KeyTaken(Exception):
    """claim() found the key held by another request: this one's write rolls back."""


@dataclass
class _Call:
    use: KeyUse
    repository: IdempotencyRepository
    now: dt.datetime
    expired_before: dt.datetime
    answered: bool = False


_CURRENT: ContextVar[_Call | None] = ContextVar("idempotent_call", default=None)


async def claim(tx: Executor) -> None:
    """The first statement of a write's transaction, when its call carries a key."""
    call = _CURRENT.get()
    if call is not None and not await call.repository.claim(tx, call.use, call.now, call.expired_before):
        raise KeyTaken(call.use.request_id)


async def answer(tx: Executor, reply: Message) -> None:
    """The last statement of the write's transaction: the RPC's answer, stored with the write."""
    call = _CURRENT.get()
    if call is not None:
        await call.repository.answer(tx, call.use, reply.SerializeToString(deterministic=True))
        call.answered = True


class Idempotency:
    def __init__(self, repository: IdempotencyRepository, retention: float) -> None:
        self._repository = repository
        self._retention = dt.timedelta(seconds=retention)

    def wrap(self, behavior: Single, method: str) -> Single:
        """`behavior` made safe to retry when the request of '/pkg.Service/Method' has a
        request_id; any other method as it is."""
        try:
            descriptor = descriptor_pool.Default().FindMethodByName(method.strip("/").replace("/", "."))
        except KeyError:
            return behavior
        key_fields = [name for name in (KEY_FIELD, ALIAS_FIELD) if name in descriptor.input_type.fields_by_name]
        if KEY_FIELD not in key_fields:
            return behavior
        reply_class = message_factory.GetMessageClass(descriptor.output_type)

        async def handle(request: Any, context_: Context) -> Any:
            key = _key(request, key_fields)
            if not key:
                return await behavior(request, context_)
            now = utc_now()
            use = KeyUse(_caller(context_), method, key, fingerprint(request, key_fields))
            call = _Call(use, self._repository, now, now - self._retention)
            replay = await self._replay(call, reply_class)
            if replay is not None:
                return replay
            token = _CURRENT.set(call)
            try:
                reply = await behavior(request, context_)
                if not call.answered:
                    async with self._repository.db.transaction() as tx:
                        await claim(tx)
                        await answer(tx, reply)
                return reply
            except KeyTaken:
                replay = await self._replay(call, reply_class)
                if replay is None:  # the first request rolled back meanwhile
                    raise Aborted("another request with this request_id was in progress; retry", reason="REQUEST_ID_IN_USE") from None
                return replay
            except CommitOutcomeUnknown as exc:
                # With its key, the retry is safe whatever happened: it answers what committed.
                raise self._repository.db.outages.database.failed(exc) from exc
            finally:
                _CURRENT.reset(token)

        return handle

    async def _replay(self, call: _Call, reply_class: type[Message]) -> Message | None:
        stored = await self._repository.find(call.use, call.expired_before)
        if stored is None:
            return None
        if stored.fingerprint != call.use.fingerprint:
            raise FailedPrecondition(
                f"request_id {call.use.request_id!r} was used with a different request; use a new request_id for a new request",
                reason="REQUEST_ID_REUSED",
                metadata={"request_id": call.use.request_id},
            )
        return reply_class.FromString(stored.response)


def _key(request: Message, key_fields: Sequence[str]) -> str:
    """The request's key (request_id, else the alias), refused with INVALID_ARGUMENT when ill-formed."""
    request_id: str = getattr(request, KEY_FIELD)
    if request_id:
        if not _UUID4.match(request_id.lower()):
            raise invalid_fields([(KEY_FIELD, "must be a UUID4 such as 0b9c8d3e-5f1a-4c2b-9d7e-6a5b4c3d2e1f")])
        return request_id.lower()
    alias: str = getattr(request, ALIAS_FIELD, "") if ALIAS_FIELD in key_fields else ""
    if len(alias) > MAX_ALIAS:
        raise invalid_fields([(ALIAS_FIELD, f"must be at most {MAX_ALIAS} characters")])
    return alias


def _caller(context_: Context) -> str:
    """Keys are scoped per caller: the hash of the API key presented, else 'anonymous'."""
    metadata = {k: v for k, v in context_.invocation_metadata() or () if isinstance(v, str)}
    key = presented_key(metadata)
    return hash_key(key) if key else "anonymous"

