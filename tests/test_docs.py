"""README.md and docs/ point at what exists: links stay inside the repository and
resolve (anchors included), and the files and tests they name are there."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.fast

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE_PATH = re.compile(r"`((?:services|gateway|protos|deploy|tests|bench|docs|scripts|clients)/[^`\s]*)`")
# design.md's guides' worked examples name files that do not exist yet, by design.
GUIDE_EXAMPLES = ("reports",)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(document: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.DOTALL)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.MULTILINE)}


def expand(path: str) -> list[str]:
    """`a/{b,c}/d` → `a/b/d`, `a/c/d`."""
    parts = re.split(r"\{([^}]*)\}", path)
    choices = [[part] if i % 2 == 0 else part.split(",") for i, part in enumerate(parts)]
    return ["".join(combination) for combination in itertools.product(*choices)]


def test_links_stay_in_the_repository_and_resolve():
    broken = []
    for document in DOCUMENTS:
        for target in LINK.findall(document.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            resolved = (document.parent / path).resolve() if path else document
            if ROOT not in resolved.parents and resolved != ROOT:
                broken.append(f"{document.name}: {target} leaves the repository")
            elif not resolved.exists():
                broken.append(f"{document.name}: {target} does not exist")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{document.name}: {target} names no heading")
    assert not broken, broken


def test_the_files_and_tests_the_documents_name_exist():
    """Every `path` a document names is there; `tests/x.py::test_y` names a test of x.py."""
    missing = []
    for document in DOCUMENTS:
        named = {path for match in CODE_PATH.findall(document.read_text()) for path in expand(match.rstrip(".,"))}
        assert named, f"{document.name} names no file: is CODE_PATH still right?"
        for path in sorted(named):
            file, _, test = path.partition("::")
            if any(e in file for e in GUIDE_EXAMPLES):
                continue
            if not (ROOT / file).exists():
                missing.append(f"{document.name}: {file}")
            elif test and not re.search(rf"^(async )?def {re.escape(test)}\(", (ROOT / file).read_text(), re.MULTILINE):
                missing.append(f"{document.name}: {path}")
    assert not missing, missing


def test_the_slugs_and_brace_expansion():
    assert slug("Adding an RPC") == "adding-an-rpc" and slug("Caching (the heart of it)") == "caching-the-heart-of-it"
    assert expand("m/{postgresql,sqlite}/") == ["m/postgresql/", "m/sqlite/"]


def marked_fast(file: str, test: str) -> bool:
    """Whether `make test-fast` runs the test (or, with no test named, some test of the
    module): its module is marked `fast`, or it is, among the decorators above it."""
    text = (ROOT / file).read_text()
    if re.search(r"^pytestmark = pytest\.mark\.fast$", text, re.MULTILINE):
        return True
    if not test:
        return "@pytest.mark.fast\n" in text
    decorators = re.search(rf"((?:^@.*\n)*)^(?:async )?def {re.escape(test)}\(", text, re.MULTILINE)
    return decorators is not None and "@pytest.mark.fast\n" in decorators.group(1)


def test_the_tests_where_a_change_goes_says_to_run_first_are_in_the_fast_tier():
    design = (ROOT / "docs" / "design.md").read_text()
    section = design.split("## Where a change goes", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in section.splitlines() if line.startswith("| ")]
    header, rows = rows[0], rows[1:]
    column = header.index("first, in the fast tier")
    without = [row[0] for row in rows if len(row) <= column]
    assert not without, f"rows without a fast-tier cell: {without}"
    named = {path for row in rows for path in CODE_PATH.findall(row[column]) if path.startswith("tests/")}
    assert named, "the fast-tier column names no test"
    slow = [path for path in sorted(named) if not marked_fast(*path.partition("::")[::2])]
    assert not slow, f"named to run first, but not marked fast: {slow}"
