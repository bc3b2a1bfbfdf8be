"""The `devops-hub` command, run as a subprocess against a running stack (auth on):
tables for people, --json for scripts, and the exit codes docs/client.md promises."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid

import pytest
from devops_hub import cli
from devops_hub.client import Client
from devops_hub.v1 import events_pb2, workflows_pb2
from google.protobuf import json_format

from devstack.ports import free_port
from services.agents.builtins import builtin_agent_records
from tests.support.auth import ADMIN_KEY, READ, new_key
from tests.support.client import DEPLOY_GATE, DEPLOY_INPUT, cli_env, run_cli

COMMAND = [sys.executable, "-m", "devops_hub.cli"]
BUILTIN_IDS = {agent.id for agent in builtin_agent_records()}


@pytest.fixture
async def hub(secured):
    """The stack, an admin client to it, and the command's environment (admin key)."""
    stack, keys_stub = secured
    settings = stack.settings
    addresses = {"agents": settings.agents_addr, "workflows": settings.workflows_addr, "cache": settings.cache_addr}
    async with Client.connect(addresses, ADMIN_KEY) as client:
        yield stack, keys_stub, client, cli_env(settings, ADMIN_KEY)


async def test_agents_list_prints_a_table_and_json_filtered_by_the_requests_fields(hub):
    _, _, _, env = hub
    table = await run_cli(COMMAND, env, "agents", "list")
    assert table.code == 0, table.err
    header, *rows = table.lines()
    assert header.split()[:2] == ["id", "name"]
    assert {row.split()[0] for row in rows} == BUILTIN_IDS
    listed = await run_cli(COMMAND, env, "agents", "list", "--json", "--status", "ACTIVE", "--capability", "text.render")
    assert listed.code == 0, listed.err
    assert [agent["id"] for agent in listed.json()] == ["builtin-text"]
    assert len((await run_cli(COMMAND, env, "--json", "agents", "list", "--limit", "2")).json()) == 2


async def test_agents_create_get_delete_and_the_exit_code_of_each_failure(hub):
    _, _, _, env = hub
    agent = {"id": f"cli-{uuid.uuid4().hex[:6]}", "name": "CLI agent", "version": "1.0.0", "domain": "ci",
             "type": "TASK", "status": "ACTIVE", "capabilities": ["lint"]}
    created = await run_cli(COMMAND, env, "agents", "create", "-", "--json", stdin=json.dumps(agent))
    assert created.code == cli.OK, created.err
    assert created.json()["id"] == agent["id"] and created.json()["etag"]
    got = await run_cli(COMMAND, env, "agents", "get", agent["id"])
    assert got.code == cli.OK and f"id: {agent['id']}" in got.lines() and "capabilities: lint" in got.lines()

    again = await run_cli(COMMAND, env, "agents", "create", "-", stdin=json.dumps(agent))
    assert again.code == cli.CONFLICT and "ALREADY_EXISTS" in again.err
    # A bad agent: INVALID_ARGUMENT, each bad field named (the BadRequest's violations).
    bad = await run_cli(COMMAND, env, "agents", "create", "-", "--json", stdin=json.dumps({**agent, "id": "x-bad", "name": ""}))
    assert bad.code == cli.USAGE
    error = json.loads(bad.err)
    assert error["code"] == "INVALID_ARGUMENT" and error["reason"] == "INVALID_FIELDS"
    assert {"field": "agent.name", "description": "is required"} in error["violations"]

    assert (await run_cli(COMMAND, env, "agents", "delete", agent["id"])).code == cli.OK
    gone = await run_cli(COMMAND, env, "agents", "get", agent["id"])
    assert gone.code == cli.NOT_FOUND and "AGENT_NOT_FOUND" in gone.err


async def test_keys_and_permissions_exit_4_and_a_created_key_works(hub):
    stack, keys_stub, _, env = hub
    created = await run_cli(COMMAND, env, "keys", "create", "reader", "--scope", "read")
    assert created.code == cli.OK, created.err
    reader_key = created.out.strip()
    assert reader_key.startswith("dh_") and "shown this once" in created.err
    reader = cli_env(stack.settings, reader_key)
    assert (await run_cli(COMMAND, reader, "agents", "get", "builtin-text")).code == cli.OK
    refused = await run_cli(COMMAND, reader, "agents", "delete", "builtin-text")
    assert refused.code == cli.PERMISSION and "PERMISSION_DENIED" in refused.err
    # The flag beats the environment; a key the stack never issued is UNAUTHENTICATED.
    unknown = await run_cli(COMMAND, env, "agents", "delete", "builtin-text", "--api-key", "dh_" + "x" * 43)
    assert unknown.code == cli.PERMISSION and "UNAUTHENTICATED" in unknown.err
    read_only = await new_key(keys_stub, READ)
    assert (await run_cli(COMMAND, cli_env(stack.settings, read_only), "cache", "stats")).code == cli.PERMISSION


async def test_usage_and_unreachable_services_have_their_own_exit_codes(hub):
    _, _, _, env = hub
    assert (await run_cli(COMMAND, env, "agents", "frobnicate")).code == cli.USAGE
    assert (await run_cli(COMMAND, env, "keys", "create", "k", "--scope", "everything")).code == cli.USAGE
    # Input that is not there, or not the JSON of an Agent, is refused before any call.
    assert (await run_cli(COMMAND, env, "agents", "create", "/nonexistent/agent.json")).code == cli.USAGE
    unknown_field = await run_cli(COMMAND, env, "agents", "create", "-", stdin='{"colour": "red"}')
    assert unknown_field.code == cli.USAGE and "colour" in unknown_field.err
    down = await run_cli(COMMAND, env, "agents", "list", "--agents-addr", f"127.0.0.1:{free_port()}", "--timeout", "3")
    assert down.code == cli.UNAVAILABLE, down.err


async def test_workflows_run_watch_prints_each_steps_progress_and_exits_by_the_outcome(hub):
    _, _, client, env = hub
    await client.create_workflow(json_format.ParseDict(DEPLOY_GATE, workflows_pb2.Workflow()))
    # By its name; --watch follows it to the end.
    run = await run_cli(COMMAND, env, "workflows", "run", DEPLOY_GATE["name"], "--input", json.dumps(DEPLOY_INPUT), "--watch")
    assert run.code == cli.OK, run.err
    # One line a transition: time, type, subject (the step), what else its data says.
    progress = [line.split()[1:] for line in run.lines()]
    for step in ("validate", "latency", "gate", "announce"):
        assert ["step.running", step] in progress and ["step.succeeded", step, "attempts=1"] in progress, run.out
    assert run.lines()[-1].split()[1] == "execution.succeeded"
    assert "SUCCEEDED" in run.err

    # For scripts: one JSON event a line; a manifest without a version fails the gate's
    # validation and the announce step is skipped, but the run succeeds: exit 0 still.
    as_json = await run_cli(COMMAND, env, "--json", "workflows", "run", DEPLOY_GATE["id"], "--watch",
                            "--input", json.dumps({**DEPLOY_INPUT, "manifest": {"service": "api"}}))
    events = [json.loads(line) for line in as_json.lines()]
    assert as_json.code == cli.OK and events[-1]["type"] == "execution.succeeded"
    assert "announce" in [e["data"]["step_id"] for e in events if e["type"] == "step.skipped"]

    # A failing execution (an input that is not a list where the step needs one) exits 1.
    failed = await run_cli(COMMAND, env, "workflows", "run", DEPLOY_GATE["id"], "--watch",
                           "--input", json.dumps({**DEPLOY_INPUT, "latencies_ms": "many"}))
    assert failed.code == cli.FAILED and "FAILED" in failed.err, failed.out
    missing = await run_cli(COMMAND, env, "workflows", "run", "no-such-workflow")
    assert missing.code == cli.NOT_FOUND

    # Without --watch: the execution as it started, a nested field as JSON.
    started = await run_cli(COMMAND, env, "workflows", "run", DEPLOY_GATE["id"], "--input", json.dumps(DEPLOY_INPUT))
    assert started.code == cli.OK, started.err
    lines = dict(line.split(": ", 1) for line in started.lines())
    assert lines["status"] in ("PENDING", "RUNNING") and json.loads(lines["input"]) == DEPLOY_INPUT, started.out
    assert {step["stepId"] for step in json.loads(lines["steps"])} == {"validate", "latency", "gate", "announce"}, started.out


async def test_output_closed_early_ends_quietly_with_the_sigpipe_code(hub):
    _, _, _, env = hub
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (`| head`) is gone before the first line
    proc = await asyncio.create_subprocess_exec(*COMMAND, "agents", "list", env=env, stdout=write_end, stderr=asyncio.subprocess.PIPE)
    os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == cli.PIPE_CLOSED and err == b"", err


async def test_events_tail_follows_new_events(hub):
    _, _, client, env = hub
    kind = f"cli.test.{uuid.uuid4().hex[:6]}"
    tail = asyncio.ensure_future(run_cli(COMMAND, env, "events", "tail", "--type", kind, "--count", "2", "--json"))
    # The stream starts at the newest event when it opens: publish until it has seen two.
    sent = 0
    while not tail.done():
        sent += 1
        await client.publish_event(events_pb2.Event(type=kind, source="cli-test", subject=f"n{sent}"))
        await asyncio.wait([tail], timeout=0.3)
    ran = tail.result()
    assert ran.code == cli.OK, ran.err
    seen = [json.loads(line) for line in ran.lines()]
    assert len(seen) == 2 and {e["type"] for e in seen} == {kind}
    assert [int(e["subject"][1:]) for e in seen] == sorted(int(e["subject"][1:]) for e in seen)


async def test_cache_stats_for_people_and_scripts(hub):
    _, _, _, env = hub
    stats = await run_cli(COMMAND, env, "cache", "stats")
    assert stats.code == cli.OK, stats.err
    assert any(line.startswith("hits: ") for line in stats.lines())
    assert {"hits", "misses"} <= set((await run_cli(COMMAND, env, "cache", "stats", "--json")).json())
