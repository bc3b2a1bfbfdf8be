"""Seeds a new install through the public API: the built-in agents and example workflows.

`make run` calls it once everything listens, so a new user can run a workflow in the
first minute. It is idempotent: what exists already is left as it is.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from devops_hub import errors
from devops_hub.v1 import agents_pb2, workflows_pb2
from google.protobuf import json_format

from services.agents.builtins import builtin_agent_records
from services.common.foundation.settings import Settings
from services.common.transport.channels import service_client

EXAMPLE_WORKFLOWS: list[dict[str, Any]] = [
    {
        "id": "deploy-gate",
        "name": "Deploy gate",
        "description": "Validates a deploy manifest, summarises latencies, and announces the deploy only if the manifest is valid.",
        "steps": [
            {
                "id": "validate",
                "type": "AGENT",
                "agentId": "builtin-schema",
                "capability": "schema.validate",
                "input": {
                    "document": "$.input.manifest",
                    "schema": {
                        "type": "object",
                        "required": ["service", "version"],
                        "properties": {"service": {"type": "string"}, "version": {"type": "string"}},
                    },
                },
            },
            {
                "id": "latency",
                "type": "AGENT",
                "agentId": "builtin-aggregate",
                "capability": "aggregate.stats",
                "input": {"values": "$.input.latencies_ms"},
            },
            {"id": "gate", "type": "CONDITIONAL", "condition": "$.steps.validate.output.valid", "dependsOn": ["validate"]},
            {
                "id": "announce",
                "type": "AGENT",
                "agentId": "builtin-text",
                "capability": "text.render",
                "dependsOn": ["gate", "latency"],
                "input": {
                    "template": "Deploying ${service} ${version} (mean latency ${mean} ms)",
                    "values": {
                        "service": "$.input.manifest.service",
                        "version": "$.input.manifest.version",
                        "mean": "$.steps.latency.output.mean",
                    },
                },
                "retry": {"maxAttempts": 3, "initialBackoff": "0.5s"},
            },
        ],
    },
    {
        "id": "fan-out-greetings",
        "name": "Fan-out greetings",
        "description": "Renders one message per service, concurrently, then merges them.",
        "steps": [
            {
                "id": "render",
                "type": "PARALLEL",
                "agentId": "builtin-text",
                "capability": "text.render",
                "forEach": "$.input.services",
                "input": {"template": "Hello from ${name}", "values": {"name": "$.item"}},
            },
            {
                "id": "collect",
                "type": "TRANSFORM",
                "dependsOn": ["render"],
                "input": {"messages": "$.steps.render.output.items", "count_of": "$.input.services"},
            },
        ],
    },
]


async def seed(settings: Settings) -> list[str]:
    """Creates what is missing; returns the ids it created."""
    created = []
    services = (agents_pb2.DESCRIPTOR.services_by_name["AgentsService"], workflows_pb2.DESCRIPTOR.services_by_name["WorkflowsService"])
    async with service_client(settings, *services, timeout=10) as hub:
        for agent in builtin_agent_records():
            if await _created(hub.create_agent(agent)):
                created.append(agent.id)
        for example in EXAMPLE_WORKFLOWS:
            workflow = json_format.ParseDict(example, workflows_pb2.Workflow())
            if await _created(hub.create_workflow(workflow)):
                created.append(workflow.id)
    return created


async def _created(write: Awaitable[object]) -> bool:
    try:
        await write
    except errors.AlreadyExists:
        return False
    return True
