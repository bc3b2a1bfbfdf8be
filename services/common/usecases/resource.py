"""A resource's use cases, written once: get, create, update, delete, and what they cause.

A resource subclasses Resource with what is its own: its label ("agent": its errors,
reasons, events, request paths), its rules, and its cached reads, `_stored(id)` for
Get and the list reads in `lists`. A resource that is created and then only read
(API keys: no update, no delete, no cached reads) subclasses ResourceBase, the part
without them. The rest is the same for every resource: the id
rule (AIP-122); every bad field named at once (AIP-193); a create inserts all or none;
an update (AIP-134) merges the mask's fields into the stored resource, checks it whole
and replaces it if its revision has not moved (AIP-154: with an etag, a moved one is
ABORTED; without, the update is merged again); each write commits its events, its
invalidations and (a create's) the request_id's answer in one unit of work (cache/log/outbox.py).
"""

from __future__ import annotations

import abc
import asyncio
import datetime as dt
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Generic, NoReturn, Protocol, TypeVar

from google.api import field_behavior_pb2
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from services.cache.client.decorators import CacheManager, encoded, every, stale
from services.cache.log.outbox import Outbox, Write
from services.common.contract import field_behavior
from services.common.contract.errors import Aborted, AlreadyExists, NotFound, ServiceError, invalid_fields
from services.common.contract.etags import revision_of
from services.common.data.db import UniqueViolation
from services.common.data.db.database import Executor
from services.common.runtime import idempotency

R = TypeVar("R", bound=Message)
R_co = TypeVar("R_co", bound=Message, covariant=True)
Answer = TypeVar("Answer", bound=Message)
Violations = list[tuple[str, str]]

# The one id rule of every resource whose client may name it; the protos' comments say it.
ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ID_RULE = "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
MAX_BATCH = 1000
# An update without an etag that keeps losing to concurrent writes gives up after this.
_UPDATE_ATTEMPTS = 3
# Every resource has both (AIP-122, AIP-154); names, so the generic code can reach them.
_ID, _ETAG = "id", "etag"


# How a create stores its checked resources on the unit of work's transaction.
Insert = Callable[[Executor, Sequence[R], dt.datetime], Awaitable[list[R]]]


class Records(Protocol[R_co]):
    """What ResourceBase reads of a resource's repository."""

    async def get(self, id: str, /) -> R_co | None: ...
    async def existing(self, ids: Sequence[str], /) -> list[str]: ...


class Store(Records[R], Protocol[R]):
    """A resource's repository; writes run on the unit of work's `tx`, `replace` and
    `delete` only while the revision (when given) is still the one named: for `replace`,
    `stored`'s, the resource as read before `resource` was made of it."""

    async def insert(self, tx: Executor, resources: Sequence[R], now: dt.datetime, /) -> list[R]: ...
    async def replace(self, tx: Executor, resource: R, stored: R, now: dt.datetime, /) -> R | None: ...
    async def delete(self, tx: Executor, id: str, revision: int | None, /) -> bool: ...


class ResourceBase(abc.ABC, Generic[R]):
    """The template without update and delete, for a resource that has neither."""

    label: ClassVar[str]
    # The list reads (@cached) whose every page a write to one resource may change.
    lists: ClassVar[tuple[Callable[..., Any], ...]] = ()

    def __init__(self, repository: Records[R], outbox: Outbox) -> None:
        self._repository = repository
        self._outbox = outbox

    # What each resource writes: its Get, and its rules.

    @abc.abstractmethod
    def _stored(self, id: str) -> Awaitable[R | None]:
        """The stored resource or None (Resource's: through @cached(method=<its Get RPC>, …))."""

    @abc.abstractmethod
    async def check(self, resource: R, path: str, violations: Violations) -> None:
        """Adds the resource's violations, its fields' paths under `path`: the rules
        that its proto cannot say (the template checks REQUIRED fields and enums)."""

    def normalise(self, resource: R) -> None:  # noqa: B027 - a hook that a resource without defaults leaves as it is
        """Defaults and clean-ups, in place, once the resource is valid."""

    def event_data(self, resource: R) -> dict[str, Any]:
        """What its created event says besides its id."""
        return {}

    # The template.

    async def get(self, id: str) -> R:
        resource = await self._stored(id)
        if resource is None:
            raise not_found(self.label, id)
        return resource

    async def _create_all(
        self, requested: Sequence[R], path: str, answer: Callable[[list[R]], Answer], made: Callable[[R], R], insert: Insert[R]
    ) -> Answer:
        """All of `requested` or none. `made` makes each requested resource the one to check and store (new(), or with
        what else the service sets); `answer` is stored with them when the call carries a request_id."""
        if len(requested) > MAX_BATCH:
            raise invalid_fields([("requests", f"at most {MAX_BATCH} per call, got {len(requested)}")])
        violations: Violations = []
        first: dict[str, int] = {}
        resources = []
        for i, one in enumerate(requested):
            at = path.format(i=i)
            resource = made(one)
            check_id(_id(resource), f"{at}.id", violations)
            await self._check(resource, at, violations)
            if first.setdefault(_id(resource), i) != i:
                violations.append((f"{at}.id", f"repeats the id of {path.format(i=first[_id(resource)])}"))
            resources.append(resource)
        if violations:
            raise invalid_fields(violations)
        for resource in resources:
            self.normalise(resource)
        try:
            async with self._outbox.write() as write:
                await idempotency.claim(write.tx)
                created = await insert(write.tx, resources, write.time)
                self.record(write, "created", {_id(resource): self.event_data(resource) for resource in created})
                reply = answer(created)
                await idempotency.answer(write.tx, reply)
        except UniqueViolation:
            raise await self._exists([_id(resource) for resource in resources]) from None
        return reply

    async def _check(self, resource: R, path: str, violations: Violations) -> None:
        violations.extend(field_behavior.violations(field_behavior.missing(resource), path))
        for field in resource.DESCRIPTOR.fields:
            value = getattr(resource, field.name)
            if field.enum_type is not None and not field.is_repeated and value not in field.enum_type.values_by_number:
                known = ", ".join(v.name for v in field.enum_type.values if v.number)
                violations.append((f"{path}.{field.name}", f"unknown value {value}; one of {known}"))
        await self.check(resource, path, violations)

    @classmethod
    def made_stale(cls, *ids: str) -> tuple[str, ...]:
        """What a write to these resources makes stale: every page of every list read."""
        return tuple(every(read) for read in cls.lists)

    def record(self, write: Write, verb: str, events: dict[str, dict[str, Any]]) -> None:
        """A write's invalidations and its events ("agent.created")."""
        write.made_stale(*self.made_stale(*events))
        for id, data in events.items():
            write.emit(f"{self.label}.{verb}", id, {f"{self.label}_id": id, **data})

    async def _exists(self, ids: list[str]) -> ServiceError:
        taken = sorted(await self._repository.existing(ids)) or ids
        shown = ", ".join(taken[:10]) + (f" and {len(taken) - 10} more" if len(taken) > 10 else "")
        message, reason = f"{self.label} id already exists: {shown}", f"{self.label.upper()}_EXISTS"
        return AlreadyExists(message, reason=reason, metadata={"ids": ",".join(taken[:100])})


class Resource(ResourceBase[R]):
    _repository: Store[R]

    def __init__(self, repository: Store[R], cache: CacheManager, outbox: Outbox) -> None:
        super().__init__(repository, outbox)
        # The @cached reads find their manager here.
        self.cache = cache
        # Per resource id being updated: its turn's lock, and how many updates hold or wait for it.
        self._updates: dict[str, tuple[asyncio.Lock, int]] = {}

    async def get_encoded(self, id: str) -> bytes:
        """get() as the resource's wire bytes: a hot Get answers the cached bytes as they are."""
        resource = await encoded(self._stored, id)
        if resource is None:
            raise not_found(self.label, id)
        return resource

    async def create(self, requested: R) -> R:
        return await self.create_all([requested], self.label, lambda created: created[0])

    async def create_all(self, requested: Sequence[R], path: str, answer: Callable[[list[R]], Answer]) -> Answer:
        return await self._create_all(requested, path, answer, new, self._repository.insert)

    async def update(self, changes: R, mask: Sequence[str]) -> R:
        resource_id, etag = _id(changes), _etag(changes)
        violations: Violations = []
        check_id(resource_id, f"{self.label}.id", violations)
        fields = _fields_to_update(changes, mask, self.label, violations)
        if violations:
            raise invalid_fields(violations)
        async with self._updating(resource_id) as end_turn:
            for _ in range(_UPDATE_ATTEMPTS):
                stored = await self._repository.get(resource_id)
                if stored is None:
                    raise not_found(self.label, resource_id)
                if etag and revision_of(etag) != int(_etag(stored)):
                    self._stale(resource_id, etag)
                current = type(stored)()
                current.CopyFrom(stored)
                field_mask_pb2.FieldMask(paths=fields).MergeMessage(
                    changes, current, replace_message_field=True, replace_repeated_field=True
                )
                await self._check(current, self.label, violations)
                if violations:
                    raise invalid_fields(violations)
                self.normalise(current)
                async with self._outbox.write(end_turn) as write:
                    updated = await self._repository.replace(write.tx, current, stored, write.time)
                    if updated is not None:
                        self.record(write, "updated", {resource_id: {"fields": fields}})
                if updated is not None:
                    return updated
        message = f"{self.label} {resource_id!r} kept changing while it was being updated; retry"
        raise Aborted(message, reason="ETAG_MISMATCH", metadata={"id": resource_id})

    @asynccontextmanager
    async def _updating(self, id: str) -> AsyncIterator[Callable[[], None]]:
        """This process's updates of one resource take turns: run side by side, all but
        one would read a revision that the first replaces, and merge again (or give up,
        ABORTED, after _UPDATE_ATTEMPTS). Other processes' updates still can race: the
        revision check catches those. Yields what ends the turn early, once the update
        has committed: the next one reads it while this one waits for its delivery."""
        lock, users = self._updates.get(id, (asyncio.Lock(), 0))
        self._updates[id] = (lock, users + 1)
        held = False

        def end_turn() -> None:
            nonlocal held
            if held:
                held = False
                lock.release()

        try:
            await lock.acquire()
            held = True
            yield end_turn
        finally:
            end_turn()
            users = self._updates[id][1] - 1
            if users:
                self._updates[id] = (lock, users)
            else:
                del self._updates[id]

    async def delete(self, id: str, etag: str) -> None:
        # An etag this service never issued matches no revision (-1): the delete is refused as stale.
        expected = None if not etag else (revision_of(etag) or -1)
        async with self._outbox.write() as write:
            deleted = await self._repository.delete(write.tx, id, expected)
            if deleted:
                self.record(write, "deleted", {id: {}})
        if not deleted:
            if etag and await self._repository.existing([id]):
                self._stale(id, etag)
            raise not_found(self.label, id)

    @classmethod
    def made_stale(cls, *ids: str) -> tuple[str, ...]:
        """Also each resource's cached Get, named through the read's own declaration."""
        return (*(stale(cls._stored, i) for i in ids), *super().made_stale(*ids))

    def _stale(self, id: str, etag: str) -> NoReturn:
        message = f"{self.label} {id!r} was changed since etag {etag!r}; read it again and retry"
        raise Aborted(message, reason="ETAG_MISMATCH", metadata={"id": id})


def not_found(label: str, id: str) -> NotFound:
    return NotFound(f"{label.replace('_', ' ')} {id!r} not found", reason=f"{label.upper()}_NOT_FOUND", metadata={"id": id})


def check_id(value: str, path: str, violations: Violations) -> None:
    if not value:
        violations.append((path, field_behavior.IS_REQUIRED))
    elif not ID.match(value):
        violations.append((path, ID_RULE))


def new(requested: R) -> R:
    """A copy of `requested` as a create takes it: without what the service sets
    (OUTPUT_ONLY fields, the etag), its id generated if it names none."""
    resource = type(requested)()
    resource.CopyFrom(requested)
    for field in resource.DESCRIPTOR.fields:
        if field.name == _ETAG or field_behavior_pb2.OUTPUT_ONLY in field_behavior.behaviors(field):
            resource.ClearField(field.name)
    if not _id(resource) and field_behavior_pb2.IDENTIFIER in field_behavior.behaviors(resource.DESCRIPTOR.fields_by_name[_ID]):
        setattr(resource, _ID, str(uuid.uuid4()))
    return resource


def _fields_to_update(changes: Message, mask: Sequence[str], label: str, violations: Violations) -> list[str]:
    """AIP-134: the mask's paths; "*" for every writable field; no mask for the fields set."""
    writable = field_behavior.writable_fields(type(changes))
    if not mask:
        fields = [name for name in writable if field_behavior.is_set(changes, name)]
        if not fields:
            violations.append(("update_mask", f"nothing to update: set update_mask or some fields of {label}"))
        return fields
    if list(mask) == ["*"]:
        return list(writable)
    fields = []
    for i, path in enumerate(mask):
        if path not in writable:
            violations.append((f"update_mask.paths[{i}]", f"{path!r} is not a writable field; one of {', '.join(writable)}"))
        elif path not in fields:
            fields.append(path)
    return fields


def _id(resource: Message) -> str:
    return str(getattr(resource, _ID))


def _etag(resource: Message) -> str:
    return str(getattr(resource, _ETAG))
