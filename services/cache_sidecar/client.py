"""The client every service uses to read through, and invalidate, the cache sidecar.

The cache is an optimisation, never a dependency: any sidecar failure (unreachable,
slow, erroring) degrades to calling the loader, i.e. reading the source of truth.
Nothing the sidecar does reaches the caller as an exception, and grpc reconnects by
itself once the sidecar is back.

Layers, fastest first: the near-cache (in-process, only while a Watch stream feeds
it, see near_cache.py), the sidecar, the loader. Concurrent misses on one key share
one load (single-flight). Fills carry the fill token of the Get that missed, so a
value loaded before a write never lands after that write's invalidation.

Invalidation when the sidecar cannot be reached
-----------------------------------------------
A failed Invalidate or Delete is not dropped: the pattern goes on a bounded pending
list that a background task retries with backoff until the sidecar accepts it (if the
list overflows it collapses to "*", a full clear, which is always safe). Until then
this process bypasses the cache for keys matching a pending pattern: it neither
reads nor fills them. Other processes may still read the stale entry from the
sidecar until the retry lands or the entry's TTL runs out; if the sidecar was
actually down it lost its memory store, and there is nothing stale to serve. Pending
patterns still unsent when close() is called are lost and logged; TTLs bound how
long they can matter.

Values are protobuf bytes or a declared codec's (never pickle), tagged with their
content type, so a reader only decodes what it asked for: a mismatch is a miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from devops_hub.v1 import cache_pb2, cache_pb2_grpc
from services.cache_sidecar.codecs import Codec, CodecError, protobuf_codec, protobuf_content_type
from services.cache_sidecar.keys import escape_key, parse_pattern
from services.cache_sidecar.near_cache import NearCache
from services.common.auth.wiring import key_interceptors
from services.common.channels import open_channel
from services.common.grpc_host import MAX_MESSAGE_BYTES
from services.common.settings import Settings

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
T = TypeVar("T")

# Codes after which the sidecar is presumed unreachable: skip it for a while rather
# than add a timeout to every request.
_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# An invalidation refused for these reasons will never succeed; retrying is pointless.
_NOT_RETRYABLE = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED})
MAX_RETRY_DELAY = 5.0
# The sidecar's bound on patterns per Invalidate call.
MAX_PATTERNS_PER_CALL = 1000
# The sidecar heartbeats idle Watch streams every 5 s; three missed means dead.
DEFAULT_WATCH_LIVENESS = 15.0
WATCH_RETRY_INITIAL = 0.05
WATCH_RETRY_MAX = 2.0

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # The sidecar is local: reconnect quickly after it restarts, since every request
    # goes to the database while it is away.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

__all__ = ["CacheClient", "protobuf_content_type"]


class CacheClient:
    """A read-through client for CacheService with single-flight loads and an optional
    near-cache.

    One instance per process and sidecar address; it owns its channel. Every unary
    RPC carries `timeout` as its deadline; the Watch stream is checked by heartbeats.
    """

    def __init__(
        self,
        address: str,
        timeout: float,
        *,
        retry_after: float = 1.0,
        log_interval: float = 30.0,
        max_pending_invalidations: int = 256,
        near_cache: NearCache | None = None,
        watch_prefixes: Sequence[str] = (),
        watch_liveness: float = DEFAULT_WATCH_LIVENESS,
        clock: Callable[[], float] = time.monotonic,
        api_key: str = "",
    ) -> None:
        self._address = address
        # Every call carries this key: the sidecar serves the services' admin key only.
        self._interceptors = key_interceptors(api_key)
        self._timeout = timeout
        self._retry_after = retry_after
        self._log_interval = log_interval
        self._max_pending = max_pending_invalidations
        self._clock = clock
        self.near = near_cache
        self._watch_prefixes = list(watch_prefixes)
        self._watch_liveness = watch_liveness

        self._channel: grpc.aio.Channel | None = None
        self._stub: cache_pb2_grpc.CacheServiceStub | None = None
        self._closed = False
        # Loads in progress, by (key, content type, optional): concurrent misses share one.
        self._inflight: dict[tuple[str, str, bool], asyncio.Task[Any]] = {}
        # While the sidecar looks unreachable, reads skip it until this instant.
        self._skip_until = -math.inf
        self._last_logged = -math.inf
        self._suppressed = 0
        self._pending: set[str] = set()
        self._retry_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> "CacheClient":
        """A client for settings.cache_addr; with a near-cache unless CACHE_NEAR_SIZE=0.

        Reads cache_near_size (default 1024 entries) and cache_near_ttl (default 10 s)
        from settings when it has them.
        """
        near_size = getattr(settings, "cache_near_size", 1024)
        if near_size > 0 and "near_cache" not in options:
            options["near_cache"] = NearCache(max_entries=near_size, max_ttl=getattr(settings, "cache_near_ttl", 10.0))
        options.setdefault("api_key", settings.service_api_key)
        return cls(settings.cache_addr, timeout=settings.cache_timeout, **options)

    @property
    def pending_invalidations(self) -> frozenset[str]:
        """Patterns that failed to reach the sidecar and are being retried."""
        return frozenset(self._pending)

    async def connect(self) -> None:
        """Opens the channel now instead of on first use (it never fails: grpc
        connects in the background and reconnects by itself), and starts feeding the
        near-cache."""
        self._ensure_stub()

    async def close(self) -> None:
        self._closed = True
        for name in ("_retry_task", "_watch_task"):
            task = getattr(self, name)
            setattr(self, name, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.near is not None:
            self.near.set_live(False)
        if self._pending:
            log.warning(
                "cache client closing with %d invalidations not applied: %s",
                len(self._pending),
                sorted(self._pending),
            )
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    async def __aenter__(self) -> "CacheClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- reads -----------------------------------------------------------------------

    async def get_or_load(
        self,
        key: str,
        ttl: float,
        message_type: type[M],
        loader: Callable[[], Awaitable[M]],
    ) -> M:
        """The cached value of key, or loader()'s result (then cached for ttl seconds;
        0 = the sidecar's default).

        Concurrent calls for one key share a single load; cancelling one caller does
        not cancel it for the others. Exceptions from loader reach every waiter;
        sidecar failures never do.
        """
        return await self.load(key, ttl, protobuf_codec(message_type), loader)

    async def get_or_load_optional(
        self,
        key: str,
        ttl: float,
        message_type: type[M],
        loader: Callable[[], Awaitable[M | None]],
    ) -> M | None:
        """Like get_or_load, for a loader that returns None for "not found": None is
        cached too, as a negative entry, for at most the sidecar's negative TTL."""
        return await self.load(key, ttl, protobuf_codec(message_type), loader, cache_none=True)

    async def load(
        self,
        key: str,
        ttl: float,
        codec: Codec[T],
        loader: Callable[[], Awaitable[T]],
        *,
        cache_none: bool = False,
    ) -> T:
        """get_or_load for any codec. With cache_none, a None from loader is cached
        as a negative entry and returned as None on later reads."""
        if not math.isfinite(ttl) or ttl < 0:
            raise ValueError(f"ttl must be a finite number of seconds >= 0, got {ttl!r}")
        near = self.near
        if near is not None and near.live and not self._pending:
            entry = near.get(key)
            if entry is not None and entry.content_type == codec.content_type:
                if entry.negative:
                    if cache_none:
                        return None  # type: ignore[return-value]
                else:
                    with contextlib.suppress(CodecError):
                        return codec.decode(entry.value)
        flight = (key, codec.content_type, cache_none)
        task = self._inflight.get(flight)
        if task is None:
            task = asyncio.create_task(self._load_through(key, ttl, codec, loader, cache_none))
            self._inflight[flight] = task
            task.add_done_callback(functools.partial(self._landed, flight))
        # shield: a caller's cancellation stops its wait, not the shared load.
        return await asyncio.shield(task)

    async def get(self, key: str, codec: Codec[T]) -> tuple[bool, T | None]:
        """(True, value) for a cached value of this codec, (True, None) for a negative
        entry, (False, None) for a miss or when the sidecar cannot be reached."""
        near = self.near
        if near is not None and near.live and not self._bypassed(key):
            entry = near.get(key)
            if entry is not None and entry.content_type == codec.content_type:
                if entry.negative:
                    return True, None
                with contextlib.suppress(CodecError):
                    return True, codec.decode(entry.value)
        if self._bypassed(key):
            return False, None
        since = near.snapshot() if near is not None else 0
        response, _ = await self._call("Get", cache_pb2.CacheGetRequest(key=key))
        if response is None or not response.found:
            return False, None
        return self._decode_hit(key, 0.0, codec, response.entry, since)

    def _landed(self, flight: tuple[str, str, bool], task: asyncio.Task[Any]) -> None:
        if self._inflight.get(flight) is task:
            del self._inflight[flight]
        # Mark the exception retrieved: if every waiter was cancelled, nobody else will.
        if not task.cancelled():
            task.exception()

    async def _load_through(
        self, key: str, ttl: float, codec: Codec[T], loader: Callable[[], Awaitable[T]], cache_none: bool
    ) -> T:
        if self._bypassed(key):
            return await loader()
        near = self.near
        # Taken before the sidecar read: a fill is refused if the key was invalidated
        # after this point (see near_cache.py).
        since = near.snapshot() if near is not None else 0
        response, _ = await self._call("Get", cache_pb2.CacheGetRequest(key=key))
        if response is not None and response.found:
            found, value = self._decode_hit(key, ttl, codec, response.entry, since)
            if found and (value is not None or cache_none):
                return value  # type: ignore[return-value]
        value = await loader()
        # No fill without a token (the Get failed, or came from a store that cannot
        # vouch for one), and none for a key whose invalidation is still pending:
        # either could plant stale data.
        if response is None or not response.fill_token or self._bypassed(key):
            return value
        if value is None and not cache_none:
            return value
        entry = cache_pb2.CacheEntry(key=key, content_type=codec.content_type, negative=value is None)
        if value is not None:
            entry.value = codec.encode(value)
        stored, _ = await self._call(
            "Set", cache_pb2.CacheSetRequest(entry=entry, ttl_seconds=ttl, fill_token=response.fill_token)
        )
        # Only what the sidecar accepted as current goes near: a refused fill raced a write.
        if stored is not None and stored.stored and near is not None:
            near.put(key, entry.content_type, entry.value, entry.negative, ttl, since)
        return value

    def _decode_hit(
        self, key: str, ttl: float, codec: Codec[T], entry: cache_pb2.CacheEntry, since: int
    ) -> tuple[bool, T | None]:
        """(True, value) for a usable hit (value None for a negative entry), (False,
        None) for one of another type or undecodable (treated as a miss)."""
        if entry.content_type != codec.content_type:
            return False, None
        value = None
        if not entry.negative:
            try:
                value = codec.decode(entry.value)
            except CodecError as exc:
                self._note_failure("decode", f"{key}: {exc}")
                return False, None
        if self.near is not None:
            self.near.put(key, entry.content_type, entry.value, entry.negative, ttl, since)
        return True, value

    def _bypassed(self, key: str) -> bool:
        return bool(self._pending) and any(parse_pattern(pattern).matches(key) for pattern in self._pending)

    # --- writes ----------------------------------------------------------------------

    async def set(self, key: str, value: T, codec: Codec[T], ttl: float = 0.0) -> bool:
        """Stores a value unconditionally (the sidecar tells every near-cache to drop
        its copy). False when the sidecar could not store it; never raises for that.
        The value it replaces is then invalidated instead (retried like invalidate),
        since the caller meant it to be gone."""
        if not math.isfinite(ttl) or ttl < 0:
            raise ValueError(f"ttl must be a finite number of seconds >= 0, got {ttl!r}")
        self._invalidate_near(escape_key(key))
        entry = cache_pb2.CacheEntry(key=key, content_type=codec.content_type, negative=value is None)
        if value is not None:
            entry.value = codec.encode(value)
        response, _ = await self._call("Set", cache_pb2.CacheSetRequest(entry=entry, ttl_seconds=ttl), respect_backoff=False)
        self._invalidate_near(escape_key(key))
        if response is None:
            self._queue_retry([escape_key(key)])
            return False
        return response.stored

    async def invalidate(self, *patterns: str) -> bool:
        """Removes every key matching any of the glob patterns ("*" clears everything).

        True when the sidecar applied them all; False when some are queued for retry
        (see the module docstring). Never raises for sidecar failures.
        """
        if any(not pattern for pattern in patterns):
            raise ValueError("invalidation patterns must not be empty")
        if not patterns:
            return True
        # Before: this process stops serving the old values at once. After (below):
        # kills any near fill that raced the sidecar's invalidation.
        for pattern in patterns:
            self._invalidate_near(pattern)
        if self._pending and self._clock() < self._skip_until:
            # The sidecar just proved unreachable: the retry task will send these with
            # the rest rather than make this write wait for a timeout.
            self._queue_retry(patterns)
            return False
        # One call per batch: everything a write made stale travels together.
        batches = [list(patterns[start : start + MAX_PATTERNS_PER_CALL])
                   for start in range(0, len(patterns), MAX_PATTERNS_PER_CALL)]
        results = await asyncio.gather(*(self._send_invalidations(batch) for batch in batches))
        for pattern in patterns:
            self._invalidate_near(pattern)
        failed = [pattern for batch, ok in zip(batches, results) if not ok for pattern in batch]
        if failed:
            self._queue_retry(failed)
        return not failed

    async def delete(self, key: str) -> bool:
        """Removes one key; True when the sidecar applied it, False when queued for retry."""
        if not key:
            raise ValueError("key must not be empty")
        pattern = escape_key(key)
        self._invalidate_near(pattern)
        if self._pending and self._clock() < self._skip_until:
            self._queue_retry([pattern])
            return False
        _, code = await self._call("Delete", cache_pb2.CacheDeleteRequest(key=key), respect_backoff=False)
        self._invalidate_near(pattern)
        if code is None or code in _NOT_RETRYABLE:
            return code is None
        self._queue_retry([pattern])
        return False

    async def clear(self) -> bool:
        """Empties the whole cache (every service's); queued for retry like invalidate."""
        return await self.invalidate("*")

    async def stats(self) -> cache_pb2.CacheStats | None:
        """The sidecar's statistics, or None when it cannot be reached."""
        response, _ = await self._call("Stats", empty_pb2.Empty(), respect_backoff=False)
        return response

    def _invalidate_near(self, pattern: str) -> None:
        if self.near is not None:
            self.near.invalidate(pattern)

    async def _send_invalidations(self, patterns: list[str]) -> bool:
        """True when done with the patterns: applied, or refused for good (logged)."""
        request = cache_pb2.CacheInvalidateRequest(patterns=patterns)
        _, code = await self._call("Invalidate", request, respect_backoff=False)
        return code is None or code in _NOT_RETRYABLE

    def _queue_retry(self, patterns: list[str] | tuple[str, ...]) -> None:
        self._pending.update(patterns)
        if len(self._pending) > self._max_pending:
            log.warning(
                "cache client: %d invalidations pending; will clear the whole cache instead",
                len(self._pending),
            )
            self._pending = {"*"}
        if not self._closed and (self._retry_task is None or self._retry_task.done()):
            self._retry_task = asyncio.create_task(self._retry_pending())

    async def _retry_pending(self) -> None:
        delay = max(self._retry_after, 0.05)
        while self._pending and not self._closed:
            await asyncio.sleep(delay)
            pending = sorted(self._pending)
            for start in range(0, len(pending), MAX_PATTERNS_PER_CALL):
                batch = pending[start : start + MAX_PATTERNS_PER_CALL]
                if not await self._send_invalidations(batch):
                    break
                self._pending.difference_update(batch)
            delay = min(delay * 2, MAX_RETRY_DELAY)
        if not self._pending:
            log.info("cache client: pending invalidations applied")

    # --- the near-cache feed ---------------------------------------------------------

    async def _watch(self) -> None:
        """Keeps a Watch stream open for as long as the client lives; the near-cache
        is live exactly while the stream is."""
        near = self.near
        assert near is not None, "only started with a near-cache"
        delay = WATCH_RETRY_INITIAL
        while not self._closed:
            call = self._ensure_stub().Watch(cache_pb2.CacheWatchRequest(prefixes=self._watch_prefixes))
            try:
                while True:
                    message = await asyncio.wait_for(call.read(), self._watch_liveness)
                    if message is grpc.aio.EOF:
                        break
                    if not near.live:
                        near.set_live(True)  # the stream opens with a heartbeat
                        delay = WATCH_RETRY_INITIAL
                    if message.pattern:
                        near.invalidate(message.pattern)
                    for pattern in message.patterns:
                        near.invalidate(pattern)
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                detail = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "no heartbeat"
                log.debug("cache watch stream ended (%s); near-cache cleared", detail)
            finally:
                near.set_live(False)
                call.cancel()
            await asyncio.sleep(delay)
            delay = min(delay * 2, WATCH_RETRY_MAX)

    # --- transport -------------------------------------------------------------------

    def _ensure_stub(self) -> cache_pb2_grpc.CacheServiceStub:
        if self._stub is None:
            self._channel = open_channel(self._address, options=_CHANNEL_OPTIONS, interceptors=self._interceptors)
            self._stub = cache_pb2_grpc.CacheServiceStub(self._channel)
        if self.near is not None and self._watch_task is None and not self._closed:
            self._watch_task = asyncio.create_task(self._watch())
        return self._stub

    async def _call(self, method: str, request: Message, *, respect_backoff: bool = True) -> tuple[Any, grpc.StatusCode | None]:
        """(response, None) on success, (None, code) on any failure, logged at most
        once per log_interval. Reads skip the sidecar for retry_after seconds once it
        looks unreachable; invalidations and stats always try."""
        if self._closed:
            return None, grpc.StatusCode.CANCELLED
        if respect_backoff and self._clock() < self._skip_until:
            return None, grpc.StatusCode.UNAVAILABLE
        try:
            response = await getattr(self._ensure_stub(), method)(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in _UNREACHABLE:
                self._skip_until = self._clock() + self._retry_after
            self._note_failure(method, f"{code.name}: {exc.details()}")
            return None, code
        except Exception as exc:  # noqa: BLE001 - the cache must never fail a request
            self._skip_until = self._clock() + self._retry_after
            self._note_failure(method, repr(exc))
            return None, grpc.StatusCode.UNKNOWN
        return response, None

    def _note_failure(self, what: str, detail: str) -> None:
        now = self._clock()
        if now - self._last_logged < self._log_interval:
            self._suppressed += 1
            return
        suppressed = f" ({self._suppressed} more failures since the last report)" if self._suppressed else ""
        log.warning(
            "cache sidecar %s: %s failed (%s); serving from the source of truth%s",
            self._address,
            what,
            detail,
            suppressed,
        )
        self._last_logged = now
        self._suppressed = 0
