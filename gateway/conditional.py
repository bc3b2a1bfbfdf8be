"""HTTP caching for REST answers. Every successful answer has an `ETag`: the resource's
own (AIP-154) when the rendered message has an `etag` field, otherwise a weak one over
its deterministic protobuf encoding (weak: a map's JSON keys may come out in another
order for the same content); a matching If-None-Match is a 304, its body not rendered.
`Cache-Control` is what the service said: the gateway keeps no table of its own. A
cacheable answer `Vary`s with the credential headers forwarded, so no shared cache hands
one caller's answer to another. A request's `no-cache` goes on, bypassing the service's caches."""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Iterable

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from starlette.responses import Response

from gateway.json_body import JSON_MEDIA_TYPE
from gateway.routes import HttpRoute
from gateway.transcode import Renderer
from services.cache.client.freshness import CACHE_CONTROL

NO_CACHE_METADATA = (CACHE_CONTROL, "no-cache")

# Bytes an entity-tag may hold between its quotes (RFC 9110 §8.8.3: etagc, without obs-text).
_ETAG_CHARACTERS = frozenset(range(0x21, 0x7F)) - {0x22}


def requests_no_cache(cache_control: bytes) -> bool:
    return any(
        directive.split(b"=", 1)[0].strip().lower() == b"no-cache" for directive in cache_control.split(b",")
    )


def content_etag(message: Message) -> str:
    digest = hashlib.blake2b(message.SerializeToString(deterministic=True), digest_size=16)
    return 'W/"' + digest.hexdigest() + '"'


def none_match(if_none_match: bytes, etag: str) -> bool:
    """Whether If-None-Match names `etag` (weak comparison, RFC 9110 §13.1.2)."""
    if if_none_match.strip() == b"*":
        return True
    wanted = etag.removeprefix("W/").encode("ascii")
    return any(tag.strip().removeprefix(b"W/") == wanted for tag in if_none_match.split(b","))


def _etag_reader(route: HttpRoute) -> Callable[[Message], str] | None:
    field = route.response_field
    rendered = route.method.output_type if field is None else field.message_type
    if rendered is None or (field is not None and field.is_repeated):
        return None
    etag_field = rendered.fields_by_name.get("etag")
    if etag_field is None or etag_field.type != FieldDescriptor.TYPE_STRING or etag_field.is_repeated:
        return None
    return operator.attrgetter("etag" if field is None else f"{field.name}.etag")


def _quoted(etag: str) -> str | None:
    """The resource etag as an HTTP entity-tag, or None if it cannot be one as it is."""
    if etag and all(ord(char) in _ETAG_CHARACTERS for char in etag):
        return f'"{etag}"'
    return None


class Answer:
    """Builds one route's successful responses: made once per route, used per call."""

    def __init__(self, route: HttpRoute, render: Renderer, vary: Iterable[str]) -> None:
        self._render = render
        self._etag_of = _etag_reader(route)
        self._vary = ", ".join(vary)

    def response(self, reply: Message, trailers: Iterable[tuple[str, object]], if_none_match: bytes | None) -> Response:
        """`if_none_match` is the request's header on a GET, None otherwise."""
        etag = _quoted(self._etag_of(reply)) if self._etag_of is not None else None
        headers = {"ETag": etag or content_etag(reply)}
        for key, value in trailers or ():
            if key == CACHE_CONTROL and isinstance(value, str):
                headers["Cache-Control"] = value
                headers["Vary"] = self._vary
                break
        if if_none_match is not None and none_match(if_none_match, headers["ETag"]):
            return Response(status_code=304, headers=headers)
        return Response(self._render(reply), media_type=JSON_MEDIA_TYPE, headers=headers)
