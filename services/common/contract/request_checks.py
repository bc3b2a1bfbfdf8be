"""What every request must be before any handler sees it, whatever the method.

- Its bytes decode as the method's request message (grpc would answer garbage with
  UNKNOWN and a Python class name; this answers INVALID_ARGUMENT).
- Every value can be stored and answered: no NUL in any string (PostgreSQL refuses
  it), no infinite or NaN number (JSON cannot carry it), no Duration or Timestamp
  outside its type's range (timedelta and datetime overflow). Checked here, from the
  descriptors, so no field is forgotten (docs/resilience.md, "Every input the schema
  admits is answered").
- Every `(google.api.field_behavior) = REQUIRED` field is set (field_behavior.py). A
  resource's own fields in a create or update are the use case's to check: which are
  required depends on the write (AIP-134).
- Its ids (top-level `id` and `*_id` strings) are at most MAX_ID_LENGTH: a not-found
  answer echoes the id, and an echo past gRPC's 8 KiB metadata limit would turn into
  a misleading RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from services.common.contract import field_behavior
from services.common.contract.errors import InvalidArgument, invalid_fields
from services.common.contract.limits import MAX_ID_LENGTH

_STRING = FieldDescriptor.TYPE_STRING
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
_MESSAGE = FieldDescriptor.TYPE_MESSAGE
# The first few are enough to fix a request; a hostile one could hold thousands.
MAX_VIOLATIONS = 20
# The ranges google/protobuf/duration.proto and timestamp.proto define (in seconds).
_RANGES = {
    "google.protobuf.Duration": (-315_576_000_000, 315_576_000_000),
    "google.protobuf.Timestamp": (-62_135_596_800, 253_402_300_799),
}


# What a request that did not decode is replaced by, so the wrapper can refuse it.
MALFORMED = object()


class Refused:
    """What a request holding values no engine can store is replaced by."""

    __slots__ = ("violations",)

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        self.violations = violations


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Returns MALFORMED or Refused instead of raising, for check_request to answer once
    the caller is admitted. A NUL is a zero byte on the wire, so a request without one, of a
    message that cannot hold a float (a NaN needs no zero byte), skips the walk."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            request = deserializer(data)
        except (DecodeError, ValueError, TypeError, RuntimeError):
            return MALFORMED
        if isinstance(request, Message) and (b"\x00" in data or _walk_needed(request.DESCRIPTOR)):
            violations: list[tuple[str, str]] = []
            _walk(request, "", violations)
            if violations:
                return Refused(violations[:MAX_VIOLATIONS])
        return request

    return deserialize


def check_request(request: Any) -> None:
    """Raises INVALID_ARGUMENT for a request that breaks a rule of the module docstring."""
    if request is MALFORMED:
        raise InvalidArgument(
            "the request is not a valid encoding of the method's request message", reason="MALFORMED_REQUEST"
        )
    if isinstance(request, Refused):
        raise invalid_fields(request.violations)
    if isinstance(request, Message):
        too_long = [name for name in _id_fields(request.DESCRIPTOR) if len(getattr(request, name)) > MAX_ID_LENGTH]
        if too_long:
            raise invalid_fields([(name, f"must be at most {MAX_ID_LENGTH} characters") for name in too_long])
        missing = field_behavior.missing(request)
        if missing:
            raise invalid_fields(field_behavior.violations(missing))


@functools.cache
def _id_fields(descriptor: Descriptor) -> tuple[str, ...]:
    return tuple(
        field.name
        for field in descriptor.fields
        if field.type == _STRING and not field.is_repeated and (field.name == "id" or field.name.endswith("_id"))
    )


def _walk(message: Message, path: str, violations: list[tuple[str, str]]) -> None:
    if message.DESCRIPTOR.full_name in _JSON_TYPES:
        _walk_json(message, path, violations)
        return
    for field, value in message.ListFields():
        if len(violations) >= MAX_VIOLATIONS:
            return
        here = _join(path, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            for key in value:
                if key_field.type == _STRING and "\x00" in key:
                    violations.append((here, "keys must not contain NUL characters"))
                _check_value(value_field, value[key], f"{here}[{key!r}]", violations)
        elif field.is_repeated:
            for index, item in enumerate(value):
                _check_value(field, item, f"{here}[{index}]", violations)
        else:
            _check_value(field, value, here, violations)


def _check_value(field: FieldDescriptor, value: Any, path: str, violations: list[tuple[str, str]]) -> None:
    kind = field.type
    if kind == _STRING:
        if "\x00" in value:
            violations.append((path, "must not contain NUL characters"))
    elif kind in _FLOATS:
        if not math.isfinite(value):
            violations.append((path, "must be a finite number"))
    elif kind == _MESSAGE:
        bounds = _RANGES.get(value.DESCRIPTOR.full_name)
        if bounds is not None and not (bounds[0] <= value.seconds <= bounds[1] and -1_000_000_000 < value.nanos < 1_000_000_000):
            violations.append((path, f"must lie within {bounds[0]}s and {bounds[1]}s"))
        else:
            _walk(value, path, violations)


# google.protobuf.Struct and its parts are JSON: their paths read as JSON paths
# (input.services[0]), not as the wrapper messages' own fields.
_JSON_TYPES = frozenset({"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"})


def json_violations(message: Message, path: str) -> list[tuple[str, str]]:
    """What a Struct holds that no store or JSON answer can carry (a NUL, an infinity,
    a NaN): an agent's output is held to the same rule as a request."""
    violations: list[tuple[str, str]] = []
    _walk_json(message, path, violations)
    return violations


def _walk_json(message: Any, path: str, violations: list[tuple[str, str]]) -> None:
    kind = message.DESCRIPTOR.full_name
    if kind == "google.protobuf.Struct":
        for key, item in message.fields.items():
            if "\x00" in key:
                violations.append((path, "keys must not contain NUL characters"))
            _walk_json(item, _join(path, key), violations)
    elif kind == "google.protobuf.ListValue":
        for index, item in enumerate(message.values):
            _walk_json(item, f"{path}[{index}]", violations)
    else:
        which = message.WhichOneof("kind")
        if which == "string_value" and "\x00" in message.string_value:
            violations.append((path, "must not contain NUL characters"))
        elif which == "number_value" and not math.isfinite(message.number_value):
            violations.append((path, "must be a finite number"))
        elif which in ("struct_value", "list_value"):
            _walk_json(getattr(message, which), path, violations)


def _walk_needed(descriptor: Any, _seen: frozenset[str] = frozenset()) -> bool:
    """Whether a message of this type can hold, at any depth, a double, a float, a
    Duration or a Timestamp: values whose range the walk checks."""
    if descriptor.full_name in _RANGES:
        return True
    cached = _WALK_BY_TYPE.get(descriptor.full_name)
    if cached is not None:
        return cached
    seen = _seen | {descriptor.full_name}
    holds = any(
        field.type in _FLOATS
        or (field.type == _MESSAGE and field.message_type.full_name not in seen and _walk_needed(field.message_type, seen))
        for field in descriptor.fields
    )
    if not _seen:
        _WALK_BY_TYPE[descriptor.full_name] = holds
    return holds


_WALK_BY_TYPE: dict[str, bool] = {}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
