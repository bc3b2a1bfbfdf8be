"""The real gateway in-process, for tests: built, started and stopped as `python -m
gateway` does it (real uvicorn on a real socket, in the caller's event loop), so tests
see exactly what clients see: status lines, headers, streaming."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from gateway.server import build
from services.common.foundation.settings import Settings
from services.common.runtime.process import running


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings, **app_options: Any) -> AsyncIterator[str]:
    """The base URL (`http://127.0.0.1:PORT`) of a gateway on an ephemeral port;
    `app_options` go to create_app."""
    gateway = await build(settings.replace(gateway_host="127.0.0.1", gateway_port=0), **app_options)
    async with running(gateway, settings.shutdown_grace):
        yield gateway.listening
