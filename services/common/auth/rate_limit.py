"""Token buckets per caller: taken in this process's memory, counted in Redis when shared.

A bucket holds up to `requests` tokens and refills at requests/window per second. A
hot call never waits on Redis: with REDIS_URL each process reports the tokens it took
(every SYNC_INTERVAL, or at once past half its quota of SYNC_SHARE of the limit) and
one Lua script answers what is left of the shared bucket; when Redis fails, buckets
stay in memory for RETRY_AFTER seconds. docs/resilience.md, "Rate limits", has the
bounds this gives.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import redis.asyncio as redis
from redis.exceptions import RedisError

from services.common.foundation.background import cancel_and_wait, spawn, wait_set

log = logging.getLogger(__name__)

RETRY_AFTER = 5.0
MEMORY_BUCKETS = 100_000
SYNC_INTERVAL = 0.1
SYNC_SHARE = 0.01

# KEYS[1] the bucket; ARGV: capacity, refill per second, expiry in ms, tokens taken
# (admitted already) since the last report. Answers the tokens left, possibly below 0.
_SCRIPT = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil then
  tokens = capacity
  ts = now
end
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate) - tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return tostring(tokens)
"""


@dataclass(frozen=True)
class Policy:
    requests: int
    window: float

    @property
    def rate(self) -> float:
        return self.requests / self.window

    @property
    def quota(self) -> int:
        """Tokens a process may take from a shared bucket before Redis has counted them."""
        return max(1, int(self.requests * SYNC_SHARE))


class Decision(NamedTuple):
    """A NamedTuple: one is made per call, and a frozen dataclass is several times slower to make."""

    allowed: bool
    limit: int
    remaining: int
    # Seconds until the bucket is full again, and until one token is back.
    reset_after: float
    retry_after: float


class _Bucket:
    """This process's view of one bucket: its tokens as of `at`, and what it took that Redis has not counted yet."""

    __slots__ = ("policy", "tokens", "at", "taken", "synced", "report")

    def __init__(self, policy: Policy, now: float) -> None:
        self.policy = policy
        self.tokens = float(policy.requests)
        self.at = now
        self.taken = 0
        self.synced = False
        self.report: asyncio.Future[None] | None = None


class RateLimiter:
    def __init__(
        self,
        policies: Mapping[str, Policy],
        redis_url: str = "",
        *,
        prefix: str = "dh:rl:",
        max_connections: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policies = {name: p for name, p in policies.items() if p.requests > 0 and p.window > 0}
        self._prefix = prefix
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._redis = None
        self._script = None
        self._redis_down_until = 0.0
        # Buckets with tokens taken since their last report, and the task reporting them.
        self._unreported: set[str] = set()
        self._reporter: asyncio.Task[None] | None = None
        self._report_now = asyncio.Event()
        if redis_url and self._policies:
            self._redis = redis.Redis.from_url(
                redis_url, max_connections=max_connections, socket_timeout=0.25, socket_connect_timeout=0.25
            )
            self._script = self._redis.register_script(_SCRIPT)

    async def take(self, bucket: str, kind: str) -> Decision | None:
        """Takes one token from `bucket` under the `kind` policy; None when unlimited."""
        policy = self._policies.get(kind)
        if policy is None:
            return None
        name = f"{kind}:{bucket}"
        state = self._buckets.get(name)
        if state is None:
            state = self._buckets[name] = _Bucket(policy, self._clock())
            if len(self._buckets) > MEMORY_BUCKETS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(name)
        # Each waiter looks again once the report is in: a crowd woken together takes no more than the quota.
        while self._shared() and (not state.synced or state.taken >= policy.quota):
            await self._report_of(name, state)
        now = self._clock()
        tokens = min(policy.requests, state.tokens + (now - state.at) * policy.rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
            if self._shared():
                state.taken += 1
                self._unreported.add(name)
                if state.taken * 2 >= policy.quota:
                    self._report_now.set()
                if self._reporter is None:
                    self._reporter = spawn(self._report_every_interval(), name="rate-limit-reports")
        state.tokens, state.at = tokens, now
        return Decision(
            allowed=allowed,
            limit=policy.requests,
            remaining=max(0, math.floor(tokens)),
            reset_after=(policy.requests - tokens) / policy.rate,
            retry_after=0.0 if allowed else (1 - tokens) / policy.rate,
        )

    def _shared(self) -> bool:
        return self._script is not None and self._clock() >= self._redis_down_until

    async def _report_of(self, name: str, state: _Bucket) -> None:
        if state.report is not None:
            await asyncio.shield(state.report)
        else:
            await self._report((name,))

    async def _report_every_interval(self) -> None:
        try:
            while self._unreported:
                await wait_set(self._report_now, SYNC_INTERVAL)
                self._report_now.clear()
                names, self._unreported = self._unreported, set()
                await self._report(names)
        finally:
            self._reporter = None

    async def _report(self, names: Iterable[str]) -> None:
        """One pipelined round trip: each bucket's unreported tokens go to Redis, and
        what Redis has left becomes this process's view."""
        batch: list[tuple[str, _Bucket, int]] = []
        for name in names:
            state = self._buckets.get(name)
            if state is None:
                continue
            if state.report is not None:
                self._unreported.add(name)  # the next round counts what this one cannot
            else:
                batch.append((name, state, state.taken))
        if not batch or self._redis is None or self._script is None:
            return
        done = asyncio.get_running_loop().create_future()
        for _, state, _ in batch:
            state.report = done
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for name, state, sending in batch:
                    policy = state.policy
                    await self._script(
                        keys=[f"{self._prefix}{name}"],
                        args=[policy.requests, policy.rate, int(policy.window * 2000), sending],
                        client=pipe,
                    )
                left = await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("rate limits fall back to memory for %.0fs: Redis failed (%s)", RETRY_AFTER, exc)
            self._redis_down_until = self._clock() + RETRY_AFTER
            for _, state, _ in batch:
                state.taken = 0  # counted in this process's memory from now on
        else:
            now = self._clock()
            for (name, state, sending), tokens in zip(batch, left, strict=True):
                # Tokens taken while the report was on its way are not in Redis's answer yet.
                state.taken -= sending
                state.tokens, state.at, state.synced = float(tokens) - state.taken, now, True
                if state.taken:
                    self._unreported.add(name)
        finally:
            for _, state, _ in batch:
                state.report = None
            done.set_result(None)

    async def close(self) -> None:
        if self._reporter is not None:
            await cancel_and_wait(self._reporter)
        if self._redis is not None:
            await self._redis.aclose()
