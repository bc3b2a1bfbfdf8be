"""The API as the generated descriptors hold it, found by scanning the stubs' package."""

from __future__ import annotations

import importlib
import pkgutil

from devops_hub.v1 import options_pb2
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


def backend_of(service: ServiceDescriptor) -> str:
    """The part that serves `service`, as its `option (backend)` declares ("" when it
    declares none): its address is Settings.<backend>_addr."""
    return str(service.GetOptions().Extensions[options_pb2.backend])  # type: ignore[index]  # protoc's .pyi types extensions as plain FieldDescriptors


def method_path(method: MethodDescriptor) -> str:
    """'/package.Service/Method': the method's HTTP/2 path, the key of every per-method table."""
    return f"/{method.containing_service.full_name}/{method.name}"
