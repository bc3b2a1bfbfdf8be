"""API key use cases: create (shown once), list, revoke, who-am-I, and bootstrap keys.

Create and revoke are the resource template's (services/common/usecases/resource.py,
ResourceBase). API keys have no cached reads: the guard's verifier keeps each look-up
a second at most (auth/verifier.py).

The services' own key (SERVICE_API_KEY) is not one of them: it is a secret of the
deployment, compared by the guard, never stored, so it can be neither listed nor
revoked through the API (an admin key could otherwise cut the services off from each
other, or seem to revoke a key that the guard still honours). It is rotated by
changing SERVICE_API_KEY and restarting. WhoAmI names it for what it is.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from collections.abc import Awaitable, Sequence

from devops_hub.v1 import auth_pb2, options_pb2

from services.cache.log.outbox import Outbox
from services.common.auth import keys
from services.common.auth.keys import same_key
from services.common.auth.repository import ApiKeyRepository
from services.common.auth.verifier import KeyVerifier
from services.common.contract import pagination
from services.common.contract.errors import Unauthenticated
from services.common.data.db import UniqueViolation
from services.common.data.db.database import Executor
from services.common.foundation.clock import utc_now
from services.common.usecases import resource
from services.common.usecases.resource import ResourceBase, Violations

ApiKey = auth_pb2.ApiKey
Scope = options_pb2.Scope
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")
# What WhoAmI calls the services' key: not a key id the API knows (see above).
SERVICES_KEY_ID = "services"
GRANTABLE = (Scope.SCOPE_READ, Scope.SCOPE_WRITE, Scope.SCOPE_EXECUTE, Scope.SCOPE_ADMIN)


class ApiKeys(ResourceBase[ApiKey]):
    label = "api_key"
    _repository: ApiKeyRepository

    def __init__(self, repository: ApiKeyRepository, outbox: Outbox, verifier: KeyVerifier, service_key: str = "") -> None:
        super().__init__(repository, outbox)
        self._verifier = verifier
        self._service_key = service_key

    async def create(self, requested: ApiKey) -> auth_pb2.CreateApiKeyResponse:
        key = keys.new_key()

        async def insert(tx: Executor, records: Sequence[ApiKey], now: dt.datetime) -> list[ApiKey]:
            # One key per create: its one record is stored with the key's hash.
            (record,) = records
            return [await self._repository.insert(tx, record, keys.hash_key(key), now)]

        # A retry's answer (the template stores it): the same key, without its secret, which is never stored.
        created = await self._create_all(
            [requested], "api_key", lambda stored: auth_pb2.CreateApiKeyResponse(api_key=stored[0]), lambda r: _record(r, key), insert
        )
        return auth_pb2.CreateApiKeyResponse(api_key=created.api_key, key=key)

    async def ensure(self, key: str, name: str, scopes: Sequence[int]) -> bool:
        """Creates `key` if it is not stored yet (bootstrap and service keys); True if it created it."""
        if not keys.well_formed(key):
            raise ValueError(f"{name}: not a DevOps Hub key (dh_ and 43 url-safe characters); make one with `make key`")
        record = _record(ApiKey(name=name, scopes=scopes), key)  # type: ignore[arg-type]  # protoc's .pyi types an enum's numbers as int, its fields as the enum class
        try:
            async with self._repository.db.transaction() as tx:
                await self._repository.insert(tx, record, keys.hash_key(key), utc_now())
        except UniqueViolation:
            return False
        return True

    async def list(self, request: auth_pb2.ListApiKeysRequest) -> auth_pb2.ListApiKeysResponse:
        found, token = await pagination.page(
            request, lambda after, limit: self._repository.list(request.show_revoked, after, limit), lambda k: k.id
        )
        return auth_pb2.ListApiKeysResponse(api_keys=found, next_page_token=token)

    async def revoke(self, key_id: str) -> ApiKey:
        async with self._outbox.write() as write:
            revoked = await self._repository.revoke(write.tx, key_id, write.time)
            if revoked is not None:
                self.record(write, "revoked", {key_id: {}})
        # Not revoked now: revoked already (answered as it is), or NOT_FOUND.
        return revoked if revoked is not None else await self.get(key_id)

    async def forget(self, key: str) -> bool:
        """For the services' key, which earlier versions stored."""
        return await self._repository.forget(keys.hash_key(key)) > 0

    def _stored(self, key_id: str) -> Awaitable[ApiKey | None]:
        return self._repository.get(key_id)

    # The keys' rules: what their proto cannot say.

    async def check(self, api_key: ApiKey, path: str, violations: Violations) -> None:
        if api_key.name and not NAME.match(api_key.name):
            violations.append((f"{path}.name", "must be 1-100 letters, digits, spaces, '.', '_' or '-'"))
        for i, scope in enumerate(api_key.scopes):
            if scope not in GRANTABLE:
                violations.append((f"{path}.scopes[{i}]", "must be SCOPE_READ, SCOPE_WRITE, SCOPE_EXECUTE or SCOPE_ADMIN"))
        if api_key.HasField("expire_time") and api_key.expire_time.ToDatetime(dt.UTC) <= utc_now():
            violations.append((f"{path}.expire_time", "must be in the future"))

    async def who_am_i(self, key: str | None) -> ApiKey:
        if key and self._service_key and same_key(key, self._service_key):
            return ApiKey(id=SERVICES_KEY_ID, name="services", scopes=[Scope.SCOPE_ADMIN], prefix=keys.display_prefix(key))
        api_key = await self._verifier.verify(key) if key else None
        if api_key is None:
            raise Unauthenticated("no valid API key was presented", reason="API_KEY_INVALID" if key else "API_KEY_MISSING")
        return api_key


def _record(requested: ApiKey, key: str) -> ApiKey:
    """The key as stored: what its client may set, with the id and prefix the service sets."""
    record = resource.new(requested)
    record.id, record.prefix = f"key_{secrets.token_hex(8)}", keys.display_prefix(key)
    return record
