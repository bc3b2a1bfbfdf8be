"""Concurrent misses on one key share one load, but never across an invalidation.

A caller who arrives after an invalidation of the key must not join a load that
began before it: that load may have read the database before the write committed,
and handing its result to a caller whose read began after the write was
acknowledged is exactly a stale read. Such a caller starts a new load (which
replaces the old one for later callers); the old one still answers its own waiters.
A caller's cancellation stops its own wait, never the shared load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, TypeVar

from services.cache.client.history import InvalidationHistory

T = TypeVar("T")


@dataclasses.dataclass(slots=True)
class _Flight:
    task: asyncio.Task[Any]
    since: int


class SingleFlight:
    def __init__(self, history: InvalidationHistory) -> None:
        self._history = history
        self._flights: dict[Hashable, _Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    async def run(
        self, flight: Hashable, key: str, load: Callable[[int], Coroutine[Any, Any, T]], *, join: bool = True
    ) -> T:
        """load(since)'s result, shared with the callers of the same flight; `since`
        is the log position this process knew committed when the load began, and so
        the version of what it reads. join=False always starts a new load (a caller
        asking for a fresh read)."""
        current = self._flights.get(flight)
        if join and current is not None and not self._history.raced(key, current.since):
            task = current.task
        else:
            since = self._history.known
            task = asyncio.create_task(load(since))
            current = _Flight(task, since)
            self._flights[flight] = current
            task.add_done_callback(functools.partial(self._landed, flight, current))
        return await asyncio.shield(task)

    def _landed(self, flight: Hashable, mine: _Flight, _done: asyncio.Task[Any]) -> None:
        if self._flights.get(flight) is mine:
            del self._flights[flight]
        # Mark the exception retrieved: if every waiter was cancelled, nobody else will.
        if not mine.task.cancelled():
            mine.task.exception()
