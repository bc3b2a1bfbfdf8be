"""A real headless browser for the pages' tests: Debian's chromium, driven over the
Chrome DevTools protocol with `websockets` (installed already, with uvicorn[standard]),
so the tests need no browser driver or browser download of their own.

Without chromium the tests skip and say so; under CI=true they fail instead (.ci/run
installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-port=0",
)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "chromium is not installed (apt-get install -y chromium; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


class Page:
    """One tab: evaluate JavaScript in it, and the URL of every request it made."""

    def __init__(self, socket: ClientConnection) -> None:
        self._socket = socket
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.requested: list[str] = []
        self.console_errors: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self._socket:
            message = json.loads(raw)
            if "id" in message:
                self._waiting.pop(message["id"]).set_result(message)
            elif message.get("method") == "Network.requestWillBeSent":
                self.requested.append(message["params"]["request"]["url"])
            elif message.get("method") == "Runtime.exceptionThrown":
                self.console_errors.append(json.dumps(message["params"]["exceptionDetails"])[:500])

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        answer = self._waiting[call_id] = asyncio.get_running_loop().create_future()
        await self._socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        message = await asyncio.wait_for(answer, 30)
        assert "error" not in message, message
        result: dict[str, Any] = message["result"]
        return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Evaluates `expression` until it is truthy; returns that value."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            assert asyncio.get_running_loop().time() < deadline, f"still falsy after {timeout}s: {expression}"
            await asyncio.sleep(0.1)

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for(f"location.href.startsWith({json.dumps(url)}) && document.readyState === 'complete'")


@contextlib.asynccontextmanager
async def browser_page(profile: Path) -> AsyncIterator[Page]:
    """A headless chromium with a fresh profile in `profile`, and its one tab."""
    process = subprocess.Popen(
        [chromium(), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = await asyncio.to_thread(_devtools_port, process)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            targets = json.loads(answer.read())
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        async with connect(url, max_size=None) as socket:
            page = Page(socket)
            for domain in ("Page", "Runtime", "Network"):
                await page.send(f"{domain}.enable")
            try:
                yield page
            finally:
                page._reader.cancel()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _devtools_port(process: subprocess.Popen[str]) -> int:
    """The port from chromium's "DevTools listening on ws://127.0.0.1:PORT/..." line."""
    assert process.stderr is not None
    found: list[int] = []

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            if "DevTools listening on ws://" in line and not found:
                found.append(int(line.split("ws://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1]))
        # Keep draining stderr so chromium never blocks on a full pipe.

    threading.Thread(target=read, daemon=True).start()
    for _ in range(300):
        if found:
            return found[0]
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with {process.returncode} before listening")
        threading.Event().wait(0.1)
    raise RuntimeError("chromium did not open its DevTools port within 30 s")
