"""x-request-id: taken from the client when usable, made up otherwise, echoed in the
response and forwarded to the backend, so one id follows a request through every log."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
SCOPE_KEY = "devops_hub.request_id"

# Printable ASCII without spaces and bounded: anything else could not travel as gRPC
# metadata, or would let a client stuff arbitrary data into every log line.
_USABLE = re.compile(rb"[\x21-\x7e]{1,128}")


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): it must not buffer bodies or break streaming."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        for name, value in scope["headers"]:
            if name == HEADER:
                if _USABLE.fullmatch(value):
                    request_id = value.decode("ascii")
                break
        request_id = request_id or new_request_id()
        scope[SCOPE_KEY] = request_id
        header = (HEADER, request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_id)
