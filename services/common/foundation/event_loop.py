"""Every serving process of DevOps Hub runs its event loop on uvloop.

uvloop's loop (libuv, in C) schedules callbacks and moves socket bytes for less CPU
than asyncio's pure-Python one, and the hot path of a service is exactly that: many
small calls. grpc.aio and uvicorn both run on it: every service, the gateway
included, runs its life (services/common/runtime/process.py) through run() here. The
launcher and `make key` serve nothing and use plain asyncio.run().
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main), on a uvloop event loop."""
    return uvloop.run(main)
