"""The API as the generated descriptors hold it, found by scanning the stubs' package."""

from __future__ import annotations

import importlib
import pkgutil

from google.protobuf.descriptor import ServiceDescriptor

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
