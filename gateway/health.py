"""/health, /health/live and /health/ready: the gateway is only as ready as the backends
its routes call. Their grpc.health.v1 Checks run concurrently on the pooled channels
with a short deadline, so one hung backend costs a second, not the probe's timeout, and
the probe exercises the connections requests use."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.requests import Request
from starlette.responses import Response

from gateway.backends import ChannelPool
from gateway.json_body import JSON_MEDIA_TYPE, encode
from gateway.metrics import NO_STORE

CHECK_TIMEOUT = 1.0
SERVING = health_pb2.HealthCheckResponse.ServingStatus.Name(health_pb2.HealthCheckResponse.SERVING)


class HealthChecker:
    def __init__(self, addresses: Mapping[str, str]) -> None:
        self._addresses = dict(addresses)
        self._stubs: dict[str, health_pb2_grpc.HealthStub] = {}

    def bind(self, pool: ChannelPool) -> None:
        """Called in the lifespan, once the pool's channels exist."""
        self._stubs = {backend: health_pb2_grpc.HealthStub(pool.channel(backend)) for backend in self._addresses}

    async def _check_one(self, backend: str) -> dict[str, str]:
        address = self._addresses[backend]
        try:
            reply = await self._stubs[backend].Check(health_pb2.HealthCheckRequest(service=""), timeout=CHECK_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            return {"address": address, "status": exc.code().name, "error": exc.details() or exc.code().name}
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return {"address": address, "status": status, **({} if status == SERVING else {"error": f"backend reports {status}"})}

    async def ready(self, request: Request) -> Response:
        names = list(self._stubs)
        backends = dict(zip(names, await asyncio.gather(*(self._check_one(name) for name in names))))
        failing = [name for name, result in backends.items() if result["status"] != SERVING]
        report: dict[str, Any] = {"status": "NOT_SERVING" if failing else SERVING, "backends": backends}
        if failing:
            report["failing"] = failing
        return Response(encode(report), status_code=503 if failing else 200, media_type=JSON_MEDIA_TYPE, headers=NO_STORE)

    async def live(self, request: Request) -> Response:
        """/health/live: the process answers; restarting it would not fix a backend."""
        return Response(encode({"status": SERVING}), media_type=JSON_MEDIA_TYPE, headers=NO_STORE)
