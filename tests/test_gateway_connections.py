"""What a client may hold of the gateway, through raw sockets: a bounded request
head, a deadline for a whole request, an idle timeout. Slow clients are closed while
others are served."""

from __future__ import annotations

import asyncio
import json

import httpx

from gateway.testing import running_gateway
from services.common.settings import Settings

SLOW = 1000


def gateway_settings(**overrides) -> Settings:
    # No backend listens: /health/live answers without one.
    return Settings(
        agents_addr="127.0.0.1:1", workflows_addr="127.0.0.1:1", cache_addr="127.0.0.1:1", gateway_port=0, **overrides
    )


async def read_all(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the gateway sends until it closes the connection."""
    chunks = []
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_a_thousand_slow_connections_are_closed_while_others_are_served():
    settings = gateway_settings(gateway_read_timeout=2.0, gateway_keepalive_timeout=2.0)
    async with running_gateway(settings) as base_url:
        port = int(base_url.rsplit(":", 1)[1])
        slow = []
        for index in range(SLOW):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if index % 2:
                # A body declared and never sent in full.
                writer.write(b"POST /api/agents HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{}")
            elif index % 4 == 2:
                writer.write(b"GET /api/agents HTTP/1.1\r\nhost: x\r\n")  # a head never finished
            # else: silent from the start
            slow.append((reader, writer))
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            for _ in range(20):
                assert (await client.get("/health/live")).status_code == 200
        answers = await asyncio.gather(*(read_all(reader, 60) for reader, _ in slow))
        for _, writer in slow:
            writer.close()
        # Every slow connection was closed; the ones that had begun a request were told why.
        begun = [answer for index, answer in enumerate(answers) if index % 2 or index % 4 == 2]
        assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in begun), {a[:40] for a in begun}
        silent = [answer for index, answer in enumerate(answers) if not (index % 2 or index % 4 == 2)]
        assert silent == [b""] * len(silent)


async def test_a_request_head_past_the_limit_is_431():
    async with running_gateway(gateway_settings(gateway_max_header_bytes=4096)) as base_url:
        port = int(base_url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /api/agents HTTP/1.1\r\nhost: x\r\n" + b"x-filler: " + b"a" * 20_000 + b"\r\n\r\n")
        answer = await read_all(reader, 30)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431 "), head
        assert json.loads(body)["details"][0]["reason"] == "HEADERS_TOO_LARGE"
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            # Under the limit, the same request is served.
            assert (await client.get("/health/live", headers={"x-filler": "a" * 1000})).status_code == 200
