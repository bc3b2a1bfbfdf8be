"""API key use cases: create (shown once), list, revoke, who-am-I, and bootstrap keys.

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
from collections.abc import Sequence

from devops_hub.v1 import auth_pb2, options_pb2

from services.common.auth import keys
from services.common.auth.keys import same_key
from services.common.auth.repository import ApiKeyRepository
from services.common.auth.verifier import KeyVerifier
from services.common.contract import field_behavior, pagination
from services.common.contract.errors import Unauthenticated, invalid_fields
from services.common.data.db import UniqueViolation
from services.common.foundation.clock import utc_now
from services.common.runtime import idempotency
from services.common.usecases import resource

ApiKey = auth_pb2.ApiKey
Scope = options_pb2.Scope
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")
# What WhoAmI calls the services' key: not a key id the API knows (see above).
SERVICES_KEY_ID = "services"
GRANTABLE = (Scope.SCOPE_READ, Scope.SCOPE_WRITE, Scope.SCOPE_EXECUTE, Scope.SCOPE_ADMIN)


class ApiKeys:
    def __init__(self, repository: ApiKeyRepository, verifier: KeyVerifier, service_key: str = "") -> None:
        self._repository = repository
        self._verifier = verifier
        self._service_key = service_key

    async def create(self, requested: ApiKey) -> auth_pb2.CreateApiKeyResponse:
        now = utc_now()
        # Its REQUIRED fields (the name, at least one scope) are set, and well formed.
        violations = field_behavior.violations(field_behavior.missing(requested), "api_key")
        if requested.name and not NAME.match(requested.name):
            violations.append(("api_key.name", "must be 1-100 letters, digits, spaces, '.', '_' or '-'"))
        for i, scope in enumerate(requested.scopes):
            if scope not in GRANTABLE:
                violations.append((f"api_key.scopes[{i}]", "must be SCOPE_READ, SCOPE_WRITE, SCOPE_EXECUTE or SCOPE_ADMIN"))
        if requested.HasField("expire_time") and requested.expire_time.ToDatetime(dt.UTC) <= now:
            violations.append(("api_key.expire_time", "must be in the future"))
        if violations:
            raise invalid_fields(violations)
        key = keys.new_key()
        async with self._repository.db.transaction() as tx:
            await idempotency.claim(tx)
            stored = await self._repository.insert(tx, _record(requested, key), keys.hash_key(key), now)
            # A retry's answer: the same key, without its secret, which is never stored.
            await idempotency.answer(tx, auth_pb2.CreateApiKeyResponse(api_key=stored))
        return auth_pb2.CreateApiKeyResponse(api_key=stored, key=key)

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
        revoked = await self._repository.revoke(key_id, utc_now())
        if revoked is None:
            raise resource.not_found("api_key", key_id)
        return revoked

    async def forget(self, key: str) -> bool:
        """Deletes a stored copy of `key` (the services' key, stored by earlier
        versions); True if there was one."""
        return await self._repository.forget(keys.hash_key(key)) > 0

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
