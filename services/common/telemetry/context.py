"""Which request the running code serves, for the log formatter.

The gRPC call wrapper binds the call's context (its x-request-id is read only when
something logs), the gateway's front pass the id itself; work that outlives a request
runs in an empty context (docs/resilience.md, "Request context stays with its request").
"""

from __future__ import annotations

import contextvars
from typing import Protocol

import grpc

REQUEST_ID_METADATA_KEY = "x-request-id"


class _CallContext(Protocol):
    def invocation_metadata(self) -> grpc.aio.Metadata | None: ...


_current: contextvars.ContextVar[str | _CallContext | None] = contextvars.ContextVar("devops_hub_request", default=None)
# What bind_call() and bind_request_id() return, for unbind().
Binding = contextvars.Token[str | _CallContext | None]


def bind_call(context: _CallContext) -> Binding:
    return _current.set(context)


def bind_request_id(request_id: str) -> Binding:
    return _current.set(request_id)


def unbind(token: Binding) -> None:
    _current.reset(token)


def request_id() -> str | None:
    bound = _current.get()
    if bound is None or isinstance(bound, str):
        return bound
    try:
        metadata = bound.invocation_metadata() or ()
    except Exception:  # noqa: BLE001 - a call that has ended may no longer answer
        return None
    for key, value in metadata:
        if key == REQUEST_ID_METADATA_KEY:
            return value if isinstance(value, str) else None
    return None
