"""Imports go downward: a lower module never needs a higher one to be imported.

Read from the source (every import statement, in functions too), so a loop shows here
before it shows as an ImportError in whichever order a process happens to import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _module(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    """Each module of services/ and gateway/ → the modules of those packages it imports."""
    graph: dict[str, set[str]] = {}
    for package in ("services", "gateway"):
        for path in (ROOT / package).rglob("*.py"):
            found: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module)
                    found.update(f"{node.module}.{alias.name}" for alias in node.names)
                elif isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
            graph[_module(path)] = {name for name in found if name.split(".")[0] in ("services", "gateway", "devstack")}
    return graph


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for name in graph.get(todo.pop(), ()):
            if name in graph and name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


@pytest.mark.fast
def test_the_channel_factory_needs_nothing_of_auth():
    # auth's verifier opens channels; the factory below it knows nothing of keys' checking.
    assert not {name for name in _reach(_imports(), "services.common.channels") if name.startswith("services.common.auth")}


@pytest.mark.fast
def test_no_service_needs_the_development_stack():
    # devstack/ (the launcher, test and bench stacks) is never deployed.
    graph = _imports()
    assert [name for name, imported in graph.items() if any(i.split(".")[0] == "devstack" for i in imported)] == []
