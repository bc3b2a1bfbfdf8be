"""The built-in agents: small, deterministic building blocks for workflows.

They run inside the agents service (endpoint "builtin"), so a new install can run a
workflow without deploying anything. Each capability is a function from a JSON
object to a JSON object; raising AgentFailure makes a FAILED result with its message.
"""

from __future__ import annotations

import asyncio
import math
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jsonschema
from devops_hub.v1 import agents_pb2

from services.agents.validation import BUILTIN_ENDPOINT
from services.common.contract.json_paths import PathNotFound, walk

Agent = agents_pb2.Agent
MAX_WAIT_SECONDS = 300.0

Json = dict[str, Any]


class AgentFailure(Exception):
    """The agent ran and failed: reported as a FAILED result, never as an RPC error."""


@dataclass(frozen=True)
class Call:
    input: Json
    attempt: int


Capability = Callable[[Call], Awaitable[Json]]


def _require(call: Call, name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in call.input:
        raise AgentFailure(f"input.{name} is required")
    value = call.input[name]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise AgentFailure(f"input.{name} must be a {expected}")
    return value


async def json_pick(call: Call) -> Json:
    """{"document": {...}, "fields": {"out": "a.b.0"}} -> {"out": document.a.b[0]}."""
    document = _require(call, "document", (dict, list))
    fields = _require(call, "fields", dict)
    picked = {}
    for name, path in fields.items():
        if not isinstance(path, str):
            raise AgentFailure(f"input.fields.{name} must be a dotted path")
        try:
            picked[name] = walk(document, path.split(".") if path else [])
        except PathNotFound as exc:
            raise AgentFailure(f"input.fields.{name}: {exc}") from None
    return picked


async def json_merge(call: Call) -> Json:
    """{"objects": [{...}, {...}]} -> the objects merged left to right, nested objects deeply."""
    objects = _require(call, "objects", list)
    merged: Json = {}
    for i, item in enumerate(objects):
        if not isinstance(item, dict):
            raise AgentFailure(f"input.objects[{i}] must be an object")
        _deep_merge(merged, item)
    return merged


def _deep_merge(into: Json, other: Json) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


async def text_render(call: Call) -> Json:
    """{"template": "Deployed ${service}", "values": {"service": "api"}} -> {"text": ...}."""
    template = _require(call, "template", str)
    values = call.input.get("values", {})
    if not isinstance(values, dict):
        raise AgentFailure("input.values must be an object")
    try:
        text = string.Template(template).substitute({k: _as_text(v) for k, v in values.items()})
    except KeyError as exc:
        raise AgentFailure(f"template names ${{{exc.args[0]}}}, which input.values does not hold") from None
    except ValueError as exc:
        raise AgentFailure(f"input.template: {exc}") from None
    return {"text": text}


def _as_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # JSON numbers arrive as floats; 3.0 reads as 3
    return str(value)


async def aggregate_stats(call: Call) -> Json:
    """{"values": [numbers]} -> count, sum, min, max, mean."""
    values = _require(call, "values", list)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise AgentFailure("input.values must hold only numbers")
    if not values:
        return {"count": 0, "sum": 0}
    try:
        # fsum is exact where sum() drifts, and says so when the total leaves what a
        # double holds (sum() would return inf, which no JSON answer can carry).
        total = math.fsum(values)
    except OverflowError:
        raise AgentFailure("input.values: their sum is beyond the largest number a double holds (about 1.8e308)") from None
    return {"count": len(values), "sum": total, "min": min(values), "max": max(values), "mean": total / len(values)}


async def schema_validate(call: Call) -> Json:
    """{"document": ..., "schema": {JSON Schema}} -> {"valid": bool, "errors": [...]}.

    An invalid document is a successful validation with valid=false; a broken schema fails.
    """
    schema = _require(call, "schema", dict)
    document = _require(call, "document", object)
    try:
        validator_class = jsonschema.validators.validator_for(schema)
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise AgentFailure(f"input.schema is not a valid JSON Schema: {exc.message}") from None
    errors = [
        {"path": "/".join(str(p) for p in error.absolute_path), "message": error.message}
        for error in validator_class(schema).iter_errors(document)
    ]
    return {"valid": not errors, "errors": errors}


async def control_wait(call: Call) -> Json:
    """{"seconds": 1.5} -> waits, then {"waited": 1.5}. Bounded by MAX_WAIT_SECONDS and the deadline."""
    seconds = _require(call, "seconds", (int, float))
    if not 0 <= seconds <= MAX_WAIT_SECONDS:
        raise AgentFailure(f"input.seconds must be between 0 and {MAX_WAIT_SECONDS:.0f}")
    await asyncio.sleep(seconds)
    return {"waited": seconds}


async def control_fail(call: Call) -> Json:
    """{"fail_attempts": 2, "message": "flaky"} fails attempts 1 and 2, then returns
    {"attempt": 3}: for testing retries."""
    fail_attempts = call.input.get("fail_attempts", 1)
    if not isinstance(fail_attempts, (int, float)) or fail_attempts < 0:
        raise AgentFailure("input.fail_attempts must be a number >= 0")
    if call.attempt <= fail_attempts:
        raise AgentFailure(str(call.input.get("message", f"failing on purpose (attempt {call.attempt})")))
    return {"attempt": call.attempt}


async def control_echo(call: Call) -> Json:
    """Returns its input: a pass-through for joins and tests."""
    return dict(call.input)


# agent id -> (name, description, {capability: function})
BUILTIN_AGENTS: dict[str, tuple[str, str, dict[str, Capability]]] = {
    "builtin-json": ("JSON tools", "Picks fields out of and merges JSON documents.", {"json.pick": json_pick, "json.merge": json_merge}),
    "builtin-text": ("Text templates", "Renders ${name} templates.", {"text.render": text_render}),
    "builtin-aggregate": ("Aggregates", "Count, sum, min, max and mean of numbers.", {"aggregate.stats": aggregate_stats}),
    "builtin-schema": ("JSON Schema validator", "Validates a document against a JSON Schema.", {"schema.validate": schema_validate}),
    "builtin-control": (
        "Flow control",
        "Waits, echoes, and fails on purpose (for testing retries).",
        {"control.wait": control_wait, "control.fail": control_fail, "control.echo": control_echo},
    ),
}


def builtin_agent_records() -> list[Agent]:
    """The agent records `make run` seeds for the built-ins."""
    return [
        Agent(
            id=agent_id,
            name=name,
            description=description,
            version="1.0.0",
            domain="builtin",
            type=Agent.TASK,
            status=Agent.ACTIVE,
            capabilities=sorted(capabilities),
            endpoint=BUILTIN_ENDPOINT,
        )
        for agent_id, (name, description, capabilities) in BUILTIN_AGENTS.items()
    ]


def find(agent_id: str, capability: str) -> Capability | None:
    entry = BUILTIN_AGENTS.get(agent_id)
    return None if entry is None else entry[2].get(capability)
