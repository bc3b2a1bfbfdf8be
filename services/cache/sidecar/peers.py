"""Invalidations made through other sidecars, brought to this one's Watch streams.

Several sidecars share one Redis; a Sync reaches it through one of them, but each
client's near-cache hangs off its own sidecar's stream. The Redis store PUBLISHes what
it applied with its log span; this listener SUBSCRIBEs and feeds the hub. A message
lost on the way shows as a gap in the positions its followers see. While the
subscription is down (or stops answering pings) the hub is suspended: whatever was
published meanwhile is lost to us, so every stream ends and its clients clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import redis.asyncio as aioredis

from services.cache.sidecar.hub import InvalidationHub
from services.cache.sidecar.stores.fallback import BACKEND_ERRORS, PROBE_INITIAL, PROBE_MAX
from services.common.foundation.background import cancel_and_wait, end_if_cancelled

log = logging.getLogger(__name__)

PING_INTERVAL = 1.0
# Silence for this many ping intervals means the connection is dead, even if TCP
# has not said so (a partition sends no reset).
SILENCE_LIMIT = 3


class Peers:
    def __init__(self, client: aioredis.Redis, channel: str, origin: str, hub: InvalidationHub) -> None:
        self._client = client  # owned: closed with the listener
        self._channel = channel
        self._origin = origin
        self._hub = hub
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
        delay = PROBE_INITIAL
        while True:
            try:
                await self._listen()
            except BACKEND_ERRORS as exc:
                if self.subscribed.is_set():
                    log.warning("cache peers lost its Redis subscription (%s); Watch streams end until it is back", exc)
                    delay = PROBE_INITIAL
            except Exception:  # noqa: BLE001 - the listener must outlive any one failure
                log.exception("cache peers failed unexpectedly; starting it again")
            self.subscribed.clear()
            self._hub.suspend()
            end_if_cancelled()
            await asyncio.sleep(delay)
            delay = min(delay * 2, PROBE_MAX)

    async def _listen(self) -> None:
        pubsub = self._client.pubsub()
        try:
            await pubsub.subscribe(self._channel)
            loop = asyncio.get_running_loop()
            heard = loop.time()
            pinged = heard
            while True:
                end_if_cancelled()
                message = await pubsub.get_message(timeout=PING_INTERVAL)
                now = loop.time()
                if message is not None:
                    heard = now
                    self._handle(message)
                if now - heard > SILENCE_LIMIT * PING_INTERVAL:
                    raise ConnectionError(f"no answer from Redis for {now - heard:.1f}s")
                if now - pinged >= PING_INTERVAL:
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

