"""The API as the protos declare it, for the tests that enumerate it."""

from __future__ import annotations

from collections.abc import Mapping

from services.common.contract.api import backend_of, discover_services

# Service full name → backend (`option (backend)`), for every service that declares one:
# what the gateway routes when no table of its own is given.
BACKEND_OF_SERVICE: Mapping[str, str] = {
    service.full_name: backend for service in discover_services() if (backend := backend_of(service))
}
