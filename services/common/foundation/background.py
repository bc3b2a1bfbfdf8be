"""Tasks that outlive the request that happened to start them.

asyncio copies the creating task's context into a new task, so a task started while
serving a call would carry that call's request binding and trace for its whole life.
spawn() starts every background task in an empty context instead, and logs a failure
with its traceback; an essential task that fails stops the process, so that its
supervisor starts a healthy one rather than leaving it half alive.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def spawn(coroutine: Coroutine[Any, Any, T], *, name: str, essential: bool = False) -> asyncio.Task[T]:
    task = asyncio.get_running_loop().create_task(coroutine, name=name, context=contextvars.Context())
    task.add_done_callback(_on_essential_done if essential else _on_done)
    return task


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancels `task` and waits until it has ended. An error it ended with is raised
    here, as `await task` would; its cancellation is not. Unlike `with
    suppress(CancelledError): await task`, a cancellation of the caller itself, arriving
    while it waits, is not swallowed with the task's: the caller's stop goes on."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.result()


async def wait_set(event: asyncio.Event, timeout: float | None) -> bool:
    """A background loop's pause: on Python 3.11 asyncio.wait_for swallows a cancellation
    that arrives just as what it waits for completes, so a loop pausing with it may never
    end and cancel_and_wait() waits forever; asyncio.timeout() lets it through."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


def end_if_cancelled() -> None:
    """Ends a background loop whose cancellation a library swallowed (redis-py's PubSub
    read, about one stop in eight): the task still says it is being cancelled, and
    cancel_and_wait() would otherwise wait for it forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _failure(task: asyncio.Task[Any]) -> BaseException | None:
    return None if task.cancelled() else task.exception()


def _on_done(task: asyncio.Task[Any]) -> None:
    failure = _failure(task)
    if failure is not None:
        log.error("background task %s failed", task.get_name(), exc_info=failure)


def _on_essential_done(task: asyncio.Task[Any]) -> None:
    failure = _failure(task)
    if failure is not None:
        log.critical("background task %s failed; stopping the process so that it is restarted",
                     task.get_name(), exc_info=failure)
        os.kill(os.getpid(), signal.SIGTERM)
