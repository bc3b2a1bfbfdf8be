"""The decorator API of the performance guide:

    @cached(ttl=300, key_prefix="agents:get")
    async def get_agent(agent_id: str) -> Agent | None: ...

    @invalidate_cache(key_pattern=["agents:get:{agent_id}", "agents:list:*"])
    async def update_agent(agent_id: str, changes: Agent) -> Agent: ...

Keys come from the arguments (key_builder.py): get_agent("a1") is "agents:get:a1",
which is exactly what "agents:get:{agent_id}" names for update_agent("a1", …).
Values are encoded by the codec the return annotation implies (a protobuf message
type, str, bytes, JSON types) or the one given as codec=; None is cached as a
negative entry (for the sidecar's shorter negative TTL).

The manager is looked up at call time with get_cache_manager() (unless one is
passed), so tests and services choose it without re-decorating anything.
"""

from __future__ import annotations

import functools
import inspect
import string
import typing
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ParamSpec, TypeVar

from services.common.cache.codecs import Codec, codec_for
from services.common.cache.key_builder import KeyBuilder
from services.common.cache.manager import CacheManager, get_cache_manager

P = ParamSpec("P")
R = TypeVar("R")


def cached(
    ttl: float | None = None,
    key_prefix: str | None = None,
    *,
    codec: Codec[Any] | None = None,
    cache_none: bool = True,
    manager: CacheManager | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Caches an async function's results by its arguments.

    ttl: seconds (None: the manager's default). key_prefix: the keys' start, which
    should begin with a namespace ("agents:get"); by default the function's module
    and qualified name. The wrapper gains .cache_key(*args, **kwargs).
    """

    def decorate(function: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        if not inspect.iscoroutinefunction(function):
            raise TypeError(f"@cached needs an async function, got {function!r}")
        chosen = codec or codec_for(_return_annotation(function))
        if chosen is None:
            raise TypeError(
                f"@cached cannot tell how to encode what {function.__qualname__} returns: "
                "annotate it with a protobuf message type, str, bytes or a JSON type, or pass codec="
            )
        keys = KeyBuilder(key_prefix or f"{function.__module__}.{function.__qualname__}", inspect.signature(function))

        @functools.wraps(function)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            key = keys.key(args, kwargs)
            return await (manager or get_cache_manager()).get_or_load(
                key, lambda: function(*args, **kwargs), ttl=ttl, codec=chosen, cache_none=cache_none
            )

        wrapper.cache_key = lambda *args, **kwargs: keys.key(args, kwargs)  # type: ignore[attr-defined]
        return wrapper

    return decorate


def invalidate_cache(
    key_pattern: str | Sequence[str],
    *,
    manager: CacheManager | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Invalidates glob patterns once the decorated async function has run.

    A pattern may name the function's arguments, "agents:get:{agent_id}": each is
    encoded as in a @cached key, with glob characters escaped. The invalidation also
    runs when the function raises, since a write that failed half-way may still have
    changed something; it never raises itself (see CacheClient.invalidate).
    """
    templates = [key_pattern] if isinstance(key_pattern, str) else list(key_pattern)
    if not templates or any(not template for template in templates):
        raise ValueError("key_pattern must be one or more non-empty patterns")

    def decorate(function: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        if not inspect.iscoroutinefunction(function):
            raise TypeError(f"@invalidate_cache needs an async function, got {function!r}")
        keys = KeyBuilder("invalidate", inspect.signature(function))
        names = set(keys.signature.parameters)
        for template in templates:
            unknown = {field for _, field, _, _ in _fields(template) if field} - names
            if unknown:
                raise ValueError(f"key_pattern {template!r} names {sorted(unknown)}, not parameters of {function.__qualname__}")

        @functools.wraps(function)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            patterns = [keys.pattern(template, args, kwargs) for template in templates]
            try:
                return await function(*args, **kwargs)
            finally:
                await (manager or get_cache_manager()).invalidate(*patterns)

        return wrapper

    return decorate


def _fields(template: str) -> list[tuple[str, str | None, str | None, str | None]]:
    return list(string.Formatter().parse(template))


def _return_annotation(function: Callable[..., Any]) -> Any:
    try:
        return typing.get_type_hints(function).get("return")
    except (NameError, TypeError):
        # A forward reference that cannot be resolved here: no implied codec.
        return None
