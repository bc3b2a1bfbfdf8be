"""What makes an agent valid, checked whole on create, batch create and update
(services/common/resource.py).

Every check adds a (field path, description) violation rather than raising at the
first, so a client learns about every bad field of a request at once.
"""

from __future__ import annotations

import re

from devops_hub.v1 import agents_pb2

from services.common import field_behavior

Agent = agents_pb2.Agent
Violations = list[tuple[str, str]]

DOMAIN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
CAPABILITY = re.compile(r"^[a-z0-9][a-z0-9._:-]{0,127}$")
METADATA_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
# Agents that run inside the agents service (services/agents/builtins.py).
BUILTIN_ENDPOINT = "builtin"
ENDPOINT = re.compile(r"^[A-Za-z0-9.-]+:\d{1,5}$|^\[[0-9A-Fa-f:]+\]:\d{1,5}$")

MAX_NAME = 200
MAX_VERSION = 64
MAX_DESCRIPTION = 4096
MAX_CAPABILITIES = 64
MAX_METADATA = 64
MAX_METADATA_VALUE = 1024


def check_fields(agent: Agent, prefix: str, violations: Violations) -> None:
    """Those of the agent's fields the proto marks REQUIRED must be set, and the others
    well formed. `prefix` makes the paths point into the request."""
    missing = field_behavior.missing(agent)
    violations.extend(field_behavior.violations(missing, prefix))
    for name, check in _CHECKS.items():
        if name not in missing:
            check(agent, f"{prefix}.{name}", violations)


def _name(agent: Agent, field: str, violations: Violations) -> None:
    if not agent.name.strip():
        violations.append((field, "is required and must not be blank"))
    elif len(agent.name) > MAX_NAME:
        violations.append((field, f"must be at most {MAX_NAME} characters"))


def _version(agent: Agent, field: str, violations: Violations) -> None:
    if len(agent.version) > MAX_VERSION:
        violations.append((field, f"must be at most {MAX_VERSION} characters"))


def _description(agent: Agent, field: str, violations: Violations) -> None:
    if len(agent.description) > MAX_DESCRIPTION:
        violations.append((field, f"must be at most {MAX_DESCRIPTION} characters"))


def _domain(agent: Agent, field: str, violations: Violations) -> None:
    if not DOMAIN.match(agent.domain):
        violations.append((field, "must be 1-64 lower-case letters, digits, '.', '_' or '-'"))


def _enum(enum_name: str):
    enum = Agent.DESCRIPTOR.enum_types_by_name[enum_name]
    known = ", ".join(v.name for v in enum.values if v.number != 0)

    def check(agent: Agent, field: str, violations: Violations) -> None:
        value = getattr(agent, field.rsplit(".", 1)[-1])
        if value not in enum.values_by_number:
            violations.append((field, f"unknown value {value}; one of {known}"))

    return check


def _capabilities(agent: Agent, field: str, violations: Violations) -> None:
    if len(agent.capabilities) > MAX_CAPABILITIES:
        violations.append((field, f"at most {MAX_CAPABILITIES} capabilities"))
    for i, capability in enumerate(agent.capabilities):
        if not CAPABILITY.match(capability):
            violations.append((f"{field}[{i}]", "must be 1-128 lower-case letters, digits, '.', '_', ':' or '-'"))


def _metadata(agent: Agent, field: str, violations: Violations) -> None:
    if len(agent.metadata) > MAX_METADATA:
        violations.append((field, f"at most {MAX_METADATA} entries"))
    for key, value in agent.metadata.items():
        if not METADATA_KEY.match(key):
            violations.append((f"{field}[{key!r}]", "key must be 1-128 letters, digits, '.', '_', '/' or '-'"))
        if len(value) > MAX_METADATA_VALUE:
            violations.append((f"{field}[{key!r}]", f"value must be at most {MAX_METADATA_VALUE} characters"))


def _endpoint(agent: Agent, field: str, violations: Violations) -> None:
    if agent.endpoint and agent.endpoint != BUILTIN_ENDPOINT and not ENDPOINT.match(agent.endpoint):
        violations.append((field, f'must be host:port, or "{BUILTIN_ENDPOINT}" for a built-in agent'))


_CHECKS = {
    "name": _name,
    "version": _version,
    "description": _description,
    "domain": _domain,
    "type": _enum("Type"),
    "status": _enum("Status"),
    "capabilities": _capabilities,
    "metadata": _metadata,
    "endpoint": _endpoint,
}


def normalise(agent: Agent) -> None:
    """Defaults for unset enums and a duplicate-free capability list, in place."""
    if agent.type == Agent.TYPE_UNSPECIFIED:
        agent.type = Agent.TASK
    if agent.status == Agent.STATUS_UNSPECIFIED:
        agent.status = Agent.ACTIVE
    unique = list(dict.fromkeys(agent.capabilities))
    if len(unique) != len(agent.capabilities):
        del agent.capabilities[:]
        agent.capabilities.extend(unique)
    agent.name = agent.name.strip()
