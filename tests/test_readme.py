"""The README's walkthrough and the launcher's first hint, run as a new user pastes them.

The commands are read from README.md itself, every ```sh block in order except those
marked `<!-- not part of the walkthrough test ... -->`, and run in one bash against a
stack the launcher started (`make run`'s code path) on free ports and its own SQLite
file; only the default addresses are replaced by the stack's. So README and code
cannot drift apart: a renamed route, a changed field or a deleted agent that a later
command reads fails here.

What counts as working: no helper failed (`field` reading a missing value), every
HTTP answer is 2xx (or the 304 a conditional GET asks for) except exactly the errors the README shows (`# {"code": N, ...`),
and every grpcurl and devops-hub command succeeds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter

import httpx
import pytest

from gateway.errors import HTTP_STATUS
from services.common.foundation.settings import Settings
from tests.support import ROOT
from tests.support.processes import launched_stack

README = ROOT / "README.md"
DEFAULTS = Settings()
SKIP_MARK = "<!-- not part of the walkthrough test"
DOCUMENTED_ERROR = re.compile(r'^# \{"code": (\d+)', re.MULTILINE)
HTTP_BY_CODE = {code.value[0]: status for code, status in HTTP_STATUS.items()}
# Reports each call's outcome on stderr, leaving the commands themselves as written.
INSTRUMENTS = r"""
curl() { command curl -w '%{stderr}@@http %{http_code}\n' "$@"; }
grpcurl() { command grpcurl "$@"; local code=$?; echo "@@grpc $code" >&2; return $code; }
devops-hub() { command devops-hub "$@"; local code=$?; echo "@@cli $code" >&2; return $code; }
"""
RUN_TIMEOUT = 300


def walkthrough_blocks(text: str) -> list[str]:
    blocks = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        if lines[index].strip() == "```sh":
            end = lines.index("```", index + 1)
            if not (index and lines[index - 1].startswith(SKIP_MARK)):
                blocks.append("\n".join(lines[index + 1 : end]))
            index = end
        index += 1
    return blocks


def for_stack(script: str, env: dict[str, str]) -> str:
    """The script aimed at the stack under test instead of the default addresses."""
    replacements = {
        f"localhost:{DEFAULTS.gateway_port}": f"localhost:{env['GATEWAY_PORT']}",
        DEFAULTS.agents_addr: env["AGENTS_ADDR"],
        DEFAULTS.workflows_addr: env["WORKFLOWS_ADDR"],
        DEFAULTS.cache_addr: env["CACHE_ADDR"],
    }
    for default, actual in replacements.items():
        script = script.replace(default, actual)
    for default in replacements:
        port = default.rsplit(":", 1)[1]
        assert f":{port}" not in script, f"the walkthrough names :{port} other than as {default}"
    return script


def run_bash(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", INSTRUMENTS + script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT
    )


def outcomes(stderr: str, kind: str) -> list[int]:
    return [int(code) for code in re.findall(rf"^@@{kind} (\d+)$", stderr, re.MULTILINE)]


@pytest.mark.fast
def test_the_walkthrough_reads_the_readme_blocks_in_order():
    text = "x\n```sh\none\n```\n<!-- not part of the walkthrough test: why -->\n```sh\nskipped\n```\n```sh\ntwo\n```\n"
    assert walkthrough_blocks(text) == ["one", "two"]


@pytest.mark.slow
def test_every_readme_command_works_pasted_in_order(tmp_path):
    assert shutil.which("curl"), "the walkthrough needs curl"
    text = README.read_text()
    blocks = walkthrough_blocks(text)
    script = "\n".join(blocks)
    documented = Counter(HTTP_BY_CODE[int(code)] for code in DOCUMENTED_ERROR.findall(script))
    grpc_calls = len(re.findall(r"^grpcurl ", script, re.MULTILINE))
    cli_calls = len(re.findall(r"^devops-hub ", script, re.MULTILINE))
    assert blocks and documented and grpc_calls and cli_calls, "the walkthrough lost its blocks, its error example, its gRPC calls or its CLI"
    with launched_stack(tmp_path) as env:
        done = run_bash(for_stack(script, env), env)
    report = f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-6000:]}"
    assert "Traceback" not in done.stderr, report
    statuses = outcomes(done.stderr, "http")
    assert len(statuses) == len(re.findall(r"(?:^|\$\()curl ", script, re.MULTILINE)), report
    # 304 Not Modified is the answer the README's conditional GET asks for.
    failed = Counter(status for status in statuses if not (200 <= status < 300 or status == 304))
    assert failed == documented, f"answers other than 2xx: {dict(failed)}, documented: {dict(documented)}\n{report}"
    assert outcomes(done.stderr, "grpc") == [0] * grpc_calls, report
    assert outcomes(done.stderr, "cli") == [0] * cli_calls, report


@pytest.mark.slow
def test_the_launchers_hint_obtains_a_key_and_works(tmp_path):
    lines: list[str] = []
    # Auth on, as by default; make key finds the stack by AGENTS_ADDR, as the hint says.
    with launched_stack(tmp_path, output=lines) as env:
        hint = lines[-1].split("Try, in another terminal here: ", 1)[1]
        assert "make -s key" in hint and "x-api-key" in hint
        user = {name: value for name, value in env.items() if name != "DATABASE_URL"}
        done = run_bash(for_stack(hint, env), user)
        gateway = f"http://127.0.0.1:{env['GATEWAY_PORT']}"
        listed = httpx.get(f"{gateway}/api/executions", params={"workflow_id": "fan-out-greetings"}, timeout=10)
    assert outcomes(done.stderr, "http") == [200], f"{done.stdout}\n{done.stderr}"
    assert "through the stack running at" in done.stderr
    assert len(listed.json()["executions"]) == 1


def test_make_key_says_where_it_wrote_and_warns_about_an_unused_database(tmp_path):
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/elsewhere.db"}
    done = subprocess.run(["make", "-s", "key"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("dh_")
    assert f"created in sqlite:///{tmp_path}/elsewhere.db" in done.stderr
    assert "no stack had used yet" in done.stderr
