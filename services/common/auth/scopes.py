"""The scope table, read once from the `required_scope` option of every RPC.

Nothing here lists methods: a new RPC declares its scope in its .proto, and a method
that declares none requires ADMIN, so forgetting is closed, not open.
"""

from __future__ import annotations

from collections.abc import Iterable

from devops_hub.v1 import options_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from services.common.contract.api import discover_services, method_path

Scope = options_pb2.Scope

# What holding a scope grants besides itself.
_IMPLIES: dict[int, set[int]] = {Scope.SCOPE_ADMIN: {Scope.SCOPE_READ, Scope.SCOPE_WRITE, Scope.SCOPE_EXECUTE}}
# Read once, not per call: an enum wrapper's attribute is a Python-level __getattr__.
_AUTHENTICATED = Scope.SCOPE_AUTHENTICATED


def required_scopes(services: Iterable[ServiceDescriptor] | None = None) -> dict[str, int]:
    """'/pkg.Service/Method' -> the scope it requires, for every service of the API."""
    return {
        method_path(method): required_scope(method)
        for service in (discover_services() if services is None else services)
        for method in service.methods
    }


def required_scope(method: MethodDescriptor) -> int:
    scope: int = method.GetOptions().Extensions[options_pb2.required_scope]  # type: ignore[index]  # protoc's .pyi types extensions as plain FieldDescriptors
    return scope or Scope.SCOPE_ADMIN


def allows(granted: Iterable[int], required: int) -> bool:
    granted = set(granted)
    if required == _AUTHENTICATED:
        return True
    return required in granted or any(required in _IMPLIES.get(g, ()) for g in granted)


def scope_name(scope: int) -> str:
    return Scope.Name(scope).removeprefix("SCOPE_").lower()
