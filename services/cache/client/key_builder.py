"""Cache keys built from a function's arguments (docs/cache.md, "Keys"): deterministic,
readable where it costs nothing, and never derived from str() or repr() of an object
(those change with memory addresses, dict order or a library's formatting). Any other
type raises TypeError at call time instead of producing a key that is silently wrong.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import hashlib
import inspect
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from google.protobuf.message import Message

from services.cache.client.keys import MAX_KEY_BYTES, escape_key, key_problem

_DIGEST_CHARS = 32


class KeyBuilder:
    """Builds the keys of one function. `self`/`cls` are not part of the key: the
    decorated methods belong to long-lived service objects, and what they return
    depends on their arguments."""

    def __init__(self, key_prefix: str, signature: inspect.Signature) -> None:
        problem = key_problem(f"{key_prefix}:x")
        if problem:
            raise ValueError(f"key_prefix {key_prefix!r}: {problem}")
        self.key_prefix = key_prefix
        self.signature = signature
        parameters = list(signature.parameters)
        self._skip = parameters[0] if parameters and parameters[0] in ("self", "cls") else None
        # A call that passes every parameter by position (a cached read's usual call)
        # binds them in order, without inspect's per-call work.
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        simple = all(p.kind in positional for p in signature.parameters.values())
        self._positional = tuple(parameters) if simple else None

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        names = self._positional
        if names is not None and not kwargs and len(args) == len(names):
            arguments = dict(zip(names, args))
        else:
            bound = self.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
        if self._skip is not None:
            arguments.pop(self._skip, None)
        return arguments

    def unbound(self, args: Sequence[Any]) -> Sequence[Any]:
        """A method's arguments as a call passes them, for arguments named without `self`."""
        return (None, *args) if self._skip is not None else args

    def key(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        parts = [encode_part(value) for value in self.bind(args, kwargs).values()]
        key = ":".join([self.key_prefix, *parts])
        if len(key.encode()) > MAX_KEY_BYTES:
            digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:_DIGEST_CHARS]
            key = f"{self.key_prefix}:h={digest}"
        return key

    def pattern(self, template: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """template with each {name} replaced by that argument's key part, escaped so
        that glob characters in it match only themselves."""
        arguments = self.bind(args, kwargs)
        return template.format_map({name: escape_key(encode_part(value)) for name, value in arguments.items()})


def encode_part(value: Any) -> str:
    """A scalar's readable part (tagged, so 42 and "42" differ; a str percent-encoded, so
    ':', '=' and globs never appear raw), or a hash of anything else's canonical form."""
    readable = _readable(value)
    return readable if readable is not None else "h=" + hashlib.sha256(canonical(value)).hexdigest()[:_DIGEST_CHARS]


def _readable(value: Any) -> str | None:
    if value is None:
        return "n="
    if isinstance(value, bool):
        return "b=1" if value else "b=0"
    if isinstance(value, enum.Enum):
        return f"e={quote(type(value).__qualname__, safe='')}.{quote(value.name, safe='')}"
    if isinstance(value, int):
        return f"i={int(value)}"
    if isinstance(value, str):
        return quote(value, safe="") if value else "s="
    if isinstance(value, float):
        return f"f={float(value)!r}"
    if isinstance(value, uuid.UUID):
        return f"u={value}"
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return f"t={quote(value.isoformat(), safe='')}"
    if isinstance(value, decimal.Decimal):
        return f"d={value}"
    return None


def canonical(value: Any) -> bytes:
    """A type-tagged, length-prefixed encoding: equal values give equal bytes, and
    values of different types never do (scalars' readable parts are tagged already)."""
    readable = _readable(value)
    if readable is not None:
        return b"p" + _lp(readable.encode())
    if isinstance(value, (bytes, bytearray, memoryview)):
        return b"y" + _lp(bytes(value))
    if isinstance(value, Message):
        return b"m" + _lp(value.DESCRIPTOR.full_name.encode()) + _lp(value.SerializeToString(deterministic=True))
    if isinstance(value, Mapping):
        items = sorted(_lp(canonical(k)) + _lp(canonical(v)) for k, v in value.items())
        return b"d" + _lp(b"".join(items))
    if isinstance(value, (list, tuple)):
        return b"l" + _lp(b"".join(_lp(canonical(item)) for item in value))
    if isinstance(value, (set, frozenset)):
        return b"t" + _lp(b"".join(sorted(_lp(canonical(item)) for item in value)))
    cache_key = getattr(value, "__cache_key__", None)
    if callable(cache_key):
        return b"k" + _lp(type(value).__qualname__.encode()) + canonical(cache_key())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
        return b"c" + _lp(type(value).__qualname__.encode()) + canonical(fields)
    raise TypeError(
        f"cannot build a cache key from a {type(value).__qualname__}: pass a protobuf message, a scalar, "
        "a container or dataclass of those, or give the type a __cache_key__() method"
    )


def _lp(data: bytes) -> bytes:
    return b"%d:" % len(data) + data
