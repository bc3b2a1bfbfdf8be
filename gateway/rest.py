"""The ASGI app behind every google.api.http route: match, transcode, one gRPC call,
render (docs/design.md walks a write and a cached read through it). Handlers are made
once per route; a request does only the work that depends on it. Server streams are
server-sent events with no deadline: a watch lives as long as its client listens."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import cast

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.backends import ChannelPool
from gateway.conditional import NO_CACHE_METADATA, Answer, requests_no_cache
from gateway.edge import Edge
from gateway.errors import GatewayError, bad_request, http_only, route_not_found, rpc_error_response, status_body, status_of
from gateway.hardening import client_address, rate_limit_headers, refuse_query_credentials, require_json
from gateway.metrics import ROUTE_SCOPE_KEY, UNMATCHED_ROUTE
from gateway.request_id import SCOPE_KEY as REQUEST_ID_SCOPE_KEY
from gateway.request_id import new_request_id
from gateway.routes import HttpRoute
from gateway.templates import NotAllowed, Router
from gateway.transcode import DEFAULT_MAX_DEPTH, Renderer, RequestBuilder, renderer
from services.common.auth.guard import AccessGuard
from services.common.contract.errors import ServiceError, Unavailable
from services.common.contract.forwarded import FORWARDER_KEY, TrustedProxies
from services.common.contract.limits import MAX_MESSAGE_BYTES

# Headers a backend needs to authenticate and trace the caller, forwarded as metadata.
FORWARDED_HEADERS = frozenset({b"authorization", b"x-api-key"})

# How long a stream may take to produce its first message before the response headers
# go out anyway. Within it, a call that fails at once (NOT_FOUND) is still a proper
# HTTP error; past it, an idle watch is not left without headers.
FIRST_EVENT_GRACE = 0.5

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _Handler:
    __slots__ = ("route", "builder", "render", "answer", "conditional", "kept", "unary", "stream")

    # The gRPC multicallable of the route's kind; bound in the lifespan, when the channels exist.
    unary: grpc.aio.UnaryUnaryMultiCallable[Message, Message]
    stream: grpc.aio.UnaryStreamMultiCallable[Message, Message]

    def __init__(self, route: HttpRoute, builder: RequestBuilder, render: Renderer) -> None:
        self.route = route
        self.builder = builder
        self.render = render
        # The response may depend on the credentials forwarded: a cacheable one varies with them.
        self.answer = Answer(route, render, (name.decode("ascii") for name in sorted(FORWARDED_HEADERS)))
        self.conditional = route.http_method == "GET"
        # What the edge cache may hold: a unary GET's answer, keyed by path and query alone.
        self.kept = self.conditional and not route.server_streaming and not route.headers


class RestGateway:
    def __init__(
        self,
        routes: Sequence[HttpRoute],
        *,
        timeout: float,
        max_body_bytes: int = MAX_MESSAGE_BYTES,
        max_json_depth: int = DEFAULT_MAX_DEPTH,
        trusted_proxies: str = "",
        service_key: str = "",
        limiting: bool = False,
        edge: Edge | None = None,
    ) -> None:
        self._handlers = [_Handler(route, RequestBuilder(route, max_json_depth), renderer(route)) for route in routes]
        self._proxies = TrustedProxies(trusted_proxies)
        # When `limiting` (gateway_limits), the gateway takes each caller's token and tells
        # the services so with their key: on a call it admitted, they take none of their own.
        self._vouching = ((FORWARDER_KEY, service_key),) if service_key else ()
        self._limiting = limiting
        # The services' guard, set in the lifespan: it admits the edge cache's hits and, when limiting, every call.
        self.guard: AccessGuard | None = None
        self.router: Router[_Handler] = Router((h.route.http_method, h.route.template, h) for h in self._handlers)
        self._timeout = timeout
        self._max_body_bytes = max_body_bytes
        self._edge = edge

    def bind(self, pool: ChannelPool) -> None:
        for handler in self._handlers:
            route = handler.route
            channel = pool.channel(route.backend)
            serialize, deserialize = route.request_class.SerializeToString, route.response_class.FromString
            if route.server_streaming:
                handler.stream = channel.unary_stream(route.grpc_path, serialize, deserialize)
            else:
                handler.unary = channel.unary_unary(route.grpc_path, serialize, deserialize)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        http_method: str = scope["method"]
        path = _raw_path(scope)
        result = self.router.match(http_method, path)
        if result is None or isinstance(result, NotAllowed):
            scope[ROUTE_SCOPE_KEY] = UNMATCHED_ROUTE
            if result is None:
                error = route_not_found(http_method, path)
            else:
                allowed = ", ".join(result.allowed)
                error = http_only(405, f"{http_method} is not allowed on {path}; allowed: {allowed}", {"Allow": allowed})
            await error.response()(scope, receive, send)
            return
        handler = result.target
        scope[ROUTE_SCOPE_KEY] = handler.route.template.text
        edge = self._edge
        edge_key = (path, scope["query_string"])
        try:
            refuse_query_credentials(scope["query_string"])
            metadata, if_none_match = _metadata(scope)
            # A hot hit first: before the request is read or built, with nothing but the
            # caller's admission between the lookup and the answer.
            entry = None
            timeout = self._timeout
            if edge is not None and handler.kept and NO_CACHE_METADATA not in metadata:
                entry = edge.cache.get(edge_key)
                if entry is None:
                    # Another reader's miss of it may be on its way: its answer, when kept,
                    # is this one's too; what the wait took comes off this one's deadline.
                    loop = asyncio.get_running_loop()
                    began = loop.time()
                    entry = await edge.landed(edge_key, timeout)
                    timeout -= loop.time() - began
            admitted = await self._admit(handler, metadata, scope) if entry is not None else None
            if edge is not None and entry is not None and admitted is not None:
                await edge.send(entry, if_none_match, admitted, send)
                return
            body = await self._read_body(scope, receive) if handler.builder.reads_body else b""
            if body is None:
                return  # the client hung up before sending its body; nobody to answer
            if body:
                require_json(scope)
            message = handler.builder.build(result.values, scope["query_string"], body)
            if handler.route.headers:
                _fields_from_headers(message, handler.route.headers, scope)
            if self._limiting and entry is None:
                admitted = await self._admit(handler, metadata, scope)
        except GatewayError as error:
            await error.response()(scope, receive, send)
            return
        if admitted is not None:
            metadata = (*metadata, *self._vouching)
        limits = admitted or ()
        if handler.route.server_streaming:
            await self._stream(handler, message, metadata, limits, scope, receive, send)
            return
        # An unconditional miss of a kept route leads: readers who miss it meanwhile wait for its answer.
        leading = edge is not None and handler.kept and if_none_match is None
        with edge.loading(edge_key) if edge is not None and leading else contextlib.nullcontext():
            call = handler.unary(message, timeout=timeout, metadata=metadata)
            try:
                reply = await call
            except grpc.aio.AioRpcError as error:
                response = rpc_error_response(error)
                trailers = error.trailing_metadata()
            else:
                trailers = await call.trailing_metadata()
                response = handler.answer.response(reply, trailers, if_none_match if handler.conditional else None)
                if edge is not None:
                    if handler.kept:
                        edge.fill(edge_key, response, trailers)
                    elif not handler.conditional:
                        edge.written(trailers)
        response.headers.update({**rate_limit_headers(trailers), **rate_limit_headers(limits)})
        await response(scope, receive, send)

    async def _admit(
        self, handler: _Handler, metadata: tuple[tuple[str, str], ...], scope: Scope
    ) -> tuple[tuple[str, str], ...] | None:
        """The caller's rate-limit figures once the guard admits it (else its refusal, as the
        service would answer it); None when its key cannot be checked now (the agents
        service unreachable): the call goes unvouched, and its service checks and limits it."""
        if self.guard is None:
            return None
        try:
            return await self.guard.admit(
                handler.route.grpc_path,
                dict(metadata),
                lambda: client_address(scope, self._proxies),
                limited=self._limiting,
            )
        except Unavailable:
            return None
        except ServiceError as refused:
            raise GatewayError(refused, headers=rate_limit_headers(refused.trailing_metadata)) from None

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self._max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise http_only(413, f"request body exceeds {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise http_only(413, f"request body exceeds {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _stream(
        self,
        handler: _Handler,
        message: Message,
        metadata: tuple[tuple[str, str], ...],
        limits: tuple[tuple[str, str], ...],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        call = handler.stream(message, metadata=metadata)
        first = asyncio.ensure_future(call.read())
        try:
            done, _ = await asyncio.wait((first,), timeout=FIRST_EVENT_GRACE)
            failure = first.exception() if done else None
            if isinstance(failure, grpc.aio.AioRpcError):
                response: Response = rpc_error_response(failure)
            else:
                event_id = handler.route.resume[1].name if handler.route.resume is not None else None
                response = StreamingResponse(
                    _events(call, first, handler.render, event_id), media_type="text/event-stream", headers=SSE_HEADERS
                )
            response.headers.update(rate_limit_headers(limits))
            await response(scope, receive, send)
        finally:
            # Also reached when the client disconnects mid-stream: stop the backend's work.
            first.cancel()
            call.cancel()


async def _events(
    call: grpc.aio.UnaryStreamCall[Message, Message], first: asyncio.Future[object], render: Renderer, event_id: str | None
) -> AsyncIterator[bytes]:
    try:
        reply = await first
        while reply is not grpc.aio.EOF:
            # read() is typed as returning object, EOF's type; anything else is a message.
            message = cast(Message, reply)
            head = b"id: " + getattr(message, event_id).encode() + b"\n" if event_id else b""
            yield head + b"data: " + render(message) + b"\n\n"
            reply = await call.read()
    except grpc.aio.AioRpcError as error:
        # Headers are gone: the status travels as a last, named event in the error shape.
        yield b"event: error\ndata: " + status_body(status_of(error)) + b"\n\n"


def _fields_from_headers(message: Message, headers: tuple[tuple[bytes, FieldDescriptor], ...], scope: Scope) -> None:
    """The fields HttpRoute.headers names, from their headers; the query or body, if it sets one, wins."""
    for name, value in scope["headers"]:
        for header, field in headers:
            if name == header and not getattr(message, field.name):
                setattr(message, field.name, _printable(name, value.decode("latin-1").strip()))


def _raw_path(scope: Scope) -> str:
    """The path as sent, still percent-encoded, so an encoded '/' or ':' stays inside a value."""
    raw = scope.get("raw_path")
    path: str = raw.decode("utf-8", "replace") if raw else scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path


def _metadata(scope: Scope) -> tuple[tuple[tuple[str, str], ...], bytes | None]:
    """What the backend call carries, and the request's If-None-Match, in one look at the headers."""
    metadata = [("x-request-id", scope.get(REQUEST_ID_SCOPE_KEY) or new_request_id())]
    if_none_match = None
    for name, value in scope["headers"]:
        if name in FORWARDED_HEADERS:
            metadata.append((name.decode("ascii"), _printable(name, value.decode("latin-1"))))
        elif name == b"cache-control":
            if requests_no_cache(value):
                metadata.append(NO_CACHE_METADATA)
        elif name == b"if-none-match":
            if_none_match = value
    return tuple(metadata), if_none_match


def _printable(name: bytes, text: str) -> str:
    """A header's value that may go on as gRPC metadata or a string field."""
    if not (text.isascii() and text.isprintable()):
        raise bad_request(f"header {name.decode()!r} must be printable ASCII", field=name.decode())
    return text
