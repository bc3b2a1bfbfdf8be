"""What every gRPC server shares: health, reflection, error details, graceful stop."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
import pytest
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common import event_loop
from services.common.errors import NotFound
from services.common.grpc_host import GrpcHost
from services.common.telemetry.metrics import service_metrics
from tests.support.grpc_errors import failure_of

SLOW_METHOD = "/test.Slow/Sleep"


@dataclass
class SlowCalls:
    """A slow call waits for `release`; `arrived` is set once one has reached the server."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


def _register_slow(calls: SlowCalls):
    async def sleep(request: bytes, context) -> bytes:
        if request == b"missing":
            raise NotFound("no such thing", reason="THING_NOT_FOUND")
        if request == b"crash":
            raise RuntimeError("secret internals")
        if request == b"not yet":
            raise NotImplementedError("what a generated servicer raises for a method it lacks")
        calls.arrived.set()
        await calls.release.wait()
        return b"done:" + request

    handler = grpc.method_handlers_generic_handler(
        "test.Slow", {"Sleep": grpc.unary_unary_rpc_method_handler(sleep)}
    )

    def register(_servicer, server) -> None:
        server.add_generic_rpc_handlers((handler,))

    return register


@pytest.fixture
async def host():
    calls = SlowCalls()
    host = GrpcHost("127.0.0.1:0", metrics=service_metrics().grpc)
    host.add(_register_slow(calls), None, "test.Slow")
    port = await host.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield host, channel, calls
    calls.release.set()
    await channel.close()
    await host.stop(0)


async def test_health_and_reflection(host):
    _, channel, _ = host
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "test.Slow"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = set()
    async for response in responses:
        names = {s.name for s in response.list_services_response.service}
        break
    assert {"test.Slow", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


async def test_service_errors_carry_details_and_internals_do_not_leak(host):
    _, channel, _ = host
    call = channel.unary_unary(SLOW_METHOD)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"missing")
    failure = failure_of(info.value)
    assert failure.code == grpc.StatusCode.NOT_FOUND and failure.reason == "THING_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"crash")
    failure = failure_of(info.value)
    assert failure.code == grpc.StatusCode.INTERNAL and "secret" not in failure.message


async def test_a_method_the_servicer_lacks_is_unimplemented_not_an_error(host, caplog):
    _, channel, _ = host
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(SLOW_METHOD)(b"not yet")
    failure = failure_of(info.value)
    assert failure.code == grpc.StatusCode.UNIMPLEMENTED and SLOW_METHOD in failure.message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_graceful_stop_finishes_in_flight_calls(host):
    server, channel, calls = host
    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

    in_flight = asyncio.ensure_future(channel.unary_unary(SLOW_METHOD)(b"x"))
    await asyncio.wait_for(calls.arrived.wait(), 10)
    stopping = asyncio.ensure_future(server.stop(grace=5))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    calls.release.set()
    assert await in_flight == b"done:x"
    await stopping


@pytest.mark.fast
def test_services_run_their_loop_on_uvloop():
    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert event_loop.run(loop_type()) is uvloop.Loop


async def test_reflection_can_be_turned_off(sqlite_url):
    """GRPC_REFLECTION=false (as in the Kubernetes manifests): nothing lists the methods."""
    from tests.support.stack import make_settings, running_stack

    async with running_stack(make_settings(sqlite_url, grpc_reflection=False), with_sidecar=False) as stack:
        reflection = reflection_pb2_grpc.ServerReflectionStub(stack.channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [reply async for reply in responses]
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
