"""services/common/transport/channels.py against real gRPC servers: which calls may be sent twice
(read from the descriptors), and a read that one worker leaves waiting is answered by
another, while a connection on which a call timed out is
replaced. The same with real processes and SIGSTOP: tests/test_processes.py."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool

from services.common.contract.api import discover_services
from services.common.transport import channels
from services.common.transport.channels import open_channel, retryable

SERVICE = "grey.test.v1.Idempotent"


def _declare_test_service() -> None:
    """A service whose Put is marked `option idempotency_level = IDEMPOTENT` (as a create
    carrying an AIP-155 request id is) and whose Post is not, in the default pool."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(SERVICE)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto(name="grey_test_idempotent.proto", package="grey.test.v1", syntax="proto3")
    file.message_type.add(name="Blob").field.add(
        name="data", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES, label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    )
    service = file.service.add(name="Idempotent")
    put = service.method.add(name="Put", input_type=".grey.test.v1.Blob", output_type=".grey.test.v1.Blob")
    put.options.idempotency_level = descriptor_pb2.MethodOptions.IDEMPOTENT
    service.method.add(name="Post", input_type=".grey.test.v1.Blob", output_type=".grey.test.v1.Blob")
    pool.Add(file)


def test_reads_and_methods_marked_idempotent_may_be_sent_twice_and_nothing_else():
    discover_services()
    _declare_test_service()
    # Reads: their google.api.http rule is a GET.
    assert retryable("/devops_hub.v1.AgentsService/GetAgent")
    assert retryable("/devops_hub.v1.AgentsService/ListAgents")
    assert retryable("/devops_hub.v1.WorkflowsService/ListExecutions")
    # Marked in the proto.
    assert retryable(f"/{SERVICE}/Put")
    # Writes, and what the pool does not know.
    assert not retryable("/devops_hub.v1.AgentsService/CreateAgent")
    assert not retryable("/devops_hub.v1.AgentsService/ExecuteAgent")
    assert not retryable("/devops_hub.v1.WorkflowsService/ExecuteWorkflow")
    assert not retryable(f"/{SERVICE}/Post")
    assert not retryable("/no.such.v1.Service/Method")


# The servers and the client share this test's event loop: on a machine whose cores
# other tests keep busy, the healthy server's answers can come later than the 0.5 s
# ATTEMPT_TIMEOUT, which then replaces healthy connections too and leaves a read's
# last attempt (which waits out its deadline) on the stuck one. The mechanism is the
# same at any attempt timeout; a longer one keeps the test about it.
ATTEMPT_TIMEOUT = 1.5


async def test_a_read_routes_around_a_stuck_worker_whose_connections_are_replaced(caplog, monkeypatch):
    """Two servers share one port (SO_REUSEPORT), as WORKERS do; one stops answering.
    Every read is still answered, in a few ATTEMPT_TIMEOUTs at most, and the
    connections the stuck one holds are replaced."""
    monkeypatch.setattr(channels, "ATTEMPT_TIMEOUT", ATTEMPT_TIMEOUT)
    _declare_test_service()
    stuck, release = asyncio.Event(), asyncio.Event()
    served = {"a": 0, "b": 0}

    def server(name: str) -> grpc.aio.Server:
        async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            served[name] += 1
            if name == "a" and stuck.is_set():
                await release.wait()
            return request

        handlers = {method: grpc.unary_unary_rpc_method_handler(answer) for method in ("Put", "Post")}
        host = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        host.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        return host

    a, b = server("a"), server("b")
    port = a.add_insecure_port("127.0.0.1:0")
    assert b.add_insecure_port(f"127.0.0.1:{port}") == port
    await a.start()
    await b.start()
    channel = open_channel(f"127.0.0.1:{port}", connections=8, tracer=None)
    try:
        put = channel.unary_unary(f"/{SERVICE}/Put")
        await asyncio.gather(*(put(b"warm", timeout=5) for _ in range(32)))
        # Eight connections all on one server would happen once in 128 runs.
        assert served["a"] and served["b"], served

        stuck.set()
        latencies: list[float] = []

        async def reads() -> None:
            for n in range(12):
                began = time.monotonic()
                assert await put(b"%d" % n, timeout=20) == b"%d" % n
                latencies.append(time.monotonic() - began)

        with caplog.at_level(logging.WARNING, logger="services.common.transport.channels"):
            await asyncio.gather(*(reads() for _ in range(4)))
        assert len(latencies) == 48
        # The first attempt on the stuck server, then at worst two more on connections
        # that have not yet shown they answer (a fresh one may reach the stuck server).
        assert max(latencies) < 3 * ATTEMPT_TIMEOUT + 0.4, sorted(latencies)[-5:]
        assert sum(latency >= ATTEMPT_TIMEOUT for latency in latencies) >= 1, "no read met the stuck server"
        assert "replacing it" in caplog.text

        # A call that may not be sent twice waits for its own deadline where it landed.
        post = channel.unary_unary(f"/{SERVICE}/Post")
        outcomes = await asyncio.gather(*(post(b"once", timeout=1.0) for _ in range(8)), return_exceptions=True)
        for outcome in outcomes:
            assert outcome == b"once" or (
                isinstance(outcome, grpc.aio.AioRpcError) and outcome.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            ), outcome
    finally:
        release.set()
        await channel.close()
        await a.stop(None)
        await b.stop(None)
