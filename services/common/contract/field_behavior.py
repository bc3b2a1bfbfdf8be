"""What the protos' google.api.field_behavior annotations say about a message's fields.

Which fields a call must carry (REQUIRED) and which a client may write (all but
OUTPUT_ONLY, IDENTIFIER and IMMUTABLE) are declared once, in the .proto files; every
check reads them from the descriptors here, so adding an annotation is the whole change.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING

from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

if TYPE_CHECKING:
    # What a message's DESCRIPTOR hands out at run time, as the protobuf stubs type it.
    from google._upb._message import FieldDescriptor as _UpbFieldDescriptor

    Field = FieldDescriptor | _UpbFieldDescriptor

# The description every missing REQUIRED field is reported with (AIP-193 BadRequest).
IS_REQUIRED = "is required"
# Set by the service, or naming the resource: never written by a client's update.
_NOT_WRITABLE = frozenset({field_behavior_pb2.OUTPUT_ONLY, field_behavior_pb2.IDENTIFIER, field_behavior_pb2.IMMUTABLE})
# AIP-154: the etag travels with a write as its concurrency check, it is not written by it.
_ETAG = "etag"


def behaviors(field: Field) -> frozenset[int]:
    return frozenset(field.GetOptions().Extensions[field_behavior_pb2.field_behavior])


def writable_fields(resource: type[Message]) -> tuple[str, ...]:
    """The fields of a resource a client may write, in declaration order: what an
    update_mask may name. Read once per type, not on every update."""
    return _writable(resource.DESCRIPTOR)


@functools.cache
def _writable(descriptor: Descriptor) -> tuple[str, ...]:
    return tuple(field.name for field in descriptor.fields if field.name != _ETAG and not behaviors(field) & _NOT_WRITABLE)


@functools.cache
def _required(descriptor: Descriptor) -> tuple[Field, ...]:
    return tuple(field for field in descriptor.fields if field_behavior_pb2.REQUIRED in behaviors(field))


def missing(message: Message) -> list[str]:
    """The REQUIRED fields of `message` it leaves unset (a request, or a resource being
    created or, once merged, updated: all of its own)."""
    return [field.name for field in _required(message.DESCRIPTOR) if not _holds_value(message, field)]


def is_set(message: Message, name: str) -> bool:
    return _holds_value(message, message.DESCRIPTOR.fields_by_name[name])


def _holds_value(message: Message, field: Field) -> bool:
    value = getattr(message, field.name)
    if field.is_repeated:
        return len(value) > 0
    if field.has_presence:
        return message.HasField(field.name)
    return bool(value != field.default_value)


def violations(names: Iterable[str], prefix: str = "") -> list[tuple[str, str]]:
    return [(f"{prefix}.{name}" if prefix else name, IS_REQUIRED) for name in names]
