"""Background tasks belong to no request, and none dies silently."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc

from services.common.foundation.background import cancel_and_wait, end_if_cancelled, spawn
from services.common.runtime.grpc_host import GrpcHost
from services.common.telemetry.logs import RequestContextFilter
from services.common.telemetry.metrics import service_metrics

METHOD = "/test.Spawner/Start"


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(RequestContextFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_a_task_started_by_a_call_logs_without_the_calls_request_id():
    """A call starts work that outlives it (as ExecuteWorkflow does): that work's log
    lines name no request, before or after the call has ended."""
    finished = asyncio.Event()
    log = logging.getLogger("test.background")
    records = Records()
    log.addHandler(records)
    log.setLevel(logging.INFO)

    async def later() -> None:
        log.info("while the call runs")
        await finished.wait()
        log.info("after the call ended")

    async def start(request: bytes, context) -> bytes:
        log.info("in the call")
        spawn(later(), name="outliving")
        await asyncio.sleep(0.05)
        return b"started"

    handler = grpc.method_handlers_generic_handler("test.Spawner", {"Start": grpc.unary_unary_rpc_method_handler(start)})
    host = GrpcHost("127.0.0.1:0", metrics=service_metrics().grpc)
    host.add(lambda _servicer, server: server.add_generic_rpc_handlers((handler,)), None, "test.Spawner")
    port = await host.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await channel.unary_unary(METHOD)(b"", metadata=(("x-request-id", "req-123"),), timeout=10)
        finished.set()
        for _ in range(100):
            if len(records.records) == 3:
                break
            await asyncio.sleep(0.01)
    finally:
        await host.stop(0)
        log.removeHandler(records)
    ids = {record.getMessage(): record.request_id for record in records.records}
    assert ids == {"in the call": "req-123", "while the call runs": None, "after the call ended": None}


async def test_a_failing_background_task_is_logged_and_an_essential_one_stops_the_process(caplog):
    async def fails() -> None:
        raise RuntimeError("broken loop")

    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    try:
        with caplog.at_level(logging.ERROR, logger="services.common.foundation.background"):
            task = spawn(fails(), name="helper")
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.sleep(0)
            assert not stopped.is_set()
            essential = spawn(fails(), name="maintenance", essential=True)
            await asyncio.gather(essential, return_exceptions=True)
            await asyncio.wait_for(stopped.wait(), 10)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
    messages = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert ("ERROR", "background task helper failed") in messages
    assert ("CRITICAL", "background task maintenance failed; stopping the process so that it is restarted") in messages
    assert all(record.exc_info for record in caplog.records)


async def test_stopping_a_task_ends_it_without_swallowing_the_stoppers_own_cancellation():
    forever = asyncio.create_task(asyncio.sleep(3600))
    await cancel_and_wait(forever)
    assert forever.cancelled()

    async def failing() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            raise RuntimeError("failed while stopping")

    failed = asyncio.create_task(failing())
    await asyncio.sleep(0)
    try:
        await cancel_and_wait(failed)
    except RuntimeError as error:
        assert str(error) == "failed while stopping"
    else:
        raise AssertionError("the task's own error was not raised")

    # A task that takes its time to end (it cleans up), stopped by a caller that is
    # itself cancelled meanwhile: the caller's cancellation reaches the caller.
    release = asyncio.Event()

    async def slow_to_end() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await release.wait()

    slow = asyncio.create_task(slow_to_end())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(cancel_and_wait(slow))
    await asyncio.sleep(0)
    stopper.cancel()
    await asyncio.wait({stopper})
    assert stopper.cancelled()
    release.set()
    await asyncio.wait({slow})
    assert slow.cancelled()


async def test_a_loop_whose_cancellation_a_library_swallowed_still_ends():
    """As redis-py's PubSub read sometimes does: the CancelledError never reaches the
    loop, which would go on reading for ever and hold its stopper with it."""
    reads = 0

    async def read_swallowing_cancellation() -> None:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            pass

    async def loop() -> None:
        nonlocal reads
        while True:
            end_if_cancelled()
            await read_swallowing_cancellation()
            reads += 1

    task = asyncio.get_running_loop().create_task(loop())
    await asyncio.sleep(0.12)
    await asyncio.wait_for(cancel_and_wait(task), timeout=5)
    assert task.cancelled() and reads >= 1
