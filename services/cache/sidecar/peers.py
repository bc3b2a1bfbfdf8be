"""Invalidations made through other sidecars, brought to this one's Watch streams.

Several sidecars share one Redis (one per pod, or several worker processes). A Sync
reaches Redis through one of them, but every client's near-cache hangs off its own
sidecar's Watch stream, so each sidecar must hear the others: the Redis store
PUBLISHes what it applied with its log span, and this listener SUBSCRIBEs and feeds
the hub. A message lost on the way shows as a gap in the log positions its
followers see, so they clear themselves.

The hub accepts watchers only while the subscription is live. When it drops (or
stops answering pings) the hub is suspended, which ends every stream so the clients
clear their near-caches: whatever was published meanwhile is lost to us.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import redis.asyncio as aioredis

from services.cache.sidecar.hub import InvalidationHub
from services.cache.sidecar.stores.fallback import BACKEND_ERRORS
from services.common.background import cancel_and_wait

log = logging.getLogger(__name__)

PING_INTERVAL = 1.0
# Silence for this many ping intervals means the connection is dead, even if TCP
# has not said so (a partition sends no reset).
SILENCE_LIMIT = 3
RETRY_INITIAL = 0.1
RETRY_MAX = 0.5


class Peers:
    def __init__(
        self,
        client: aioredis.Redis,  # owned: closed with the listener
        channel: str,
        origin: str,
        hub: InvalidationHub,
        *,
        ping_interval: float = PING_INTERVAL,
    ) -> None:
        self._client = client
        self._channel = channel
        self._origin = origin
        self._hub = hub
        self._ping_interval = ping_interval
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    def start(self) -> None:
        if self._task is None:
            self._hub.suspend()
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        await self._client.aclose()
        await self._client.connection_pool.disconnect()

    async def _run(self) -> None:
        delay = RETRY_INITIAL
        while True:
            try:
                await self._listen()
            except BACKEND_ERRORS as exc:
                if self.subscribed.is_set():
                    log.warning("cache peers lost its Redis subscription (%s); Watch streams end until it is back", exc)
                    delay = RETRY_INITIAL
            except Exception:  # noqa: BLE001 - the listener must outlive any one failure
                log.exception("cache peers failed unexpectedly; starting it again")
            self.subscribed.clear()
            self._hub.suspend()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _listen(self) -> None:
        pubsub = self._client.pubsub()
        try:
            await pubsub.subscribe(self._channel)
            loop = asyncio.get_running_loop()
            heard = loop.time()
            pinged = heard
            while True:
                message = await pubsub.get_message(timeout=self._ping_interval)
                now = loop.time()
                if message is not None:
                    heard = now
                    self._handle(message)
                if now - heard > SILENCE_LIMIT * self._ping_interval:
                    raise ConnectionError(f"no answer from Redis for {now - heard:.1f}s")
                if now - pinged >= self._ping_interval:
                    await pubsub.ping()
                    pinged = now
        finally:
            with contextlib.suppress(*BACKEND_ERRORS):
                await pubsub.aclose()

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "subscribe":
            self._hub.resume()
            self.subscribed.set()
            log.info("cache peers subscribed to %s", self._channel)
        elif kind == "message":
            try:
                origin, after, through, patterns = json.loads(message["data"])
            except (ValueError, TypeError):
                log.warning("cache peers: ignoring a malformed message on %s", self._channel)
                return
            if origin != self._origin:
                self._hub.publish(int(after), int(through), [str(pattern) for pattern in patterns])

