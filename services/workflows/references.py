"""References inside step inputs: "$.input.<path>", "$.steps.<id>.output.<path>", "$.item".

Values in a step's input are literals, or strings starting with "$." that name a
value in the execution's context; they are resolved when the step starts. The same
parser serves validation (at create time) and resolution (at run time), so what
validates is exactly what runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from services.common.contract.json_paths import PathNotFound, walk

PREFIX = "$."
_SEGMENT = re.compile(r"^[A-Za-z0-9_-]+$")


class UnresolvedReference(Exception):
    """A reference that does not parse, or names nothing at run time."""


@dataclass(frozen=True)
class Reference:
    root: str  # "input", "steps" or "item"
    step_id: str  # for root == "steps"
    path: tuple[str, ...]  # below the root (below "output" for steps)

    @property
    def text(self) -> str:
        if self.root == "steps":
            return ".".join(["$", "steps", self.step_id, "output", *self.path])
        return ".".join(["$", self.root, *self.path])


def is_reference(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def parse(text: str) -> Reference:
    parts = text[len(PREFIX):].split(".") if text.startswith(PREFIX) else []
    if not parts or not all(_SEGMENT.match(p) for p in parts):
        raise UnresolvedReference(f"{text!r} is not a reference like $.input.x or $.steps.<id>.output.y")
    root, rest = parts[0], parts[1:]
    if root in ("input", "item"):
        return Reference(root, "", tuple(rest))
    if root == "steps":
        if len(rest) < 2 or rest[1] != "output":
            raise UnresolvedReference(f"{text!r}: a step reference reads $.steps.<step id>.output[.path]")
        return Reference("steps", rest[0], tuple(rest[2:]))
    raise UnresolvedReference(f"{text!r}: references start with $.input, $.steps or $.item")


def references_in(value: Any) -> Iterator[Reference]:
    """Every reference inside a JSON-like value, however deep."""
    if is_reference(value):
        yield parse(value)
    elif isinstance(value, dict):
        for item in value.values():
            yield from references_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from references_in(item)


def resolve(value: Any, context: dict[str, Any]) -> Any:
    """`value` with every reference replaced by what it names in `context` (steps.Context)."""
    if is_reference(value):
        return lookup(parse(value), context)
    if isinstance(value, dict):
        return {key: resolve(item, context) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve(item, context) for item in value]
    return value


def lookup(reference: Reference, context: dict[str, Any]) -> Any:
    if reference.root == "steps":
        outputs = context.get("steps", {})
        if reference.step_id not in outputs:
            raise UnresolvedReference(f"{reference.text}: step {reference.step_id!r} has no output")
        current = outputs[reference.step_id]
    elif reference.root in context:
        current = context[reference.root]
    else:
        raise UnresolvedReference(f"{reference.text}: nothing to read here")
    try:
        return walk(current, reference.path)
    except PathNotFound as exc:
        raise UnresolvedReference(f"{reference.text}: {exc}") from None
