"""Imports go downward: a lower module never needs a higher one to be imported.

Read from the source (every import statement, in functions too), so a loop shows here
before it shows as an ImportError in whichever order a process happens to import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _module(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _absolute(path: Path, node: ast.ImportFrom) -> str:
    """The module a `from` import names, a relative one (`from .x import y`) resolved."""
    if node.level == 0:
        return node.module or ""
    package = _module(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    package = package[: len(package) - node.level + 1]
    return ".".join([*package, *([node.module] if node.module else [])])


def _imports() -> dict[str, set[str]]:
    """Each module of services/ and gateway/ → the modules of those packages it imports."""
    graph: dict[str, set[str]] = {}
    for package in ("services", "gateway"):
        for path in (ROOT / package).rglob("*.py"):
            found: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    base = _absolute(path, node)
                    found.add(base)
                    found.update(f"{base}.{alias.name}" for alias in node.names)
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
    assert not {name for name in _reach(_imports(), "services.common.transport.channels") if name.startswith("services.common.auth")}


@pytest.mark.fast
def test_no_service_needs_the_development_stack():
    # devstack/ (the launcher, test and bench stacks) is never deployed.
    graph = _imports()
    assert [name for name, imported in graph.items() if any(i.split(".")[0] == "devstack" for i in imported)] == []


def _layers() -> list[tuple[str, str]]:
    """services/common/__init__.py's layer list, bottom to top: (name, package)."""
    listing = (ast.get_docstring(ast.parse((ROOT / "services/common/__init__.py").read_text())) or "").partition("Layers, bottom to top")[2]
    return [(name, where.replace("/", ".")) for name, where in re.findall(r"^    (\w+) +(services/\S+)/$", listing, re.M)]


# The cache package's sidecar is a service that runs on the layers, like agents and workflows.
SERVICES_IN_A_LAYER = ("services.cache.sidecar",)


def _rank(name: str, layers: list[tuple[str, str]]) -> int | None:
    """The layer of a module (its index, bottom 0); above them all for the services, the
    gateway and the sidecar; None for the packages that only hold layers."""
    if name in ("services", "services.common"):
        return None
    if any(name == service or name.startswith(f"{service}.") for service in SERVICES_IN_A_LAYER):
        return len(layers)
    for rank, (_, package) in enumerate(layers):
        if name == package or name.startswith(f"{package}."):
            return rank
    return len(layers)


@pytest.mark.fast
def test_the_layer_list_names_every_layer_with_its_purpose():
    layers = _layers()
    assert [name for name, _ in layers][:2] == ["foundation", "contract"] and len(layers) >= 6
    for name, package in layers:
        init = ROOT / package.replace(".", "/") / "__init__.py"
        assert init.is_file(), f"layer {name}: {package} is no package"
        assert ast.get_docstring(ast.parse(init.read_text())), f"layer {name}: its __init__.py says nothing of its purpose"


@pytest.mark.fast
def test_every_module_of_common_is_in_a_layer():
    # A module dropped at services/common/ would escape the check below: its place is a layer.
    packages = {package for _, package in _layers()}
    loose = [path.name for path in (ROOT / "services/common").iterdir() if path.name not in ("__init__.py", "__pycache__")]
    assert [name for name in loose if f"services.common.{name.removesuffix('.py')}" not in packages] == []


@pytest.mark.fast
def test_imports_go_only_down_the_layers():
    # Module-level, function-level and TYPE_CHECKING imports alike: a lower layer that
    # needs a higher one, even lazily, is a loop waiting for the import order that shows it.
    layers, graph = _layers(), _imports()
    upward = []
    for module, imported in graph.items():
        rank = _rank(module, layers)
        if rank is None or rank == len(layers):
            continue
        for name in imported:
            theirs = _rank(name, layers)
            if theirs is not None and theirs > rank:
                upward.append(f"{module} ({layers[rank][0]}) imports {name} ({layers[theirs][0] if theirs < len(layers) else 'a service'})")
    assert sorted(upward) == []


@pytest.mark.fast
def test_the_module_map_follows_the_layer_list():
    design = (ROOT / "docs" / "design.md").read_text()
    section = design.split("## Module map", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^\| `(\w+)` \|", section, re.M) == [name for name, _ in _layers()]
