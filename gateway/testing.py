"""Run the real gateway in-process, on an ephemeral port, for tests.

    async with running_gateway(settings) as base_url:
        async with httpx.AsyncClient(base_url=base_url) as client:
            ...

The gateway is built, started and stopped as `python -m gateway` does it
(gateway/server.py, services/common/runtime/process.py): real uvicorn on a real socket in
the caller's event loop, so tests see exactly what clients see (status lines,
headers, streaming), with no port races.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from gateway.server import build
from services.common.foundation.settings import Settings
from services.common.runtime.process import running


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings, host: str = "127.0.0.1", **app_options: Any) -> AsyncIterator[str]:
    """Yields the base URL (`http://127.0.0.1:PORT`) of a started gateway; stops it on exit.

    `app_options` go to create_app (services, backend_of_service, registry).
    """
    gateway = await build(settings.replace(gateway_host=host, gateway_port=0), **app_options)
    async with running(gateway, settings.shutdown_grace):
        yield gateway.listening
