"""What one HTTP connection may hold of the gateway, which uvicorn's httptools protocol
bounds none of (docs/resilience.md): head bytes, counted as they arrive (httptools hands
a header over only once its line ends), idle time, time for a request to arrive. What
is written in one event-loop step goes out as one send(): uvicorn would write a
response's head and body as two TCP segments."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import status_body
from services.common.contract.errors import InvalidArgument, ServiceError
from services.common.foundation.settings import Settings


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head past the limit."""


class _CoalescedWrites:
    """The connection's transport, its writes of one event-loop step sent as one at its end."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self._flush)
        else:
            self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    max_header_bytes = 8192
    read_timeout = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        # Whether a request head has begun and not ended, and the bytes that arrived
        # for it after the piece it began in (which may hold the end of an earlier request).
        self._head_open = False
        self._head_arrived = 0
        self._read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # Duck-typed: the protocol (and its cycles) use the transport through these names only.
        super().connection_made(cast(asyncio.Transport, _CoalescedWrites(transport, self.loop)))
        # Idle from the start: the same timer uvicorn arms between requests.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_read_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        continued = self._head_open
        super().data_received(data)
        if continued and self._head_open and not self.transport.is_closing():
            self._head_arrived += len(data)
            if self._head_arrived > self.max_header_bytes:
                self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = self._head_arrived = 0
        self._head_open = True
        self._stop_read_timer()
        self._read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_open = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._stop_read_timer()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error; the head limit's error is one of those."""
        if self._head_bytes > self.max_header_bytes:
            self._refuse_head()
        else:
            super().send_400_response(msg)

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_header_bytes:
            raise _HeadTooLarge

    def _refuse_head(self) -> None:
        error = InvalidArgument(f"the request line and headers exceed {self.max_header_bytes} bytes", reason="HEADERS_TOO_LARGE")
        self._send_refusal(431, b"Request Header Fields Too Large", error)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            error = InvalidArgument(f"the request did not arrive within {self.read_timeout:g}s", reason="REQUEST_TIMEOUT")
            self._send_refusal(408, b"Request Timeout", error)
        else:
            self.transport.close()
        if self.cycle is not None:
            self.cycle.disconnected = True
            self.cycle.message_event.set()

    def _send_refusal(self, status: int, phrase: bytes, error: ServiceError) -> None:
        body = status_body(error.to_status())
        head = [b"HTTP/1.1 %d %s\r\n" % (status, phrase)]
        for name, value in self.server_state.default_headers:
            head.append(name + b": " + value + b"\r\n")
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def _stop_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None


def connection_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn.Config options that bound connections."""
    protocol = type(
        "GatewayHttpProtocol",
        (BoundedHttpToolsProtocol,),
        {"max_header_bytes": settings.gateway_max_header_bytes, "read_timeout": settings.gateway_read_timeout},
    )
    return {
        "http": protocol,
        "timeout_keep_alive": settings.gateway_keepalive_timeout,
        # uvicorn would otherwise rewrite the client's address from X-Forwarded-For
        # for any peer on 127.0.0.1; gateway.hardening.client_address decides instead.
        "proxy_headers": False,
    }
