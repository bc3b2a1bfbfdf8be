"""Delivering invalidations to the sidecar: at once, and again until it accepts them.

A failed Invalidate or Delete is not dropped: the pattern goes on a bounded pending
list that a background task retries with backoff until the sidecar accepts it (past
the bound, one full clear is owed instead). Meanwhile this process bypasses the cache
for keys matching a pending pattern: it neither reads nor fills them, so the process
that acknowledged a write never reads its old value back. Other processes are
covered by the invalidation log: whatever this process fails to deliver (it may
also die first), the relay sends from the log once the sidecar answers (see
services/common/invalidation_relay.py and docs/cache.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import grpc
from devops_hub.v1 import cache_pb2

from services.common.background import cancel_and_wait, spawn
from services.common.cache.keys import parse_pattern
from services.common.cache.transport import SidecarTransport

log = logging.getLogger(__name__)

# An invalidation refused for these reasons will never succeed; retrying is pointless.
NOT_RETRYABLE = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED})
MAX_RETRY_DELAY = 5.0
# The sidecar's bound on patterns per Invalidate call.
MAX_PATTERNS_PER_CALL = 1000


class InvalidationDelivery:
    def __init__(
        self,
        transport: SidecarTransport,
        on_local: Callable[[str], None],
        *,
        max_pending: int = 256,
    ) -> None:
        self._transport = transport
        # Applies a pattern to this process's own layers (history, near-cache).
        self._on_local = on_local
        self._max_pending = max_pending
        self._pending: set[str] = set()
        self._retry_task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> frozenset[str]:
        return frozenset(self._pending)

    def bypassed(self, key: str) -> bool:
        """True while an invalidation matching key is still on its way."""
        return bool(self._pending) and any(parse_pattern(pattern).matches(key) for pattern in self._pending)

    async def invalidate(self, patterns: Sequence[str], sequence: int = 0) -> bool:
        # Before: this process stops serving the old values at once. After (below):
        # kills any local fill that raced the sidecar's invalidation.
        self._apply_locally(patterns)
        if self._pending and self._transport.skipping:
            # The sidecar just proved unreachable: the retry task will send these with
            # the rest rather than make this write wait for a timeout.
            self._queue(patterns)
            return False
        # One call per batch: everything a write made stale travels together; the log
        # entry counts as applied only with its last batch.
        batches = [list(patterns[start : start + MAX_PATTERNS_PER_CALL]) for start in range(0, len(patterns), MAX_PATTERNS_PER_CALL)]
        sequences = [0] * (len(batches) - 1) + [sequence]
        results = await asyncio.gather(*(self._send(batch, seq) for batch, seq in zip(batches, sequences)))
        self._apply_locally(patterns)
        failed = [pattern for batch, ok in zip(batches, results) if not ok for pattern in batch]
        if failed:
            self._queue(failed)
        return not failed

    async def delete(self, key: str, pattern: str) -> bool:
        self._on_local(pattern)
        if self._pending and self._transport.skipping:
            self._queue([pattern])
            return False
        _, code = await self._transport.call("Delete", cache_pb2.CacheDeleteRequest(key=key), respect_backoff=False)
        self._on_local(pattern)
        if code is None or code in NOT_RETRYABLE:
            return code is None
        self._queue([pattern])
        return False

    def retry_later(self, patterns: Sequence[str]) -> None:
        """For a write that could not reach the sidecar some other way (a failed Set)."""
        self._queue(patterns)

    async def close(self) -> None:
        task, self._retry_task = self._retry_task, None
        if task is not None:
            await cancel_and_wait(task)
        if self._pending:
            log.warning(
                "cache client closing with %d invalidations not applied (the invalidation log's relay delivers them): %s",
                len(self._pending),
                sorted(self._pending),
            )

    def _apply_locally(self, patterns: Sequence[str]) -> None:
        for pattern in patterns:
            self._on_local(pattern)

    async def _send(self, patterns: list[str], sequence: int = 0) -> bool:
        """True when done with the patterns: applied, or refused for good (logged)."""
        request = cache_pb2.CacheInvalidateRequest(patterns=patterns, sequence=sequence)
        _, code = await self._transport.call("Invalidate", request, respect_backoff=False)
        return code is None or code in NOT_RETRYABLE

    def _queue(self, patterns: Sequence[str]) -> None:
        self._pending.update(patterns)
        if len(self._pending) > self._max_pending:
            log.warning("cache client: %d invalidations pending; will clear the whole cache instead", len(self._pending))
            self._pending = {"*"}
        if not self._transport.closed and (self._retry_task is None or self._retry_task.done()):
            self._retry_task = spawn(self._retry(), name="cache-invalidation-retry")

    async def _retry(self) -> None:
        delay = max(self._transport.retry_after, 0.05)
        while self._pending and not self._transport.closed:
            await asyncio.sleep(delay)
            pending = sorted(self._pending)
            for start in range(0, len(pending), MAX_PATTERNS_PER_CALL):
                batch = pending[start : start + MAX_PATTERNS_PER_CALL]
                if not await self._send(batch):
                    break
                self._pending.difference_update(batch)
            delay = min(delay * 2, MAX_RETRY_DELAY)
        if not self._pending:
            log.info("cache client: pending invalidations applied")
