"""Which request the running code serves, for the log formatter.

The gRPC call wrapper binds the call's context (its x-request-id is read from the
metadata only when something actually logs) and the gateway's front pass binds the
id itself. Every RPC and every HTTP request runs in a task of its own, and work that
outlives a request runs in tasks started by services.common.foundation.background.spawn, in an
empty context, so a binding never outlives the request that made it.
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
    """The id of the request being served, or None outside of one."""
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
