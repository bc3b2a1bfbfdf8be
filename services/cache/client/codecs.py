"""How cached values become bytes and back: protobuf or a declared codec, never pickle.

Unpickling runs code chosen by whoever wrote the bytes, and the cache is shared by
every service. Each codec names a content type, stored with the value, so a reader
only decodes what it asked for: a content-type mismatch or a decoding error is a
miss, never an exception to the caller.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from google.protobuf.message import DecodeError, Message

T = TypeVar("T")
M = TypeVar("M", bound=Message)


class CodecError(ValueError):
    """The bytes are not a value of this codec."""


@dataclasses.dataclass(slots=True)
class Codec(Generic[T]):
    content_type: str
    encode: Callable[[T], bytes]
    _decode: Callable[[bytes], T]

    def decode(self, data: bytes) -> T:
        try:
            return self._decode(data)
        except (ValueError, DecodeError) as exc:  # UnicodeDecodeError and JSON's errors are ValueErrors
            raise CodecError(str(exc)) from exc


def protobuf_content_type(full_name: str) -> str:
    return f"application/x-protobuf; type={full_name}"


def protobuf_codec(message_type: type[M]) -> Codec[M]:
    """One codec per message type, built once (the read path asks for it per call)."""
    # mypy takes a class for unhashable when its instances are (python/mypy#11470).
    return _protobuf_codec(message_type)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=256)
def _protobuf_codec(message_type: type[Message]) -> Codec[Any]:
    def encode(value: Message) -> bytes:
        if not isinstance(value, message_type):
            raise TypeError(f"expected {message_type.DESCRIPTOR.full_name}, got {type(value).__name__}")
        return value.SerializeToString()

    return Codec(protobuf_content_type(message_type.DESCRIPTOR.full_name), encode, message_type.FromString)


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


JSON: Codec[Any] = Codec("application/json", _json, json.loads)
BYTES: Codec[bytes] = Codec("application/octet-stream", bytes, bytes)
TEXT: Codec[str] = Codec("text/plain; charset=utf-8", str.encode, bytes.decode)


def codec_for(annotation: Any) -> Codec[Any] | None:
    """The codec a return annotation implies (a protobuf message type, bytes, str or a
    JSON-native type, each optionally "| None"); None: the caller declares codec=."""
    if isinstance(annotation, type):
        if issubclass(annotation, Message):
            return protobuf_codec(annotation)
        if issubclass(annotation, (bytes, bytearray)):
            return BYTES
        if issubclass(annotation, str):
            return TEXT
        if annotation in (dict, list, int, float, bool):
            return JSON
    origin = typing.get_origin(annotation)
    if origin in (dict, list):
        return JSON
    if origin in (typing.Union, types.UnionType):
        # T | None: None is cached as a negative entry, T picks the codec.
        others = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(others) == 1:
            return codec_for(others[0])
    return None
