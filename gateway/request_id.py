"""x-request-id: taken from the client when usable, made up otherwise, echoed in the
response and forwarded to the backend, so one id follows a request through every log."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable

HEADER = b"x-request-id"
SCOPE_KEY = "devops_hub.request_id"

# Printable ASCII without spaces and bounded: anything else could not travel as gRPC
# metadata, or would let a client stuff arbitrary data into every log line.
_USABLE = re.compile(rb"[\x21-\x7e]{1,128}")


def new_request_id() -> str:
    # 128 random bits, as a uuid4's hex, without building a UUID (a visible share of a hot request).
    return secrets.token_hex(16)


def request_id_of(headers: Iterable[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == HEADER:
            if _USABLE.fullmatch(value):
                return value.decode("ascii")
            break
    return new_request_id()
