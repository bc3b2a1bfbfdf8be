"""The one face of the cache: the performance guide's @cached and @invalidate_cache
(docs/cache.md, "Using it from a service"), and stale(), every() and encoded() over the
same declaration.

The manager is chosen at call time (manager=, else a method's object's `cache`, else
get_cache_manager()), so tests and processes choose it without re-decorating anything.
"""

from __future__ import annotations

import functools
import inspect
import string
import typing
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ParamSpec, TypeVar, cast

from google.protobuf.descriptor import MethodDescriptor

from services.cache.client.codecs import JSON, Codec, codec_for
from services.cache.client.freshness import max_age
from services.cache.client.key_builder import KeyBuilder
from services.cache.client.keys import escape_key
from services.cache.client.manager import CacheManager, get_cache_manager

__all__ = ["CacheManager", "cached", "encoded", "every", "invalidate_cache", "stale"]

P = ParamSpec("P")
R = TypeVar("R")


def cached(
    ttl: float | None = None,
    key_prefix: str | None = None,
    *,
    codec: Codec[Any] | None = None,
    cache_none: bool = True,
    manager: CacheManager | None = None,
    method: MethodDescriptor | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Caches an async function's results by its arguments, for ttl seconds (None: the
    manager's default, or with `method` the RPC's `cache_max_age` in the protos, so a
    service declares a read's lifetime once)."""
    if method is not None and ttl is None:
        ttl = float(max_age(method))

    def decorate(function: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        if not inspect.iscoroutinefunction(function):
            raise TypeError(f"@cached needs an async function, got {function!r}")
        chosen = codec or _codec_of(function)
        keys = KeyBuilder(key_prefix or _default_key_prefix(function), inspect.signature(function))

        def load(args: tuple[Any, ...], kwargs: dict[str, Any], encoded: bool) -> Awaitable[Any]:
            cache = _manager(manager, args)
            read = cache.client.load_encoded if encoded else cache.client.load
            seconds = cache.default_ttl if ttl is None else ttl
            return read(keys.key(args, kwargs), seconds, chosen, lambda: function(*args, **kwargs), cache_none=cache_none)

        @functools.wraps(function)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            return cast(R, await load(args, kwargs, False))

        wrapper.__cache_encoded__ = lambda *args, **kwargs: load(args, kwargs, True)  # type: ignore[attr-defined]
        wrapper.__cache_keys__ = keys  # type: ignore[attr-defined]
        return wrapper

    return decorate


def encoded(read: Callable[..., Any], *args: Any, **kwargs: Any) -> Awaitable[bytes | None]:
    """What a @cached `read` (a method's bound to its object) answers for these
    arguments, as its codec's bytes (CacheClient.load_encoded); None for a None. Not a
    coroutine of its own: a hot read awaits one layer fewer."""
    load: Callable[..., Awaitable[bytes | None]] = getattr(read, "__cache_encoded__")  # noqa: B009 - set by @cached
    if inspect.ismethod(read):
        args = (read.__self__, *args)
    return load(*args, **kwargs)


def stale(read: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """The pattern naming exactly the key a @cached `read` fills for these arguments
    (a method's without its `self`): what a write passes to write.made_stale()."""
    keys: KeyBuilder = getattr(read, "__cache_keys__")  # noqa: B009 - set by @cached
    return escape_key(keys.key(keys.unbound(args), kwargs))


def every(read: Callable[..., Any]) -> str:
    """The pattern naming every key a @cached `read` fills (an O(1) prefix invalidation)."""
    keys: KeyBuilder = getattr(read, "__cache_keys__")  # noqa: B009 - set by @cached
    return f"{keys.key_prefix}:*"


# Leading verbs that name a read, not the thing read: get_agents caches under
# "agents:<module>.<qualified name>", which invalidate_cache(key_pattern="agents") reaches.
_READ_VERBS = ("get_", "list_", "fetch_", "load_", "find_", "read_", "search_", "discover_", "lookup_")


def _default_key_prefix(function: Callable[..., Any]) -> str:
    name = function.__name__
    for verb in _READ_VERBS:
        if name.startswith(verb) and len(name) > len(verb):
            name = name[len(verb) :]
            break
    return f"{name}:{function.__module__}.{function.__qualname__}"


def _codec_of(function: Callable[..., Any]) -> Codec[Any]:
    if "return" not in getattr(function, "__annotations__", {}):
        return JSON  # unannotated: any JSON-serialisable value, as the guide uses it
    try:
        annotation = typing.get_type_hints(function).get("return")
    except (NameError, TypeError):
        annotation = None  # a forward reference that cannot be resolved here: no implied codec
    chosen = codec_for(annotation)
    if chosen is None:
        raise TypeError(
            f"@cached cannot tell how to encode {annotation!r}, what {function.__qualname__} returns: "
            "annotate it with a protobuf message type, str, bytes or a JSON type, or pass codec="
        )
    return chosen


def _manager(explicit: CacheManager | None, args: tuple[Any, ...]) -> CacheManager:
    if explicit is not None:
        return explicit
    owner = getattr(args[0], "cache", None) if args else None
    return owner if isinstance(owner, CacheManager) else get_cache_manager()


def invalidate_cache(
    key_pattern: str | Sequence[str],
    *,
    manager: CacheManager | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Invalidates glob patterns once the decorated async function has run, also when it
    raises: a write that failed half-way may still have changed something. A bare name
    ("agents") stands for "agents:*"; "{agent_id}" is that argument encoded as in a key."""
    templates = [key_pattern] if isinstance(key_pattern, str) else list(key_pattern)
    if not templates or any(not template for template in templates):
        raise ValueError("key_pattern must be one or more non-empty patterns")
    templates = [t if any(char in t for char in ":*?[{") else f"{t}:*" for t in templates]

    def decorate(function: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        if not inspect.iscoroutinefunction(function):
            raise TypeError(f"@invalidate_cache needs an async function, got {function!r}")
        keys = KeyBuilder("invalidate", inspect.signature(function))
        names = set(keys.signature.parameters)
        for template in templates:
            unknown = {field for _, field, _, _ in string.Formatter().parse(template) if field} - names
            if unknown:
                raise ValueError(f"key_pattern {template!r} names {sorted(unknown)}, not parameters of {function.__qualname__}")

        @functools.wraps(function)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            patterns = [keys.pattern(template, args, kwargs) for template in templates]
            try:
                return await function(*args, **kwargs)
            finally:
                await _manager(manager, args).client.invalidate(*patterns)

        return wrapper

    return decorate
