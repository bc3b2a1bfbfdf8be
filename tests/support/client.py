"""Driving the client package from outside, as its users do: the `devops-hub` command
as a subprocess, told where the stack is by the environment a user would set."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from devstack.seed import EXAMPLE_WORKFLOWS
from services.common.foundation.settings import Settings

# A seeded example: agent steps (validate, latency, announce) behind a CONDITIONAL gate.
DEPLOY_GATE = next(w for w in EXAMPLE_WORKFLOWS if w["id"] == "deploy-gate")
DEPLOY_INPUT = {"manifest": {"service": "api", "version": "1.2.3"}, "latencies_ms": [10, 20, 30]}


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def lines(self) -> list[str]:
        return self.out.splitlines()


def cli_env(settings: Settings, api_key: str = "") -> dict[str, str]:
    """This environment, with the stack's addresses and the key under the names the
    command reads (the stack's own AGENTS_ADDR, WORKFLOWS_ADDR, CACHE_ADDR)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DEVOPS_HUB_API_KEY")}
    env.update(AGENTS_ADDR=settings.agents_addr, WORKFLOWS_ADDR=settings.workflows_addr, CACHE_ADDR=settings.cache_addr)
    if api_key:
        env["DEVOPS_HUB_API_KEY"] = api_key
    return env


async def run_cli(
    command: Sequence[str], env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 60, cwd: str | None = None
) -> Ran:
    """Runs `command` with `args` without blocking the loop (the stack under test serves
    on it), and returns its exit code and output."""
    proc = await asyncio.create_subprocess_exec(
        *command, *args, env=env, cwd=cwd,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin is not None else None), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(f"{args} ran past {timeout}s: {out.decode()} {err.decode()}") from None
    return Ran(proc.returncode if proc.returncode is not None else -1, out.decode(), err.decode())
