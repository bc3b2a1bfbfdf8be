"""The client as its users get it: `make dist`'s wheel, installed with pip into a fresh
virtual environment outside the repository, drives a running stack. Slow (a venv and a
pip install, from the local wheel cache when it can), and part of `make test`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.auth import ADMIN_KEY
from tests.support.client import DEPLOY_GATE, DEPLOY_INPUT, cli_env, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Run with the venv's python, from outside the repository: what a user's program does.
PROGRAM = textwrap.dedent(
    """
    import asyncio, json, sys
    from importlib import resources

    import devops_hub
    from devops_hub import errors
    from devops_hub.client import Client
    from devops_hub.v1 import agents_pb2, workflows_pb2
    from google.protobuf import json_format

    async def main(key, workflow):
        seen = {"package": devops_hub.__file__}
        seen["protos"] = sorted(p.name for p in resources.files("devops_hub").joinpath("protos/devops_hub/v1").iterdir())
        async with Client.connect(api_key=key) as hub:  # the addresses from AGENTS_ADDR, WORKFLOWS_ADDR
            seen["agents"] = sorted([a.id async for a in hub.list_agents(page_size=2)])
            try:
                await hub.get_agent("no-such-agent")
            except errors.NotFound as missing:
                seen["missing"] = missing.reason
            created = await hub.create_workflow(json_format.ParseDict(workflow, workflows_pb2.Workflow()))
            execution = await hub.execute_workflow(created.id, json.loads(sys.argv[3]))
            seen["watched"] = [event.type async for event in hub.watch_execution(execution.id)]
        print(json.dumps(seen))

    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
    """
)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with nothing but `make dist`'s wheel (and what it requires) installed."""
    work = tmp_path_factory.mktemp("client_install")
    _run(["make", "-s", "dist", f"DIST={work / 'dist'}"], ROOT)
    wheels = list((work / "dist").glob("devops_hub_client-*.whl"))
    assert len(wheels) == 1, wheels
    _run([sys.executable, "-m", "venv", str(work / "venv")], work)
    _run([str(work / "venv" / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheels[0])], work)
    return work / "venv"


def _run(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"


async def test_the_installed_wheel_drives_a_running_stack(venv, secured):
    stack, _ = secured
    env = cli_env(stack.settings)
    work = venv.parent
    program = await run_cli([str(venv / "bin" / "python"), "-c", PROGRAM], env, ADMIN_KEY, json.dumps(DEPLOY_GATE),
                            json.dumps(DEPLOY_INPUT), cwd=str(work))
    assert program.code == 0, program.err
    seen = program.json()
    # Imported from the venv, not from the repository.
    assert seen["package"].startswith(str(venv)), seen["package"]
    assert "agents.proto" in seen["protos"] and "workflows.proto" in seen["protos"]
    assert "builtin-text" in seen["agents"] and seen["missing"] == "AGENT_NOT_FOUND"
    assert seen["watched"][-1] == "execution.succeeded" and "step.running" in seen["watched"]

    # Its console script, the key from the environment.
    command = [str(venv / "bin" / "devops-hub")]
    listed = await run_cli(command, cli_env(stack.settings, ADMIN_KEY), "agents", "list", "--json", cwd=str(work))
    assert listed.code == 0, listed.err
    assert "builtin-text" in {agent["id"] for agent in listed.json()}
    run = await run_cli(command, cli_env(stack.settings, ADMIN_KEY), "workflows", "run", DEPLOY_GATE["id"], "--watch",
                        "--input", json.dumps(DEPLOY_INPUT), cwd=str(work))
    assert run.code == 0 and run.lines()[-1].split()[1] == "execution.succeeded", run.out + run.err
