"""What makes a workflow valid: a DAG of well-formed steps over agents that exist.

Every problem is reported with the path of the step field at fault
(`workflow.steps[2].depends_on[0]`), all of them at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from devops_hub.v1 import agents_pb2, workflows_pb2
from google.protobuf import json_format

from services.common.usecases.resource import Violations
from services.workflows import references

Workflow = workflows_pb2.Workflow
Step = workflows_pb2.Step
Agent = agents_pb2.Agent

STEP_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_STEPS = 200
MAX_RETRIES = 10
MAX_STEP_TIMEOUT = 24 * 3600
MAX_WAIT = 24 * 3600
_NEEDS_AGENT = (Step.AGENT, Step.PARALLEL)


def check_workflow(workflow: Workflow, prefix: str, violations: Violations) -> None:
    """Checks that need nothing but the workflow, whole (as created, or as an update leaves it)."""
    if workflow.name and not workflow.name.strip():
        violations.append((f"{prefix}.name", "is required and must not be blank"))
    elif len(workflow.name) > 200:
        violations.append((f"{prefix}.name", "must be at most 200 characters"))
    if len(workflow.description) > 4096:
        violations.append((f"{prefix}.description", "must be at most 4096 characters"))
    if len(workflow.steps) > MAX_STEPS:
        violations.append((f"{prefix}.steps", f"at most {MAX_STEPS} steps"))
    if workflow.timeout.seconds < 0 or workflow.timeout.nanos < 0:
        violations.append((f"{prefix}.timeout", "must not be negative"))

    index: dict[str, int] = {}
    for i, step in enumerate(workflow.steps):
        path = f"{prefix}.steps[{i}]"
        if not STEP_ID.match(step.id):
            violations.append((f"{path}.id", "must be 1-64 letters, digits, '_' or '-'"))
        elif step.id in index:
            violations.append((f"{path}.id", f"repeats the id of steps[{index[step.id]}]"))
        else:
            index[step.id] = i
    for i, step in enumerate(workflow.steps):
        _check_step(step, f"{prefix}.steps[{i}]", index, violations)
    if not any(field.endswith(".depends_on") or ".depends_on[" in field for field, _ in violations):
        _check_acyclic(workflow, index, prefix, violations)
    _check_references(workflow, index, prefix, violations)


def _check_step(step: Step, path: str, index: Mapping[str, int], violations: Violations) -> None:
    if step.type not in Step.Type.values() or step.type == Step.TYPE_UNSPECIFIED:
        known = ", ".join(n for n in Step.Type.keys() if n != "TYPE_UNSPECIFIED")
        violations.append((f"{path}.type", f"must be one of {known}"))
    if step.type in _NEEDS_AGENT:
        if not step.agent_id:
            violations.append((f"{path}.agent_id", f"is required for a {Step.Type.Name(step.type)} step"))
        if not step.capability:
            violations.append((f"{path}.capability", f"is required for a {Step.Type.Name(step.type)} step"))
    if step.type == Step.PARALLEL and not step.for_each:
        violations.append((f"{path}.for_each", "is required for a PARALLEL step"))
    if step.type == Step.CONDITIONAL and not step.condition:
        violations.append((f"{path}.condition", "is required for a CONDITIONAL step"))
    if step.type == Step.WAIT and not 0 < step.duration.seconds + step.duration.nanos / 1e9 <= MAX_WAIT:
        violations.append((f"{path}.duration", f"is required for a WAIT step: more than 0s, at most {MAX_WAIT}s"))
    timeout = step.timeout.seconds + step.timeout.nanos / 1e9
    if timeout < 0 or timeout > MAX_STEP_TIMEOUT:
        violations.append((f"{path}.timeout", f"must be between 0s and {MAX_STEP_TIMEOUT}s"))
    if not 0 <= step.retry.max_attempts <= MAX_RETRIES:
        violations.append((f"{path}.retry.max_attempts", f"must be between 0 and {MAX_RETRIES}"))
    if step.retry.multiplier < 0:
        violations.append((f"{path}.retry.multiplier", "must not be negative"))
    for j, dependency in enumerate(step.depends_on):
        if dependency not in index:
            violations.append((f"{path}.depends_on[{j}]", f"names no step of this workflow: {dependency!r}"))
        elif dependency == step.id:
            violations.append((f"{path}.depends_on[{j}]", "a step cannot depend on itself"))


def _check_acyclic(workflow: Workflow, index: Mapping[str, int], prefix: str, violations: Violations) -> None:
    # Kahn's algorithm: whatever cannot be ordered lies on (or behind) a cycle.
    remaining = {step.id: set(step.depends_on) for step in workflow.steps if step.id in index}
    ordered = True
    while remaining and ordered:
        ready = [step_id for step_id, deps in remaining.items() if not deps & remaining.keys()]
        ordered = bool(ready)
        for step_id in ready:
            del remaining[step_id]
    if remaining:
        cycle = ", ".join(sorted(remaining))
        first = min(remaining, key=lambda s: index[s])
        violations.append((f"{prefix}.steps[{index[first]}].depends_on", f"steps form a cycle: {cycle}"))


def ancestors(workflow: Workflow) -> dict[str, set[str]]:
    """Each step's transitive dependencies (steps on a cycle are cut off)."""
    deps = {step.id: set(step.depends_on) for step in workflow.steps}
    result: dict[str, set[str]] = {}

    def visit(step_id: str, trail: frozenset[str]) -> set[str]:
        if step_id in result:
            return result[step_id]
        found: set[str] = set()
        for dependency in deps.get(step_id, ()):
            if dependency in trail or dependency not in deps:
                continue
            found |= {dependency} | visit(dependency, trail | {dependency})
        result[step_id] = found
        return found

    for step_id in deps:
        visit(step_id, frozenset({step_id}))
    return result


def _check_references(workflow: Workflow, index: Mapping[str, int], prefix: str, violations: Violations) -> None:
    before = ancestors(workflow)
    for i, step in enumerate(workflow.steps):
        path = f"{prefix}.steps[{i}]"
        fields = {"input": json_format.MessageToDict(step.input), "condition": step.condition, "for_each": step.for_each}
        for field, value in fields.items():
            if field != "input" and value and not references.is_reference(value):
                violations.append((f"{path}.{field}", f"must be a reference like $.steps.<id>.output.x, got {value!r}"))
                continue
            try:
                found = list(references.references_in(value))
            except references.UnresolvedReference as exc:
                violations.append((f"{path}.{field}", str(exc)))
                continue
            for reference in found:
                if reference.root == "item" and not (step.type == Step.PARALLEL and field == "input"):
                    violations.append((f"{path}.{field}", f"{reference.text}: $.item exists only in a PARALLEL step's input"))
                elif reference.root == "steps" and reference.step_id not in index:
                    violations.append((f"{path}.{field}", f"{reference.text} names no step of this workflow"))
                elif reference.root == "steps" and reference.step_id not in before.get(step.id, set()):
                    violations.append(
                        (f"{path}.{field}", f"{reference.text}: step {reference.step_id!r} must be among this step's depends_on (directly or not)")
                    )


def check_agents(workflow: Workflow, prefix: str, agents: Mapping[str, Agent | None], violations: Violations) -> None:
    """Agents named by steps must exist, be usable and offer the capability."""
    for i, step in enumerate(workflow.steps):
        if step.type not in _NEEDS_AGENT or not step.agent_id:
            continue
        path = f"{prefix}.steps[{i}]"
        agent = agents.get(step.agent_id)
        if agent is None:
            violations.append((f"{path}.agent_id", f"no agent {step.agent_id!r}"))
        elif agent.status in (Agent.RETIRED, Agent.DEPRECATED):
            violations.append((f"{path}.agent_id", f"agent {step.agent_id!r} is {Agent.Status.Name(agent.status)}"))
        elif step.capability and step.capability not in agent.capabilities:
            offered = ", ".join(agent.capabilities) or "none"
            violations.append((f"{path}.capability", f"agent {step.agent_id!r} has no capability {step.capability!r} (it has: {offered})"))
