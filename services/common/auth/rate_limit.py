"""Token buckets per caller: atomic in Redis (one script call), in memory otherwise.

A bucket holds up to `requests` tokens and refills at requests/window per second, so
a caller may burst to the limit and then goes at the window's pace. In Redis the read,
refill, take and write are one Lua script run with Redis's own clock, so replicas
share one bucket per caller without races or clock skew. When Redis fails, buckets
fall back to this process's memory (limits then hold per replica) and Redis is tried
again after RETRY_AFTER seconds.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import redis.asyncio as redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

RETRY_AFTER = 5.0
MEMORY_BUCKETS = 100_000

# KEYS[1] the bucket; ARGV: capacity, refill per second, expiry in ms.
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
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {allowed, tostring(tokens)}
"""


@dataclass(frozen=True)
class Policy:
    requests: int
    window: float

    @property
    def rate(self) -> float:
        return self.requests / self.window


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    # Seconds until the bucket is full again, and until one token is back.
    reset_after: float
    retry_after: float


def _decide(policy: Policy, allowed: bool, tokens: float) -> Decision:
    return Decision(
        allowed=allowed,
        limit=policy.requests,
        remaining=max(0, math.floor(tokens)),
        reset_after=(policy.requests - tokens) / policy.rate,
        retry_after=0.0 if allowed else (1 - tokens) / policy.rate,
    )


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
        self._memory: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._redis = None
        self._script = None
        self._redis_down_until = 0.0
        if redis_url:
            self._redis = redis.Redis.from_url(
                redis_url, max_connections=max_connections, socket_timeout=0.25, socket_connect_timeout=0.25
            )
            self._script = self._redis.register_script(_SCRIPT)

    async def take(self, bucket: str, kind: str) -> Decision | None:
        """Takes one token from `bucket` under the `kind` policy; None when unlimited."""
        policy = self._policies.get(kind)
        if policy is None:
            return None
        if self._script is not None and self._clock() >= self._redis_down_until:
            try:
                allowed, tokens = await self._script(
                    keys=[f"{self._prefix}{kind}:{bucket}"],
                    args=[policy.requests, policy.rate, int(policy.window * 2000)],
                )
                return _decide(policy, bool(int(allowed)), float(tokens))
            except (RedisError, OSError) as exc:
                log.warning("rate limits fall back to memory for %.0fs: Redis failed (%s)", RETRY_AFTER, exc)
                self._redis_down_until = self._clock() + RETRY_AFTER
        return self._take_in_memory(f"{kind}:{bucket}", policy)

    def _take_in_memory(self, bucket: str, policy: Policy) -> Decision:
        now = self._clock()
        tokens, last = self._memory.pop(bucket, (float(policy.requests), now))
        tokens = min(policy.requests, tokens + (now - last) * policy.rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        self._memory[bucket] = (tokens, now)
        if len(self._memory) > MEMORY_BUCKETS:
            self._memory.popitem(last=False)
        return _decide(policy, allowed, tokens)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
