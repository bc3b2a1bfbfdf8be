"""The decorator API of the performance guide, as the guide writes it:

    @cached(ttl=300)
    async def get_agents(): ...                        # key "agents:<module>.get_agents:…"

    @cached(ttl=60, key_prefix="agent")
    async def get_agent(agent_id): ...                 # key "agent:<agent_id>"

    @invalidate_cache(key_pattern="agents")            # everything under "agents:"
    async def create_agent(agent_data): ...

and with the precision the services need:

    @cached(ttl=300, key_prefix="agents:get")
    async def get_agent(self, agent_id: str) -> Agent | None: ...

    @invalidate_cache(key_pattern=["agents:get:{agent_id}", "agents:list:*"])
    async def update_agent(self, agent_id: str, changes: Agent) -> Agent: ...

Keys come from the arguments (key_builder.py): get_agent("a1") is "agents:get:a1",
which is exactly what "agents:get:{agent_id}" names for update_agent("a1", …).
Without key_prefix, a key's namespace is the function's name less a leading read
verb (get_agents → "agents"), so a bare key_pattern such as "agents" (no ':', no
glob) invalidates it: a bare name means every key under "name:", an O(1) prefix
invalidation in both stores.

Values are encoded by the codec the return annotation implies (a protobuf message
type, str, bytes, JSON types), by codec=, or as JSON when there is no annotation;
None is cached as a negative entry (for the sidecar's shorter negative TTL).

Which manager: manager= if given; else, for a method, its object's `cache` when that
is a CacheManager (each service object brings its own); else get_cache_manager() at
call time, so tests and processes choose it without re-decorating anything.
"""

from __future__ import annotations

import functools
import inspect
import string
import typing
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ParamSpec, TypeVar

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
    """Caches an async function's results by its arguments.

    ttl: seconds (None: the manager's default, or with `method` the RPC's
    `cache_max_age` in the protos, so a service declares a read's lifetime once).
    key_prefix: the keys' start, which should begin with a namespace ("agents:get");
    by default see default_key_prefix(). Writes name what they make stale through the
    same declaration: stale(read, *args) and every(read). The wrapper gains
    .cache_key(*args, **kwargs).
    """
    if method is not None and ttl is None:
        ttl = float(max_age(method))

    def decorate(function: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        if not inspect.iscoroutinefunction(function):
            raise TypeError(f"@cached needs an async function, got {function!r}")
        chosen = codec or _codec_of(function)
        keys = KeyBuilder(key_prefix or default_key_prefix(function), inspect.signature(function))

        @functools.wraps(function)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            key = keys.key(args, kwargs)
            return await _manager(manager, args).get_or_load(
                key, lambda: function(*args, **kwargs), ttl=ttl, codec=chosen, cache_none=cache_none
            )

        async def load_encoded(*args: Any, **kwargs: Any) -> bytes | None:
            return await _manager(manager, args).get_or_load_encoded(
                keys.key(args, kwargs), lambda: function(*args, **kwargs), ttl=ttl, codec=chosen, cache_none=cache_none
            )

        wrapper.cache_key = lambda *args, **kwargs: keys.key(args, kwargs)  # type: ignore[attr-defined]
        wrapper.__cache_encoded__ = load_encoded  # type: ignore[attr-defined]
        wrapper.__cache_keys__ = keys  # type: ignore[attr-defined]
        return wrapper

    return decorate


async def encoded(read: Callable[..., Any], *args: Any, **kwargs: Any) -> bytes | None:
    """What a @cached `read` (a method's bound to its object) answers for these
    arguments, as its codec's bytes; None for a None. A near-cache hit hands over the
    bytes it holds without decoding them: for an answer that goes out encoded, as a
    gRPC reply of the cached message does (grpc_calls.py passes bytes through)."""
    load: Callable[..., Awaitable[bytes | None]] = getattr(read, "__cache_encoded__")  # noqa: B009 - set by @cached
    if inspect.ismethod(read):
        args = (read.__self__, *args)
    return await load(*args, **kwargs)


def stale(read: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """The pattern naming exactly the key a @cached `read` fills for these arguments
    (a method's without its `self`): what a write passes to write.made_stale()."""
    keys: KeyBuilder = getattr(read, "__cache_keys__")  # noqa: B009 - set by @cached
    return escape_key(keys.key(keys.unbound(args), kwargs))


def every(read: Callable[..., Any]) -> str:
    """The pattern naming every key a @cached `read` fills (an O(1) prefix invalidation)."""
    keys: KeyBuilder = getattr(read, "__cache_keys__")  # noqa: B009 - set by @cached
    return f"{keys.key_prefix}:*"


# Leading verbs that name a read, not the thing read: get_agents caches "agents".
_READ_VERBS = ("get_", "list_", "fetch_", "load_", "find_", "read_", "search_", "discover_", "lookup_")


def default_key_prefix(function: Callable[..., Any]) -> str:
    """"<namespace>:<module>.<qualified name>": the namespace is the function's name
    less a leading read verb, so that invalidate_cache(key_pattern="agents") reaches
    what get_agents cached; module and qualified name keep two functions apart."""
    name = function.__name__
    for verb in _READ_VERBS:
        if name.startswith(verb) and len(name) > len(verb):
            name = name[len(verb) :]
            break
    return f"{name}:{function.__module__}.{function.__qualname__}"


def _codec_of(function: Callable[..., Any]) -> Codec[Any]:
    if "return" not in getattr(function, "__annotations__", {}):
        return JSON  # unannotated: any JSON-serialisable value, as the guide uses it
    annotation = _return_annotation(function)
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
    """Invalidates glob patterns once the decorated async function has run.

    A bare name ("agents": no ':', no glob, no field) stands for "agents:*". A pattern
    may name the function's arguments, "agents:get:{agent_id}": each is encoded as in
    a @cached key, with glob characters escaped. The invalidation also
    runs when the function raises, since a write that failed half-way may still have
    changed something; it never raises itself (see CacheClient.invalidate).
    """
    templates = [key_pattern] if isinstance(key_pattern, str) else list(key_pattern)
    if not templates or any(not template for template in templates):
        raise ValueError("key_pattern must be one or more non-empty patterns")
    templates = [_widen_bare_name(template) for template in templates]

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
                await _manager(manager, args).client.invalidate(*patterns)

        return wrapper

    return decorate


def _widen_bare_name(template: str) -> str:
    if any(char in template for char in ":*?[{"):
        return template
    return f"{template}:*"


def _fields(template: str) -> list[tuple[str, str | None, str | None, str | None]]:
    return list(string.Formatter().parse(template))


def _return_annotation(function: Callable[..., Any]) -> Any:
    try:
        return typing.get_type_hints(function).get("return")
    except (NameError, TypeError):
        # A forward reference that cannot be resolved here: no implied codec.
        return None
