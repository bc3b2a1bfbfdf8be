"""What several test modules share, one module per topic; test modules import their
helpers from here, never from one another or from conftest.py (which holds fixtures)."""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn

import pytest

# The repository's root, for the tests that run its tools or read its files.
ROOT = Path(__file__).resolve().parent.parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(what: str, why: str | BaseException) -> NoReturn:
    """Skips a test whose PostgreSQL, Redis or cluster is missing, saying which and why;
    under CI=true fails it instead, since there everything must run."""
    reason = f"{type(why).__name__}: {why}" if isinstance(why, BaseException) else why
    message = f"{what} is not available ({reason})"
    if IN_CI:
        pytest.fail(f"{message}; under CI=true it must run", pytrace=False)
    pytest.skip(message)


async def eventually(condition: Callable[[], bool | Awaitable[bool]], what: str = "the condition", timeout: float = 20.0) -> None:
    """Waits for `condition()` (a bool, or an awaitable of one) to hold, for what happens
    in the background: a relay, a Watch stream, a metric counted after the answer."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        met = condition()
        if await met if inspect.isawaitable(met) else met:
            return
        assert asyncio.get_running_loop().time() < deadline, f"never happened within {timeout}s: {what}"
        await asyncio.sleep(0.02)
