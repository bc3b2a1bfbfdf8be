"""A TCP proxy in front of the test's PostgreSQL that loses one COMMIT's answer.

The fault a client cannot see through: the server committed, the connection went
before its answer arrived. Armed with a marker (bytes of a statement, e.g.
b"INSERT INTO agents"), it waits for a connection that sends the marker and then a
COMMIT, lets the server answer that COMMIT (so the write is durable), and cuts the
connection instead of passing the answer on. Traffic is plain: the URL it gives
asks for no TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit


class CommitCutter:
    def __init__(self, target_url: str) -> None:
        parts = urlsplit(target_url)
        self._target = parts
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 5432
        self._mark: bytes | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.cuts = 0
        self.url = ""

    def arm(self, mark: bytes) -> None:
        """Cut the next connection that sends `mark`, then COMMIT, after the server answers."""
        self._mark = mark

    async def __aenter__(self) -> CommitCutter:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        user = f"{self._target.username}@" if self._target.username else ""
        self.url = urlunsplit((self._target.scheme, f"{user}127.0.0.1:{port}", self._target.path, "sslmode=disable", ""))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _accepted(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._relay(client_reader, client_writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(self._host, self._port)
        marked = committing = False

        async def upstream() -> None:
            nonlocal marked, committing
            while data := await client_reader.read(65536):
                if self._mark is not None and self._mark in data:
                    marked = True
                if marked and b"COMMIT" in data:
                    committing = True
                server_writer.write(data)
                await server_writer.drain()

        async def downstream() -> None:
            while data := await server_reader.read(65536):
                if committing and self._mark is not None:
                    # The server has answered the COMMIT: the write is durable. Its answer is lost.
                    self._mark = None
                    self.cuts += 1
                    return
                client_writer.write(data)
                await client_writer.drain()

        try:
            tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for writer in (client_writer, server_writer):
                writer.transport.abort()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
