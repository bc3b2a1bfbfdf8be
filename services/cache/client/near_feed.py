"""Feeds a near-cache or an edge cache from the sidecar's Watch stream, for as long as
its owner lives.

The cache is live exactly while the stream is, and only while the stream is provably
complete: messages carry the invalidation log's span (after, through], so one that
starts past the cache's position means something was missed and the cache is
cleared, as it is when the stream ends or goes quiet for longer than `liveness` (the
sidecar heartbeats every 0.25 s; a frozen sidecar sends nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any, cast

import grpc
from devops_hub.v1 import cache_pb2

from services.cache.client.fed_cache import FedCache
from services.cache.client.transport import SidecarTransport
from services.common.foundation.background import spawn

log = logging.getLogger(__name__)

DEFAULT_WATCH_LIVENESS = 1.0
WATCH_RETRY_INITIAL = 0.05
WATCH_RETRY_MAX = 2.0
# How long close() waits for the stream's task to end.
CLOSE_TIMEOUT = 2.0


class NearCacheFeed:
    def __init__(
        self,
        transport: SidecarTransport,
        near: FedCache[Any, Any],
        *,
        prefixes: Sequence[str] = (),
        liveness: float = DEFAULT_WATCH_LIVENESS,
    ) -> None:
        self._transport = transport
        self._near = near
        self._prefixes = list(prefixes)
        self._liveness = liveness
        self._task: asyncio.Task[None] | None = None
        self._call: grpc.aio.UnaryStreamCall[cache_pb2.CacheWatchRequest, cache_pb2.CacheInvalidation] | None = None

    def start(self) -> None:
        if self._task is None and not self._transport.closed:
            self._task = spawn(self._run(), name="cache-watch")

    async def close(self) -> None:
        task, self._task = self._task, None
        # The call first: a read() of an intercepted stream call (the services' key)
        # that is cancelled from outside may never finish cancelling, while a
        # cancelled call ends its pending read at once.
        if self._call is not None:
            self._call.cancel()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task}, timeout=CLOSE_TIMEOUT)
        self._near.go_dark()

    async def _run(self) -> None:
        delay = WATCH_RETRY_INITIAL
        while not self._transport.closed:
            call = self._call = self._transport.watch(self._prefixes)
            try:
                await self._follow(call)
            except (grpc.aio.AioRpcError, TimeoutError) as exc:  # ended, or silent past liveness
                log.debug("cache watch stream ended (%r); cache cleared", exc)
            finally:
                went_live = self._near.live
                self._near.go_dark()
                call.cancel()
            delay = WATCH_RETRY_INITIAL if went_live else min(delay * 2, WATCH_RETRY_MAX)
            await asyncio.sleep(delay)

    async def _follow(self, call: grpc.aio.UnaryStreamCall[cache_pb2.CacheWatchRequest, cache_pb2.CacheInvalidation]) -> None:
        near = self._near
        while True:
            async with asyncio.timeout(self._liveness):  # not wait_for: see background.wait_set
                read = await call.read()
            if read is grpc.aio.EOF:
                return
            message = cast(cache_pb2.CacheInvalidation, read)
            if not near.live:
                near.go_live(message.through)  # the stream opens with a heartbeat
                continue
            if message.after > near.position:
                log.warning("cache watch stream: a gap after %d, the cache is at %d; cleared", message.after, near.position)
                return
            # A span from the log is recorded at its end; patterns from outside it only drop.
            at = message.through if message.through > message.after else None
            # This process's own write came back: its commit applied it already.
            if at is None or not near.took_own(message.after, message.through) or "*" in message.patterns:
                for pattern in message.patterns:
                    near.invalidate(pattern, at)
            near.position = max(near.position, message.through)
            near.history.learn(message.through)
