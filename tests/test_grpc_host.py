"""What every gRPC server shares: health, reflection, error details, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass, field

import grpc
import pytest
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.contract.errors import NotFound
from services.common.contract.limits import MAX_METADATA_BYTES
from services.common.runtime import process
from services.common.runtime.grpc_host import GrpcHost
from services.common.telemetry.metrics import service_metrics
from tests.support.grpc_errors import failure_of
from tests.support.processes import process_env, read_until, spawned

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
def test_services_run_their_loop_on_uvloop(monkeypatch):
    seen = []

    async def live(*_: object) -> None:
        seen.append(type(asyncio.get_running_loop()))

    monkeypatch.setattr(process, "_live", live)
    process.run(build=None, name="test", service="test")  # type: ignore[arg-type]
    assert seen == [uvloop.Loop]


async def test_reflection_can_be_turned_off(sqlite_url):
    """GRPC_REFLECTION=false (as in the Kubernetes manifests): nothing lists the methods."""
    from tests.support.stack import make_settings, running_stack

    async with running_stack(make_settings(sqlite_url, grpc_reflection=False), with_sidecar=False) as stack:
        reflection = reflection_pb2_grpc.ServerReflectionStub(stack.channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [reply async for reply in responses]
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """An HTTP/2 frame (RFC 9113 §4.1)."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_int(value: int) -> bytes:
    """An HPACK integer with a 7-bit prefix (RFC 7541 §5.1)."""
    if value < 127:
        return bytes([value])
    out, value = [127], value - 127
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes([*out, value])


def _literal(name: bytes, value: bytes, length: int | None = None) -> bytes:
    """A header field without indexing (RFC 7541 §6.2.2), its value's length as told."""
    return b"\x00" + _hpack_int(len(name)) + name + _hpack_int(len(value) if length is None else length) + value


HEALTH_CHECK = b"/grpc.health.v1.Health/Check"


async def _endless_header_block(port: int) -> int:
    """Opens a stream whose header block never ends: a HEADERS frame without END_HEADERS
    and a header value of a terabyte, sent in CONTINUATION frames until the server
    closes the connection. Returns the bytes sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", HEALTH_CHECK), (b":authority", b"x"), (b"te", b"trailers")]
    block = b"".join(_literal(name, value) for name, value in fields) + _literal(b"x-endless", b"", 1 << 40)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(0x4, 0, 0, b"") + _frame(0x1, 0, 1, block))
    sent, piece = 0, b"a" * 16384
    try:
        async with asyncio.timeout(30):
            while not reader.at_eof():
                writer.write(_frame(0x9, 0, 1, piece))
                await writer.drain()
                sent += len(piece)
                await asyncio.sleep(0)
    except ConnectionError:
        pass  # reset by the server: the bound at work
    finally:
        writer.close()
    return sent


async def test_service_ports_refuse_oversized_metadata_and_endless_header_blocks(tmp_path):
    """A service as its own process: metadata up to MAX_METADATA_BYTES is always
    taken and past it always refused (gRPC's defaults refuse at random between 8 and
    16 KiB), and 4 header blocks without end are cut off with the process's RSS (read
    from /proc) growing by less than 16 MB."""
    env = process_env(tmp_path)
    port = int(env["CACHE_ADDR"].rsplit(":", 1)[1])
    with spawned("services.cache.sidecar", env) as proc:
        read_until(proc, "listening")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = channel.unary_unary(HEALTH_CHECK.decode(), response_deserializer=health_pb2.HealthCheckResponse.FromString)
            request = health_pb2.HealthCheckRequest().SerializeToString()
            # gRPC counts name, value and 32 bytes an entry, the pseudo-headers too.
            under = MAX_METADATA_BYTES - 1024
            for _ in range(20):
                await check(request, metadata=[("x-filler", "a" * under)], timeout=10)
            for size in (MAX_METADATA_BYTES + 1, 1_000_000):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await check(request, metadata=[("x-filler", "a" * size)], timeout=10)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            before = _rss_mb(proc.pid)
            sent = await asyncio.gather(*(_endless_header_block(port) for _ in range(4)))
            grown = _rss_mb(proc.pid) - before
            assert grown < 16, f"the service grew by {grown:.1f} MB on {sum(sent)} bytes of header block"
            # And it still answers.
            assert (await check(request, timeout=10)).status == health_pb2.HealthCheckResponse.SERVING


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))
