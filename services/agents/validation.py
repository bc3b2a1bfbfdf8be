"""What makes an agent valid beyond what its proto says, checked whole on create,
batch create and update (the template, services/common/usecases/resource.py, checks the
REQUIRED fields and the enums first).
"""

from __future__ import annotations

import re

from devops_hub.v1 import agents_pb2

from services.common.usecases.resource import Violations

Agent = agents_pb2.Agent

DOMAIN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
CAPABILITY = re.compile(r"^[a-z0-9][a-z0-9._:-]{0,127}$")
METADATA_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
# Agents that run inside the agents service (services/agents/builtins.py).
BUILTIN_ENDPOINT = "builtin"
ENDPOINT = re.compile(r"^[A-Za-z0-9.-]+:\d{1,5}$|^\[[0-9A-Fa-f:]+\]:\d{1,5}$")

MAX_LENGTH = {"name": 200, "version": 64, "description": 4096}
MAX_CAPABILITIES = 64
MAX_METADATA = 64
MAX_METADATA_VALUE = 1024


def check(agent: Agent, prefix: str, violations: Violations) -> None:
    """`prefix` makes the paths point into the request. An unset field is the
    template's to name (REQUIRED) or valid (optional)."""

    def bad(path: str, description: str) -> None:
        violations.append((f"{prefix}.{path}", description))

    if agent.name and not agent.name.strip():
        bad("name", "is required and must not be blank")
    for name, most in MAX_LENGTH.items():
        if len(getattr(agent, name)) > most:
            bad(name, f"must be at most {most} characters")
    if agent.domain and not DOMAIN.match(agent.domain):
        bad("domain", "must be 1-64 lower-case letters, digits, '.', '_' or '-'")
    if len(agent.capabilities) > MAX_CAPABILITIES:
        bad("capabilities", f"at most {MAX_CAPABILITIES} capabilities")
    for i, capability in enumerate(agent.capabilities):
        if not CAPABILITY.match(capability):
            bad(f"capabilities[{i}]", "must be 1-128 lower-case letters, digits, '.', '_', ':' or '-'")
    if len(agent.metadata) > MAX_METADATA:
        bad("metadata", f"at most {MAX_METADATA} entries")
    for key, value in agent.metadata.items():
        if not METADATA_KEY.match(key):
            bad(f"metadata[{key!r}]", "key must be 1-128 letters, digits, '.', '_', '/' or '-'")
        if len(value) > MAX_METADATA_VALUE:
            bad(f"metadata[{key!r}]", f"value must be at most {MAX_METADATA_VALUE} characters")
    if agent.endpoint and agent.endpoint != BUILTIN_ENDPOINT and not ENDPOINT.match(agent.endpoint):
        bad("endpoint", f'must be host:port, or "{BUILTIN_ENDPOINT}" for a built-in agent')


def normalise(agent: Agent) -> None:
    if agent.type == Agent.TYPE_UNSPECIFIED:
        agent.type = Agent.TASK
    if agent.status == Agent.STATUS_UNSPECIFIED:
        agent.status = Agent.ACTIVE
    unique = list(dict.fromkeys(agent.capabilities))
    if len(unique) != len(agent.capabilities):
        del agent.capabilities[:]
        agent.capabilities.extend(unique)
    agent.name = agent.name.strip()
