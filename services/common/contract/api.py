"""The API as the generated descriptors hold it, found by scanning the stubs' package."""

from __future__ import annotations

import importlib
import pkgutil

# The part that serves a service, as its `option (backend)` declares; one reading, the client's.
from devops_hub.channels import backend_of as backend_of
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

API_PACKAGE = "devops_hub.v1"


def discover_services(package: str = API_PACKAGE) -> list[ServiceDescriptor]:
    """Every service in every *_pb2 module of the generated package, so a new .proto
    file is picked up by everything that reads the API (gateway routes, scopes)."""
    root = importlib.import_module(package)
    services: list[ServiceDescriptor] = []
    for info in sorted(pkgutil.iter_modules(root.__path__), key=lambda i: i.name):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"{package}.{info.name}")
            services.extend(module.DESCRIPTOR.services_by_name.values())
    return services


def method_path(method: MethodDescriptor) -> str:
    """'/package.Service/Method': the method's HTTP/2 path, the key of every per-method table."""
    return f"/{method.containing_service.full_name}/{method.name}"
