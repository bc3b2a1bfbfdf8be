"""Schemathesis against /openapi.json of a stack started as `make run` starts it.

Bounded (a few examples per operation, deterministic) so it fits in CI: no answer is
a 5xx, and every answer matches the document (status, content type, body schema).
Excluded: revoking keys (the run would revoke its own key half-way) and the two
server-sent event streams (they never end by themselves).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support import ROOT
from tests.support.processes import ADMIN_KEY, process_env, read_until, spawned

pytestmark = pytest.mark.slow

EXCLUDED_OPERATIONS = r"^(ApiKeysService_RevokeApiKey|EventsService_StreamEvents|WorkflowsService_WatchExecution)$"


def test_no_5xx_and_no_answer_outside_the_document(tmp_path):
    st = shutil.which("st", path=str(ROOT / ".venv" / "bin")) or shutil.which("st")
    assert st, "schemathesis (st) is a dev dependency: make setup installs it"
    env = process_env(tmp_path)
    env.update(RATE_LIMIT_REQUESTS="0", RATE_LIMIT_EXECUTE_REQUESTS="0")
    with spawned("devstack.launcher", env) as stack:
        read_until(stack, "launcher: ready")
        run = subprocess.run(
            [
                st, "run", f"http://127.0.0.1:{env['GATEWAY_PORT']}/openapi.json",
                "--header", f"x-api-key: {ADMIN_KEY}",
                "--max-examples", "4",
                "--generation-deterministic",
                "--phases", "examples,coverage,fuzzing",
                "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
                "--exclude-operation-id-regex", EXCLUDED_OPERATIONS,
                "--request-timeout", "10",
                # One worker: schemathesis compiles code as it goes, and concurrent
                # compiles in threads trip a CPython 3.11 bug (AST recursion depth).
                "--workers", "1",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env={**env, "NO_COLOR": "1"},
        )
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert "API Operations" in run.stdout
